"""What every inference route does around its own fields: parse the body, resolve the adapter, tokenize
off the event loop, queue the rows, wait (bounded by request_timeout_s, dropped when the client leaves),
and answer with the timing headers.

    body = parse_body(await read_body(request), request.headers.get("content-type"), EmbedRequest)
    run = await infer(request, body.adapter_id, lambda handle: rows)
    return respond(request, run, {"results": ...})
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError

from loraplex.adapters.errors import (
    BadRequestError,
    InvalidInputError,
    UnavailableError,
    UnsupportedMediaError,
)
from loraplex.adapters.peft import FEATURE_EXTRACTION, AdapterWeights
from loraplex.batcher import Batcher, Job
from loraplex.errors import describe_validation, error_response

# The base model itself, for /embed without an adapter: an adapter without LoRA or head in a slot of its own.
BASE_WEIGHTS = AdapterWeights(
    modules={},
    head={},
    num_labels=0,
    labels=(),
    rank=0,
    lora_alpha=0.0,
    target_modules=(),
    task=FEATURE_EXTRACTION,
)


@dataclass(frozen=True)
class BaseHandle:
    """The served base model as a handle; its key is no adapter's (adapter ids are never empty)."""

    adapter_id: None = None
    version: str = "base"
    labels: tuple[str, ...] = ()
    weights: AdapterWeights = BASE_WEIGHTS

    @property
    def key(self) -> tuple[str, str]:
        return ("", self.version)


@dataclass
class Run:
    handle: object  # AdapterHandle, or BaseHandle
    rows: list  # what was queued, one per engine row
    job: Job | None  # None: the client left or time ran out (`early` is the answer)
    started: float
    tokenize_seconds: float
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
        data = json.loads(raw, parse_constant=_reject_constant)
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
    if not isinstance(data, dict):
        raise InvalidInputError(
            'The request body must be a JSON object like {"adapter_id": ..., "inputs": ...}.'
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation(exc.errors())) from None


def check_batch(request: Request, count: int, adapter_id: str | None, what: str = "texts") -> None:
    """At most max_client_batch inputs; an X-Adapter-Id header names the body's adapter."""
    limit = request.app.state.settings.max_client_batch
    if count > limit:
        raise InvalidInputError(f"inputs has {count} {what}; send at most {limit} per request.")
    routed = request.headers.get("x-adapter-id")
    if routed is not None and routed != (adapter_id or ""):
        raise InvalidInputError(
            "The X-Adapter-Id header names a different adapter than adapter_id in the body."
        )


async def read_body(request: Request) -> bytes:
    """The request body, read under the request's deadline (request_timeout_s from now, which `infer`
    keeps): a client that sends its body slowly gets a 400 instead of holding the server (and its drain)."""
    timeout = request.app.state.settings.request_timeout_s
    request.state.deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(request.state.deadline):
            return await request.body()
    except TimeoutError:
        raise BadRequestError(
            f"The request body did not arrive within {timeout:g} s (request_timeout_s); send it at once."
        ) from None


async def infer(request: Request, adapter_id: str | None, tokenize: Callable[[object], list]) -> Run:
    """Resolve the adapter (None: the base model), run `tokenize(handle)` on the tokenizer thread, queue
    its rows and wait for them. `tokenize` may raise a LoraplexError (checks that need the adapter)."""
    started = time.perf_counter()
    state = request.app.state
    settings = state.settings
    loop = asyncio.get_running_loop()
    deadline = getattr(request.state, "deadline", None) or loop.time() + settings.request_timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            handle = BaseHandle() if adapter_id is None else await state.registry.get(adapter_id)
            tokenize_started = time.perf_counter()
            rows = await loop.run_in_executor(state.tokenizer, tokenize, handle)
    except TimeoutError:
        raise _timed_out(settings.request_timeout_s) from None
    tokenize_seconds = time.perf_counter() - tokenize_started
    state.metrics.tokenize_seconds.observe(tokenize_seconds)

    job = state.batcher.submit(rows, handle)
    outcome = await _wait(state.batcher, job, request, deadline - loop.time())
    run = Run(handle, rows, job, started, tokenize_seconds)
    if outcome == "disconnect":
        # Nobody reads this; the status shows up in the request metrics as the client's doing.
        run.early = error_response(
            499, "bad_request", "The client disconnected before the results were ready."
        )
    elif outcome == "timeout":
        raise _timed_out(settings.request_timeout_s)
    return run


def respond(request: Request, run: Run, fields: dict, inputs: int) -> Response:
    """200 with `adapter_id`, `adapter_version` and `fields`, the timing headers, the input count metric."""
    metrics = request.app.state.metrics
    handle = run.handle
    body = {"adapter_id": handle.adapter_id, "adapter_version": handle.version, **fields}
    content = json.dumps(body, allow_nan=False)
    metrics.inputs.labels(metrics.adapter_label(handle.adapter_id or "(base model)")).inc(inputs)
    headers = {
        "x-tokenization-time": _ms(run.tokenize_seconds),
        "x-queue-time": _ms(run.job.queue_seconds),
        "x-inference-time": _ms(run.job.inference_seconds),
        "x-total-time": _ms(time.perf_counter() - run.started),
    }
    return Response(content, media_type="application/json", headers=headers)


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that reads its body itself (better messages than FastAPI's)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def _wait(batcher: Batcher, job: Job, request: Request, timeout: float) -> str:
    """Wait for the job unless the client leaves or time runs out: "done", "disconnect" or "timeout"."""
    watcher = asyncio.ensure_future(_disconnected(request))
    outcome = "cancelled"
    try:
        done, _ = await asyncio.wait(
            (job.future, watcher), timeout=max(timeout, 0), return_when="FIRST_COMPLETED"
        )
        if job.future in done:
            job.future.result()  # a failed batch raises its error here
            outcome = "done"
        else:
            outcome = "disconnect" if watcher in done else "timeout"
    finally:
        watcher.cancel()
        if not job.future.done():
            batcher.cancel(job, outcome)
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


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))
