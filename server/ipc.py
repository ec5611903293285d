"""What the HTTP workers and the engine process say to each other over ZeroMQ, and how it is encoded.

Every frame is a msgpack list of messages (msgspec): what one turn of a process's event loop sends to
one peer goes as one frame, so a busy server makes few system calls per request. A worker's DEALER socket
sends requests `[op, request_id, *args]`; the engine's ROUTER socket answers `[request_id, ok, payload]`,
where a failed request's payload is `[error class name, message, retry_after]` so the worker raises the
same typed error.

    ("hello", id)                                      -> EngineInfo fields, once the engine is warm
    ("infer", id, adapter_id, route, top_k, rows)      -> {"adapter", "queue_s", "inference_s", "outputs"}
    ("check", id, adapter_id, route)                  -> None, or the error the adapter would get
    ("cancel", id, reason)                             (no answer: the request's rows are dropped)
    ("put", id, adapter_id, config, model, labels, filename)  -> {"record": ..., "created": bool}
    ("delete", id, adapter_id) / ("info", id, adapter_id) / ("list", id) / ("stats", id)

`rows` are `[token ids, type_start]` per input; `outputs` are `[shape, float32 bytes]` per row.
"""

from __future__ import annotations

import msgspec
import numpy as np

from loraplex.adapters import errors

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

encode = _encoder.encode
decode = _decoder.decode


class Tokens(list):
    """Token ids of one input (special tokens included), where its token type 1 starts, and whether it
    was truncated."""

    def __init__(self, ids: list[int], type_start: int | None = None, truncated: bool = False):
        super().__init__(ids)
        self.type_start = len(ids) if type_start is None else type_start
        self.truncated = truncated


def error_payload(exc: errors.LoraplexError) -> list:
    return [type(exc).__name__, exc.message, getattr(exc, "retry_after", None)]


# What a worker is told when the engine process failed on a request in a way no LoraplexError describes.
SERVER_FAULT = ["UnavailableError", "The server could not handle this request; retry later.", 1]


def raise_error(payload: list) -> None:
    """Raise the typed error that the engine process raised (a LoraplexError of the same class)."""
    name, message, retry_after = payload
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.LoraplexError)):
        cls = errors.LoraplexError
    if cls in (errors.OverloadedError, errors.UnavailableError):
        raise cls(message, retry_after)
    raise cls(message)


def pack_array(values) -> list:
    """A float32 array (numpy, or a CPU tensor) as `[shape, bytes]`."""
    array = np.ascontiguousarray(values, dtype=np.float32)
    return [list(array.shape), array.tobytes()]


def unpack_array(packed: list) -> np.ndarray:
    shape, data = packed
    return np.frombuffer(data, dtype=np.float32).reshape(shape)
