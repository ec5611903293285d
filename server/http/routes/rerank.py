"""POST /rerank: a query against texts through a cross-encoder (a one-label SEQ_CLS adapter over pairs)."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request, Response

from loraplex.http.auth import ApiKeyAuth
from loraplex.http.postprocess import check_finite, sigmoid
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
from loraplex.http.schemas import ERROR_RESPONSES, RerankRequest

router = APIRouter(tags=["inference"])


@router.post("/rerank", responses=ERROR_RESPONSES, openapi_extra=body_schema(RerankRequest))
async def rerank(request: Request, _auth: ApiKeyAuth) -> Response:
    """The texts by relevance to the query, best first: sigmoid of the logit of the cross-encoder named
    by `adapter_id` or the X-Adapter-Id header."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), RerankRequest)
    chosen = check_batch(request, len(body.texts), body.adapter_id)
    adapter_id = required_adapter(chosen, "/rerank", "a cross-encoder (a one-output SEQ_CLS)")
    pairs = [(body.query, text) for text in body.texts]
    tokenize = tokenizing(request, pairs, body.truncate, body.truncation_direction)
    run = await infer(request, adapter_id, "/rerank", tokenize)
    if run.early is not None:
        return run.early
    logits = np.stack(run.outputs)[:, 0]  # [texts]
    check_finite(logits, run.handle)
    values = (logits if body.raw_scores else sigmoid(logits)).tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])[: body.top_n]
    results = []
    for i in order:
        result = {"index": i, "score": values[i], "truncated": run.rows[i].truncated}
        if body.return_text:
            result["text"] = body.texts[i]
        results.append(result)
    return respond(request, run, {"results": results}, len(body.texts))
