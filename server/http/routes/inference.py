"""What every inference route does around its own fields: parse the body, tokenize, send the rows to the
engine process, wait (bounded by request_timeout_s, dropped when the client leaves), and answer with the
timing headers.

    body = parse_body(await read_body(request), request.headers.get("content-type"), EmbedRequest)
    adapter_id = check_batch(request, len(texts), body.adapter_id)  # the body's, the header's or None
    run = await infer(request, adapter_id, "/embed", tokenizing(request, texts, body.truncate, ...))
    return respond(request, run, {"results": ...}, len(texts))

Tokenizing runs on the worker's event loop: with one request's few texts it costs less than a hop to a
thread, and other workers' processes take the load in parallel.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from loraplex import ipc
from loraplex.adapters.errors import (
    BadRequestError,
    InvalidInputError,
    UnavailableError,
    UnsupportedMediaError,
)
from loraplex.http.errors import describe_validation, error_response
from loraplex.http.inputs import encode
from loraplex.http.middleware import ACCESS_KEY

DEADLINE_KEY = "loraplex.deadline"  # scope key: the event loop's time by which the request must be answered
# How long an answer is waited for before the client's connection is watched for a disconnect.
WATCH_AFTER_S = 0.02


@dataclass(frozen=True)
class AdapterView:
    """The adapter version that the engine process resolved and ran for one request."""

    adapter_id: str | None  # None: the base model itself
    version: str
    labels: tuple[str, ...]
    task: str
    problem_type: str | None
    metric_label: str  # the adapter's label in the metrics (bounded: past the limit, "other")


@dataclass
class Run:
    handle: AdapterView | None  # None when `early` answers instead
    rows: list  # what was queued, one per engine row
    outputs: list[np.ndarray]  # per row, what its adapter's task computes (float32)
    started: float
    tokenize_seconds: float
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    early: Response | None = None


def parse_body(raw: bytes, content_type: str | None, model: type[BaseModel]):
    """The body as `model`; 415 for non-JSON, 400 for malformed JSON, 422 for wrong fields."""
    media_type = (content_type or "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaError(f"Send the body as application/json, not {media_type[:80]}.")
    if not raw.strip():
        raise BadRequestError(
            'The request body is empty; send a JSON object like {"adapter_id": ..., "inputs": ...}.'
        )
    try:
        data = orjson.loads(raw)  # strict UTF-8 JSON with 64-bit numbers: nearly every body
    except orjson.JSONDecodeError:
        data = _loads(raw)  # anything else as the standard library reads it, or its error
    if not isinstance(data, dict):
        raise InvalidInputError(
            'The request body must be a JSON object like {"adapter_id": ..., "inputs": ...}.'
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation(exc.errors())) from None


def _loads(raw: bytes):
    """JSON as the standard library reads it (other encodings, big integers, lone surrogates); NaN and
    Infinity refused; every failure a 400 that says where."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise BadRequestError("The request body is not valid UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc.msg} at character {exc.pos}."
        ) from None
    except ValueError as exc:
        raise BadRequestError(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise BadRequestError("The request body nests JSON too deeply.") from None


def check_batch(request: Request, count: int, adapter_id: str | None, what: str = "texts") -> str | None:
    """At most max_client_batch inputs; the adapter that serves the request (`choose_adapter`)."""
    limit = request.app.state.settings.max_client_batch
    if count > limit:
        raise InvalidInputError(f"inputs has {count} {what}; send at most {limit} per request.")
    chosen = choose_adapter(request, adapter_id)
    note_access(request, chosen, count)
    return chosen


def choose_adapter(request: Request, adapter_id: str | None, model: str | None = None) -> str | None:
    """The one rule of every inference route: `adapter_id` in the body, else the X-Adapter-Id header, else
    OpenAI's `model` where it names an adapter (a `model` naming the base model names no adapter, so an
    adapter named by either of the others runs on it). Names that are given and differ are a 422, never
    a silent choice. None: the base model."""
    named = [("adapter_id in the body", adapter_id)]
    routed = request.headers.get("x-adapter-id")
    if routed:
        named.append(("the X-Adapter-Id header", routed))
    named.append(("model", model))
    named = [(where, name) for where, name in named if name is not None]
    for (first, name), (second, other) in zip(named, named[1:], strict=False):
        if name != other:
            raise InvalidInputError(
                f"{second[0].upper() + second[1:]} names {other[:80]!r}, but {first} names {name[:80]!r}; "
                "send one adapter, or the same one in both."
            )
    return named[0][1] if named else None


def required_adapter(adapter_id: str | None, route: str, what: str) -> str:
    """The adapter that `check_batch` chose for `route`; a 422 when neither the body's adapter_id nor the
    X-Adapter-Id header names one (only /embed serves the base model itself)."""
    if adapter_id is None:
        raise InvalidInputError(
            f"adapter_id is required: {route} needs {what} adapter; name it as adapter_id in the body or in "
            "the X-Adapter-Id header."
        )
    return adapter_id


def tokenizing(request: Request, inputs: list, truncate: bool = True, direction: str = "right") -> Callable:
    """What `infer` calls to tokenize the inputs (texts or pairs) with the base's tokenizer: cut at its
    maximum length on the `direction` side, or refused past it when `truncate` is false."""
    base = request.app.state.base
    return lambda: encode(base.tokenizer, base.max_length, inputs, truncate=truncate, direction=direction)


async def read_body(request: Request) -> bytes:
    """The request body, read under the request's deadline (request_timeout_s from now, which `infer`
    keeps): a client that sends its body slowly gets a 400 instead of holding the server (and its drain)."""
    timeout = request.app.state.settings.request_timeout_s
    deadline = request.scope[DEADLINE_KEY] = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            return await request.body()
    except TimeoutError:
        raise BadRequestError(
            f"The request body did not arrive within {timeout:g} s (request_timeout_s); send it at once."
        ) from None


async def infer(
    request: Request,
    adapter_id: str | None,
    route: str,
    tokenize: Callable[[], list],
    *,
    top_k: int | None = None,
) -> Run:
    """Tokenize, queue the rows in the engine process for `adapter_id` (None: the base model) and wait
    for them. The engine checks that the adapter serves `route` (and has `top_k` labels) before queueing."""
    started = time.perf_counter()
    state = request.app.state
    settings = state.settings
    loop = asyncio.get_running_loop()
    deadline = request.scope.get(DEADLINE_KEY) or loop.time() + settings.request_timeout_s
    try:
        if top_k is not None and top_k > settings.max_labels:
            raise InvalidInputError(
                f"top_k is {top_k}, but adapters here have at most {settings.max_labels} labels; send 1..the "
                "adapter's label count."
            )
        rows = tokenize()
    except InvalidInputError:
        # What is wrong with the adapter (missing, of another task) is said first, as if it had been
        # looked up before the inputs: only this error path asks the engine process for it.
        await state.client.call("check", adapter_id, route)
        raise
    tokenize_seconds = time.perf_counter() - started
    state.metrics.tokenize_seconds.observe(tokenize_seconds)
    packed = [[list(row), row.type_start] for row in rows]
    request_id, answer = state.client.send("infer", adapter_id, route, top_k, packed)
    outcome = await _wait(state.client, request_id, answer, request, deadline - loop.time())
    if outcome == "disconnect":
        # Nobody reads this; the status shows up in the request metrics as the client's doing.
        early = error_response(499, "bad_request", "The client disconnected before the results were ready.")
        return Run(None, rows, [], started, tokenize_seconds, early=early)
    if outcome == "timeout":
        raise _timed_out(settings.request_timeout_s)
    result = answer.result()
    handle = _view(result["adapter"])
    outputs = [ipc.unpack_array(packed) for packed in result["outputs"]]
    return Run(handle, rows, outputs, started, tokenize_seconds, result["queue_s"], result["inference_s"])


_views: dict[tuple, AdapterView] = {}
VIEWS_KEPT = 4096  # adapter versions whose views a worker keeps (then it starts again)


def _view(adapter: dict) -> AdapterView:
    """The engine's description of an adapter version as an AdapterView, made once per version: a
    version's labels and task never change, and its metric label is fixed for the engine's life."""
    key = (adapter["adapter_id"], adapter["version"], adapter["metric_label"])
    view = _views.get(key)
    if view is None:
        if len(_views) >= VIEWS_KEPT:
            _views.clear()
        view = _views[key] = AdapterView(**{**adapter, "labels": tuple(adapter["labels"])})
    return view


def respond(request: Request, run: Run, fields: dict | list, inputs: int, *, bare: bool = False) -> Response:
    """200 with `adapter_id`, `adapter_version` and `fields`, the timing headers, the input count metric.
    `bare`: `fields` is the whole body (a peer's shape), and the adapter and its version go in headers."""
    handle = run.handle
    own = {"adapter_id": handle.adapter_id, "adapter_version": handle.version}
    body = fields if bare else {**own, **fields}
    content = orjson.dumps(body)
    metrics = request.app.state.metrics
    metrics.child(metrics.inputs, handle.metric_label).inc(inputs)
    note_access(request, handle.adapter_id, inputs)
    headers = [
        (b"content-length", b"%d" % len(content)),
        (b"content-type", b"application/json"),
        (b"x-tokenization-time", _ms(run.tokenize_seconds)),
        (b"x-queue-time", _ms(run.queue_seconds)),
        (b"x-inference-time", _ms(run.inference_seconds)),
        (b"x-total-time", _ms(time.perf_counter() - run.started)),
    ]
    if bare:  # an adapter id and a version are ASCII (their formats are checked)
        headers.append((b"x-adapter-id", (handle.adapter_id or "").encode()))
        headers.append((b"x-adapter-version", handle.version.encode()))
    return Answer(content, headers)


class Answer(Response):
    """A 200 JSON answer whose headers are given as they go out (lower-case names, bytes)."""

    media_type = "application/json"

    def __init__(self, content: bytes, raw_headers: list[tuple[bytes, bytes]]):
        self.status_code = 200
        self.background = None
        self.body = content
        self.raw_headers = raw_headers


def note_access(request: Request, adapter_id: str | None, rows: int) -> None:
    """What the access log line of this request says about its adapter and its inputs."""
    access = request.scope.get(ACCESS_KEY)
    if access is not None:
        access["adapter"] = adapter_id
        access["rows"] = rows


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that reads its body itself (better messages than FastAPI's)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def _wait(client, request_id: int, answer: asyncio.Future, request: Request, timeout: float) -> str:
    """Wait for the answer unless the client leaves or time runs out: "done", "disconnect" or "timeout".

    Most answers come within milliseconds, so the client's connection is watched (a task reading the next
    ASGI message) only once the answer has been waited for `WATCH_AFTER_S`: a request answered sooner
    costs one future and two timer handles, not a task and its cancellation."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future = loop.create_future()
    watcher: asyncio.Task | None = None

    def wake(outcome: str) -> None:
        if not woken.done():
            woken.set_result(outcome)

    def watch() -> None:
        nonlocal watcher
        if not woken.done():
            watcher = asyncio.ensure_future(_disconnected(request))
            watcher.add_done_callback(lambda task: task.cancelled() or wake("disconnect"))

    answer.add_done_callback(lambda _: wake("done"))
    timer = loop.call_later(max(timeout, 0), wake, "timeout")
    watching = loop.call_later(min(WATCH_AFTER_S, max(timeout, 0)), watch)
    outcome = "cancelled"
    try:
        outcome = await woken
        if outcome == "done":
            answer.result()  # a failed request raises its error here
    finally:
        timer.cancel()
        watching.cancel()
        if watcher is not None:
            watcher.cancel()
        if not answer.done():
            client.cancel(request_id, outcome)
    return outcome


async def _disconnected(request: Request) -> None:
    # The body is read, so the next ASGI message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _timed_out(seconds: float) -> UnavailableError:
    return UnavailableError(
        f"The request did not finish within {seconds:g} s (request_timeout_s) and was dropped; "
        "retry later or send fewer inputs.",
        retry_after=1,
    )


def _ms(seconds: float) -> bytes:
    return b"%d" % round(seconds * 1000)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")
