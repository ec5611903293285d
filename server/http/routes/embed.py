"""POST /embed and OpenAI's POST /v1/embeddings: texts through a FEATURE_EXTRACTION adapter, or the base
model itself, pooled as the base's sentence-transformers config says (or as the request asks)."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter, Request, Response

from loraplex.http.auth import ApiKeyAuth
from loraplex.http.inputs import encode
from loraplex.http.postprocess import check_finite, pool, sentence_pooling
from loraplex.http.routes.inference import body_schema, check_batch, infer, parse_body, read_body, respond
from loraplex.http.schemas import ERROR_RESPONSES, EmbedRequest, OpenAIEmbeddingsRequest

router = APIRouter(tags=["inference"])


@router.post("/embed", responses=ERROR_RESPONSES, openapi_extra=body_schema(EmbedRequest))
async def embed(request: Request, _auth: ApiKeyAuth) -> Response:
    """One vector per text, in input order; no adapter_id: the base model's own embeddings."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), EmbedRequest)
    texts = body.texts()
    check_batch(request, len(texts), body.adapter_id)
    run = await infer(request, body.adapter_id, "/embed", _tokenizer(request, texts, body))
    if run.early is not None:
        return run.early
    pooling, normalize = _pooling(request, body.pooling, body.normalize)
    vectors = _vectors(run, pooling, normalize)
    results = [{"embedding": v, "truncated": row.truncated} for v, row in zip(vectors, run.rows, strict=True)]
    return respond(request, run, {"pooling": pooling, "normalize": normalize, "results": results}, len(texts))


@router.post("/v1/embeddings", responses=ERROR_RESPONSES, openapi_extra=body_schema(OpenAIEmbeddingsRequest))
async def openai_embeddings(request: Request, _auth: ApiKeyAuth) -> Response:
    """OpenAI's embeddings shape; `model` is an adapter id, or the served base model's name for no adapter."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), OpenAIEmbeddingsRequest)
    texts = [body.input] if isinstance(body.input, str) else body.input
    base = request.app.state.base.model_name
    adapter_id = None if body.model in (base, base.rsplit("/", 1)[-1]) else body.model
    check_batch(request, len(texts), adapter_id)
    run = await infer(request, adapter_id, "/v1/embeddings", _tokenizer(request, texts, None))
    if run.early is not None:
        return run.early
    vectors = _vectors(run, *_pooling(request, None, None))
    tokens = sum(len(row) for row in run.rows)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    fields = {"object": "list", "data": data, "model": body.model}
    fields["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return respond(request, run, fields, len(texts))


def _tokenizer(request: Request, texts: list[str], body: EmbedRequest | None):
    base = request.app.state.base

    def tokenize():
        return encode(
            base.tokenizer,
            base.max_length,
            texts,
            truncate=body.truncate if body else True,
            direction=body.truncation_direction if body else "right",
        )

    return tokenize


def _pooling(request: Request, pooling: str | None, normalize: bool | None) -> tuple[str, bool]:
    default_pooling, default_normalize = _declared(request.app.state.base.model_dir)
    return pooling or default_pooling, default_normalize if normalize is None else normalize


@lru_cache(maxsize=4)
def _declared(model_dir: str) -> tuple[str, bool]:
    return sentence_pooling(model_dir)


def _vectors(run, pooling: str, normalize: bool) -> list[list[float]]:
    vectors = [pool(hidden, pooling, normalize) for hidden in run.outputs]
    for vector in vectors:
        check_finite(vector, run.handle)
    return [vector.tolist() for vector in vectors]
