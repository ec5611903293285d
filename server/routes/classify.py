"""POST /classify: parse and check the body, resolve the adapter, tokenize, queue, wait, answer."""

from __future__ import annotations

import asyncio
import json
import time

import torch
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from loraplex.adapters.errors import (
    BadRequestError,
    InvalidAdapterError,
    InvalidInputError,
    UnavailableError,
    UnsupportedMediaError,
)
from loraplex.auth import ApiKeyAuth
from loraplex.batcher import Batcher, Job
from loraplex.errors import describe_validation, error_response
from loraplex.schemas import ERROR_RESPONSES, ClassifyRequest, ClassifyResponse

router = APIRouter(tags=["inference"])

_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}},
    }
}


@router.post(
    "/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES, openapi_extra=_BODY_SCHEMA
)
async def classify(request: Request, _auth: ApiKeyAuth) -> Response:
    """Classify one text or a batch with one adapter; results in input order."""
    started = time.perf_counter()
    state = request.app.state
    settings = state.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s

    body = parse_body(await request.body(), request.headers.get("content-type"))
    texts = body.texts()
    if len(texts) > settings.max_client_batch:
        raise InvalidInputError(
            f"inputs has {len(texts)} texts; send at most {settings.max_client_batch} per request."
        )
    routed = request.headers.get("x-adapter-id")
    if routed is not None and routed != body.adapter_id:
        raise InvalidInputError(
            "The X-Adapter-Id header names a different adapter than adapter_id in the body."
        )

    try:
        async with asyncio.timeout_at(deadline):
            handle = await state.registry.get(body.adapter_id)
            tokenize_started = time.perf_counter()
            token_ids = await loop.run_in_executor(
                state.tokenizer, state.engine.tokenize, texts, body.truncate
            )
    except TimeoutError:
        raise _timed_out(settings.request_timeout_s) from None
    tokenized = time.perf_counter()
    state.metrics.tokenize_seconds.observe(tokenized - tokenize_started)

    job = state.batcher.submit(token_ids, handle)
    outcome = await _wait(state.batcher, job, request, deadline - loop.time())
    if outcome == "disconnect":
        # Nobody reads this; the status shows up in the request metrics as the client's doing.
        return error_response(499, "bad_request", "The client disconnected before the results were ready.")
    if outcome == "timeout":
        raise _timed_out(settings.request_timeout_s)

    content = json.dumps(
        {
            "adapter_id": handle.adapter_id,
            "adapter_version": handle.version,
            "results": _results(job, handle, body.raw_scores),
        },
        allow_nan=False,
    )
    state.metrics.inputs.labels(state.metrics.adapter_label(handle.adapter_id)).inc(len(texts))
    headers = {
        "x-tokenization-time": _ms(tokenized - tokenize_started),
        "x-queue-time": _ms(job.queue_seconds),
        "x-inference-time": _ms(job.inference_seconds),
        "x-total-time": _ms(time.perf_counter() - started),
    }
    return Response(content, media_type="application/json", headers=headers)


def parse_body(raw: bytes, content_type: str | None) -> ClassifyRequest:
    """The body as a ClassifyRequest; 415 for non-JSON, 400 for malformed JSON, 422 for wrong fields."""
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
        return ClassifyRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation(exc.errors())) from None


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


def _results(job: Job, handle, raw_scores: bool) -> list[dict]:
    logits = torch.stack(job.logits)  # [inputs, num_labels]
    if not torch.isfinite(logits).all():
        # Finite weights can still overflow float32; the adapter, not the request, has to change.
        raise InvalidAdapterError(
            f"Adapter {handle.adapter_id!r} (version {handle.version}) gives non-finite scores for these "
            "inputs: its weights overflow float32. Upload a corrected adapter."
        )
    labels = handle.labels
    values = logits if raw_scores else torch.softmax(logits, dim=-1)
    best = values.argmax(dim=-1).tolist()
    return [
        {"label": labels[b], "score": row[b], "scores": dict(zip(labels, row, strict=True))}
        for row, b in zip(values.tolist(), best, strict=True)
    ]


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
