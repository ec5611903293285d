"""POST /classify: texts or text pairs through a sequence-classification adapter; results in input order."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request, Response

from loraplex.http.auth import ApiKeyAuth
from loraplex.http.postprocess import classification
from loraplex.http.routes.inference import (
    body_schema,
    check_batch,
    infer,
    parse_body,
    read_body,
    required_adapter,
    respond,
    tokenizing,
)
from loraplex.http.schemas import ERROR_RESPONSES, ClassifyRequest, ClassifyResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_schema(ClassifyRequest),
)
async def classify(request: Request, _auth: ApiKeyAuth) -> Response:
    """Classify one text (or pair) or a batch with one adapter (`adapter_id`, or the X-Adapter-Id header);
    results in input order."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), ClassifyRequest)
    texts = body.texts()
    chosen = check_batch(request, len(texts), body.adapter_id)
    adapter_id = required_adapter(chosen, "/classify", "a sequence-classification (SEQ_CLS)")
    tokenize = tokenizing(request, texts, body.truncate, body.truncation_direction)
    run = await infer(request, adapter_id, "/classify", tokenize, top_k=body.top_k)
    if run.early is not None:
        return run.early
    results = classification(
        np.stack(run.outputs),
        run.handle,
        raw_scores=body.raw_scores,
        top_k=body.top_k,
        threshold=body.threshold,
    )
    for result, row in zip(results, run.rows, strict=True):
        result["truncated"] = row.truncated
    return respond(request, run, {"results": results}, len(texts))
