"""OpenAI's embeddings API: POST /v1/embeddings, GET /v1/models and GET /v1/models/{model}, in the shapes
the official SDK reads (errors on /v1/* too: `loraplex.http.middleware`). `model` names an adapter, or the
served base model for no adapter."""

from __future__ import annotations

import base64
import time
from datetime import datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field

from loraplex.adapters.errors import NotFoundError
from loraplex.adapters.store import ADAPTER_ID_RE
from loraplex.http.auth import ApiKeyAuth
from loraplex.http.routes.embed import check_dimensions, embeddings, pooling_of
from loraplex.http.routes.inference import (
    body_schema,
    check_batch,
    choose_adapter,
    infer,
    note_access,
    parse_body,
    read_body,
    respond,
    tokenizing,
)
from loraplex.http.schemas import OPENAI_ERROR_RESPONSES, OpenAIEmbeddingsRequest

router = APIRouter(tags=["openai"])
BASE_ROUTES = ["/embed", "/v1/embeddings"]


@router.post(
    "/v1/embeddings", responses=OPENAI_ERROR_RESPONSES, openapi_extra=body_schema(OpenAIEmbeddingsRequest)
)
async def openai_embeddings(request: Request, _auth: ApiKeyAuth) -> Response:
    """OpenAI's embeddings shape; `encoding_format` "base64" gives each vector's little-endian float32
    bytes, base64-encoded (what the SDK asks for by default)."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), OpenAIEmbeddingsRequest)
    texts = [body.input] if isinstance(body.input, str) else body.input
    model = None if names_base(request, body.model) else body.model
    check_batch(request, len(texts), None)
    adapter_id = choose_adapter(request, None, model)  # OpenAI's body names the adapter in `model`
    note_access(request, adapter_id, len(texts))
    check_dimensions(request, body.dimensions)
    run = await infer(request, adapter_id, "/v1/embeddings", tokenizing(request, texts))
    if run.early is not None:
        return run.early
    vectors = embeddings(run, *pooling_of(request, None, None))
    if body.encoding_format == "base64":
        encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        encoded = [v.astype(np.float32).tolist() for v in vectors]
    tokens = sum(len(row) for row in run.rows)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encoded)]
    fields = {"object": "list", "data": data, "model": body.model}
    fields["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return respond(request, run, fields, len(texts))


def names_base(request: Request, model: str) -> bool:
    """Whether `model` names the served base model (its full name or its last part)."""
    name = request.app.state.base.model_name
    return model in (name, name.rstrip("/").rsplit("/", 1)[-1])


class Model(BaseModel):
    id: str = Field(description="what `model` names: an adapter id, or the base model's name")
    object: str = "model"
    created: int = Field(
        description="Unix time: when the adapter's version was stored (the base: server start)"
    )
    owned_by: str = "loraplex"
    task_type: str | None = Field(description="PEFT's task_type; the base model: FEATURE_EXTRACTION")
    routes: list[str] = Field(description="the inference routes that serve it")
    version: str | None = Field(None, description="an adapter's current version")


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]


@router.get("/v1/models", response_model=ModelList, responses=OPENAI_ERROR_RESPONSES, summary="List models")
async def list_models(request: Request, _auth: ApiKeyAuth) -> ModelList:
    """The base model (embeddings) and every adapter, each with its task and routes."""
    records = await request.app.state.client.call("list")
    return ModelList(data=[_base_model(request), *(_adapter_model(r) for r in records)])


ModelId = Annotated[str, Path(description="an adapter id or the base model's name")]


@router.get(
    "/v1/models/{model:path}", response_model=Model, responses=OPENAI_ERROR_RESPONSES, summary="Show a model"
)
async def get_model(model: ModelId, request: Request, _auth: ApiKeyAuth) -> Model:
    if names_base(request, model):
        return _base_model(request)
    if not ADAPTER_ID_RE.fullmatch(model):
        raise NotFoundError(f"There is no model or adapter named {model[:80]!r}.")
    return _adapter_model(await request.app.state.client.call("info", model))


def _base_model(request: Request) -> Model:
    state = request.app.state
    return Model(
        id=state.base.model_name,
        created=int(state.started_at),
        task_type="FEATURE_EXTRACTION",
        routes=BASE_ROUTES,
    )


def _adapter_model(record: dict) -> Model:
    try:
        created = int(datetime.fromisoformat(record["created_at"].replace("Z", "+00:00")).timestamp())
    except (ValueError, TypeError):
        created = int(time.time())
    return Model(
        id=record["adapter_id"],
        created=created,
        task_type=record.get("task_type"),
        routes=record.get("routes") or [],
        version=record["version"],
    )
