"""POST /tokens: texts through a token-classification adapter; each text's entities, in input order."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from loraplex.http.auth import ApiKeyAuth
from loraplex.http.entities import check_aggregation, entities, token_pieces
from loraplex.http.inputs import _side
from loraplex.http.postprocess import check_finite
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
from loraplex.http.schemas import ERROR_RESPONSES, TokensRequest, TokensResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/tokens",
    response_model=TokensResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_schema(TokensRequest),
)
async def tokens(request: Request, _auth: ApiKeyAuth) -> Response:
    """Named entities (or one label per token with aggregation "none") per text, as Hugging Face's
    token-classification pipeline reports them; `start`/`end` are character offsets in the text. The
    adapter: `adapter_id`, or the X-Adapter-Id header."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), TokensRequest)
    texts = body.texts()
    chosen = check_batch(request, len(texts), body.adapter_id)
    adapter_id = required_adapter(chosen, "/tokens", "a token-classification (TOKEN_CLS)")
    base = request.app.state.base
    check_aggregation(body.aggregation, base.tokenizer)
    pieces = []

    encode_texts = tokenizing(request, texts, body.truncate, body.truncation_direction)

    def tokenize():
        rows = encode_texts()
        side = _side(base.tokenizer, body.truncation_direction)
        pieces.extend(token_pieces(base.tokenizer, texts, base.max_length, side))
        return rows

    run = await infer(request, adapter_id, "/tokens", tokenize)
    if run.early is not None:
        return run.early
    results = []
    for logits, row_pieces in zip(run.outputs, pieces, strict=True):
        check_finite(logits, run.handle)
        labels = run.handle.labels
        results.append(
            entities(row_pieces, logits, labels, base.tokenizer, body.aggregation, body.ignore_labels)
        )
    truncated = [row.truncated for row in run.rows]
    return respond(request, run, {"results": results, "truncated": truncated}, len(texts))
