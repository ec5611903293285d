"""POST /embed: texts through a FEATURE_EXTRACTION adapter, or the base model itself, pooled as the base's
sentence-transformers config says (or as the request asks). OpenAI's /v1/embeddings is in `openai`."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from fastapi import APIRouter, Request, Response

from loraplex.adapters.errors import InvalidInputError
from loraplex.http.auth import ApiKeyAuth
from loraplex.http.postprocess import check_finite, pool, sentence_pooling
from loraplex.http.routes.inference import (
    body_schema,
    check_batch,
    infer,
    parse_body,
    read_body,
    respond,
    tokenizing,
)
from loraplex.http.schemas import ERROR_RESPONSES, EmbedRequest

router = APIRouter(tags=["inference"])


@router.post("/embed", responses=ERROR_RESPONSES, openapi_extra=body_schema(EmbedRequest))
async def embed(request: Request, _auth: ApiKeyAuth) -> Response:
    """One vector per text, in input order; no adapter (neither adapter_id nor X-Adapter-Id): the base
    model's own embeddings."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), EmbedRequest)
    texts = body.texts()
    adapter_id = check_batch(request, len(texts), body.adapter_id)
    check_dimensions(request, body.dimensions)
    tokenize = tokenizing(request, texts, body.truncate, body.truncation_direction)
    run = await infer(request, adapter_id, "/embed", tokenize)
    if run.early is not None:
        return run.early
    pooling, normalize = pooling_of(request, body.pooling, body.normalize)
    vectors = [v.tolist() for v in embeddings(run, pooling, normalize)]
    results = [{"embedding": v, "truncated": row.truncated} for v, row in zip(vectors, run.rows, strict=True)]
    return respond(request, run, {"pooling": pooling, "normalize": normalize, "results": results}, len(texts))


def check_dimensions(request: Request, dimensions: int | None) -> None:
    """`dimensions` may only repeat the model's own: cutting a vector short is only meaningful for models
    trained for it (Matryoshka), and nothing here says whether an adapter was."""
    own = request.app.state.base.hidden_size
    if dimensions is not None and dimensions != own:
        raise InvalidInputError(
            f"dimensions is {dimensions}, but this model's embeddings have {own} dimensions and are never "
            f"shortened; leave dimensions out (or send {own})."
        )


def pooling_of(request: Request, pooling: str | None, normalize: bool | None) -> tuple[str, bool]:
    default_pooling, default_normalize = _declared(request.app.state.base.model_dir)
    return pooling or default_pooling, default_normalize if normalize is None else normalize


@lru_cache(maxsize=4)
def _declared(model_dir: str) -> tuple[str, bool]:
    return sentence_pooling(model_dir)


def embeddings(run, pooling: str, normalize: bool) -> list[np.ndarray]:
    """One float32 vector per row of `run`, pooled; a 409 naming the adapter if any is not finite."""
    vectors = [pool(hidden, pooling, normalize) for hidden in run.outputs]
    for vector in vectors:
        check_finite(vector, run.handle)
    return vectors
