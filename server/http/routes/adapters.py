"""Adapter routes: upload (create or replace), list, show, delete. The work happens in the Registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loraplex.adapters.errors import (
    BadRequestError,
    InvalidAdapterError,
    OverloadedError,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from loraplex.adapters.store import check_adapter_id
from loraplex.adapters.upload import (
    MAX_CONFIG_BYTES,
    MAX_LABEL_CHARS,
    MAX_LABELS_BYTES,
    limited,
    parse_labels,
)
from loraplex.http.auth import AdminAuth, ApiKeyAuth
from loraplex.http.schemas import ADAPTER_ID_SCHEMA, ERROR_RESPONSES

router = APIRouter(tags=["adapters"])

# `:path` so that ids with '/' (e.g. traversal attempts) reach the allowlist check and get its 422.
AdapterId = Annotated[str, Path(description="the adapter's id", json_schema_extra=dict(ADAPTER_ID_SCHEMA))]
PARTS = ("adapter_config", "adapter_model", "labels")
# The body is parsed by hand (streamed under the upload limit), so its schema is declared for /docs here.
# Whether the weights fit the config (names, shapes, the head's labels) is for the server to check: a
# schema cannot say it, so a well-formed upload of an unusable adapter gets 422 (415 for non-safetensors).
_STRINGS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_CONFIG_PART = {
    "type": "object",
    "description": "PEFT adapter_config.json (a LoRA config), as a file or a text part",
    "properties": {
        "peft_type": {"type": "string", "enum": ["LORA"]},
        "task_type": {"type": ["string", "null"]},
        "r": {"type": "integer", "minimum": 1},
        "lora_alpha": {"type": "number"},
        "target_modules": _STRINGS,
        "base_model_name_or_path": {"type": ["string", "null"]},
    },
}
_MODEL_PART = {
    "type": "string",
    "format": "binary",
    "contentMediaType": "application/octet-stream",
    "description": "PEFT adapter_model.safetensors (safetensors only; anything else: 415)",
}
_LABELS_PART = {
    "type": "string",
    "minLength": 2,
    "maxLength": MAX_LABELS_BYTES,
    "contentMediaType": "application/json",
    "contentSchema": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS},
    },
    "description": 'JSON array of the head\'s label names in order, e.g. ["negative", "positive"]; '
    "default LABEL_0, LABEL_1, ...",
}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["adapter_config", "adapter_model"],
                    "additionalProperties": False,  # any other part: 422
                    "properties": {
                        "adapter_config": _CONFIG_PART,
                        "adapter_model": _MODEL_PART,
                        "labels": _LABELS_PART,
                    },
                },
                "encoding": {
                    "adapter_config": {"contentType": "application/json"},
                    "adapter_model": {"contentType": "application/octet-stream"},
                    "labels": {"contentType": "text/plain"},
                },
            }
        },
    }
}


class AdapterInfo(BaseModel):
    adapter_id: str
    version: str = Field(description="content hash; changes whenever the content changes")
    sha256: str = Field(description="SHA-256 of adapter_model.safetensors")
    rank: int = Field(description="largest LoRA rank over the adapted modules")
    lora_alpha: int | float
    target_modules: list[str]
    num_labels: int
    labels: list[str] = Field(description="label names in head order")
    size_bytes: int = Field(description="size of adapter_model.safetensors")
    created_at: str = Field(description="when this version was stored, ISO 8601 UTC")
    task_type: str | None = Field(
        None,
        description="PEFT's task_type: SEQ_CLS, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION (null: stored "
        "before manifests recorded it; upload it again)",
    )
    routes: list[str] = Field([], description="the inference routes that serve this adapter")
    resident: bool = Field(description="whether this version is in a device slot of this replica")


class UploadInfo(AdapterInfo):
    warnings: list[str] = Field(
        [],
        description="what the upload was accepted despite: its config names another base model, or no label "
        "names were sent (the head's outputs are then LABEL_0, LABEL_1, ...)",
    )


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


UPLOAD_RETRY_AFTER_S = 1


def _client(request: Request):
    return request.app.state.client


@router.put(
    "/adapters/{adapter_id:path}",
    response_model=UploadInfo,
    status_code=201,
    responses={200: {"model": UploadInfo, "description": "replaced"}, **ERROR_RESPONSES},
    summary="Upload (create or replace) an adapter",
    openapi_extra=_UPLOAD_BODY,
)
async def put_adapter(
    adapter_id: AdapterId, request: Request, response: Response, _: AdminAuth
) -> UploadInfo:
    """multipart/form-data: `adapter_config` (file), `adapter_model` (file), optional `labels` (JSON array).

    201 when created, 200 when replaced. Nothing of a rejected upload is stored. Past
    `max_concurrent_uploads` uploads in progress in this worker: 429 with Retry-After.
    """
    state = request.app.state
    if state.uploads >= state.settings.max_concurrent_uploads:
        raise OverloadedError(
            f"{state.uploads} adapter uploads are in progress here, the most this server takes at once; "
            f"retry after the time in Retry-After.",
            UPLOAD_RETRY_AFTER_S,
        )
    state.uploads += 1
    try:
        return await _put_adapter(adapter_id, request, response)
    finally:
        state.uploads -= 1


async def _put_adapter(adapter_id: str, request: Request, response: Response) -> AdapterInfo:
    check_adapter_id(adapter_id)
    limit = request.app.state.settings.max_upload_bytes
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaError(
            "Upload the adapter as multipart/form-data with parts 'adapter_config', 'adapter_model' and "
            "optionally 'labels'."
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The upload is {declared} bytes, over the limit of {limit} bytes.")
    parser = MultiPartParser(
        request.headers,
        limited(request.stream(), limit, "The upload"),
        max_files=len(PARTS),
        max_fields=len(PARTS),
        max_part_size=MAX_LABELS_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "maximum size" in exc.message:
            raise PayloadTooLargeError(f"A text part of the upload is too large: {exc.message}") from None
        if exc.message.startswith("Too many"):
            # The same answer as for one unknown or repeated part: the upload's parts are wrong.
            raise InvalidAdapterError(
                "The upload has more parts than 'adapter_config', 'adapter_model' and 'labels'; "
                "send each once."
            ) from None
        raise BadRequestError(f"The multipart body could not be parsed: {exc.message}") from None
    try:
        unknown = [name for name in form if name not in PARTS]
        if unknown:
            raise InvalidAdapterError(
                f"Unknown part {unknown[0]!r}; the parts are 'adapter_config', 'adapter_model', 'labels'."
            )
        config = await _part(form, "adapter_config", MAX_CONFIG_BYTES)
        model = await _part(form, "adapter_model", limit)
        labels_raw = await _part(form, "labels", MAX_LABELS_BYTES, required=False)
        model_part = form.get("adapter_model")
        filename = model_part.filename if isinstance(model_part, UploadFile) else None
    finally:
        await form.close()
    labels = parse_labels(labels_raw)
    answer = await _client(request).call("put", adapter_id, config, model, labels, filename)
    response.status_code = 201 if answer["created"] else 200
    return UploadInfo(**answer["record"])


@router.get("/adapters", response_model=AdapterList, responses=ERROR_RESPONSES, summary="List adapters")
async def list_adapters(request: Request, _: ApiKeyAuth) -> AdapterList:
    return AdapterList(adapters=[AdapterInfo(**record) for record in await _client(request).call("list")])


@router.get(
    "/adapters/{adapter_id:path}",
    response_model=AdapterInfo,
    responses=ERROR_RESPONSES,
    summary="Show one adapter",
)
async def get_adapter(adapter_id: AdapterId, request: Request, _: ApiKeyAuth) -> AdapterInfo:
    return AdapterInfo(**await _client(request).call("info", adapter_id))


@router.delete(
    "/adapters/{adapter_id:path}", status_code=204, responses=ERROR_RESPONSES, summary="Delete an adapter"
)
async def delete_adapter(adapter_id: AdapterId, request: Request, _: AdminAuth) -> Response:
    """In-flight requests finish on the version they resolved; later requests get 404."""
    await _client(request).call("delete", adapter_id)
    return Response(status_code=204)


async def _part(form: FormData, name: str, limit: int, required: bool = True) -> bytes | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise InvalidAdapterError(f"The upload has {len(values)} parts named {name!r}; send one.")
    if not values:
        if required:
            raise InvalidAdapterError(
                f"The upload has no {name!r} part; send adapter_config (adapter_config.json) and "
                "adapter_model (adapter_model.safetensors) as files."
            )
        return None
    value = values[0]
    data = await value.read(limit + 1) if isinstance(value, UploadFile) else value.encode("utf-8")
    if len(data) > limit:
        raise PayloadTooLargeError(f"The {name!r} part is larger than the limit of {limit} bytes.")
    return data
