"""POST /tokens: texts through a token-classification adapter; each text's entities, in input order."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from loraplex.adapters.peft import TOKEN_CLS
from loraplex.auth import ApiKeyAuth
from loraplex.entities import check_aggregation, entities, token_pieces
from loraplex.inputs import _side, encode
from loraplex.routes.inference import body_schema, check_batch, infer, parse_body, read_body, respond
from loraplex.schemas import ERROR_RESPONSES, TokensRequest, TokensResponse
from loraplex.tasks import check_finite, require_task

router = APIRouter(tags=["inference"])


@router.post(
    "/tokens",
    response_model=TokensResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_schema(TokensRequest),
)
async def tokens(request: Request, _auth: ApiKeyAuth) -> Response:
    """Named entities (or one label per token with aggregation "none") per text, as Hugging Face's
    token-classification pipeline reports them; `start`/`end` are character offsets in the text."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), TokensRequest)
    texts = body.texts()
    check_batch(request, len(texts), body.adapter_id)
    engine = request.app.state.engine
    check_aggregation(body.aggregation, engine.tokenizer)
    pieces = []

    def tokenize(handle):
        require_task(handle, TOKEN_CLS, "/tokens")
        max_length = engine.base.max_length
        rows = encode(
            engine.tokenizer, max_length, texts, truncate=body.truncate, direction=body.truncation_direction
        )
        side = _side(engine.tokenizer, body.truncation_direction)
        pieces.extend(token_pieces(engine.tokenizer, texts, max_length, side))
        return rows

    run = await infer(request, body.adapter_id, tokenize)
    if run.early is not None:
        return run.early

    def aggregate() -> list[list[dict]]:
        results = []
        for logits, row_pieces in zip(run.job.logits, pieces, strict=True):
            check_finite(logits, run.handle)
            labels = run.handle.labels
            results.append(
                entities(row_pieces, logits, labels, engine.tokenizer, body.aggregation, body.ignore_labels)
            )
        return results

    # On the tokenizer's thread: a Python loop over every token, and the tokenizer decodes the words.
    results = await asyncio.get_running_loop().run_in_executor(request.app.state.tokenizer, aggregate)
    truncated = [row.truncated for row in run.rows]
    return respond(request, run, {"results": results, "truncated": truncated}, len(texts))
