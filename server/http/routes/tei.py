"""TEI's routes that loraplex did not have, in TEI's shapes: POST /predict (classification of texts and
pairs), POST /tokenize and GET /info. The adapter of /predict is named as on every route: `adapter_id` in
the body, or the X-Adapter-Id header (TEI serves one model, so its clients name none in the body)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from loraplex.console import version
from loraplex.http.auth import ApiKeyAuth
from loraplex.http.postprocess import classification
from loraplex.http.routes.embed import pooling_of
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
from loraplex.http.schemas import (
    ERROR_RESPONSES,
    INPUTS_SCHEMA,
    PROMPT_NAME,
    TEXT_SCHEMA,
    Direction,
    NamedAdapter,
    PromptName,
    adapter_field,
    check_inputs,
    texts_of,
)

router = APIRouter(tags=["tei"])

SEQUENCE_SCHEMA = {"type": "array", "items": TEXT_SCHEMA, "minItems": 1, "maxItems": 2}
PREDICT_INPUTS_SCHEMA = {
    "anyOf": [
        TEXT_SCHEMA,
        {**SEQUENCE_SCHEMA, "x-one-input": True},  # one [text] or [text, text_pair], not a list of inputs
        {"type": "array", "items": SEQUENCE_SCHEMA, "minItems": 1},
    ],
    "description": "TEI's inputs: a text, a pair [text, text_pair], or a batch of 1..max_client_batch "
    "[text] and [text, text_pair] items; no text is empty or contains NUL",
}


class PredictRequest(BaseModel):
    # TEI's clients name no model in the body: theirs names the adapter in the X-Adapter-Id header.
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"required": ["adapter_id", "inputs"]}
    )

    adapter_id: NamedAdapter = adapter_field("the sequence-classification (SEQ_CLS) adapter")
    inputs: Annotated[Any, WithJsonSchema(PREDICT_INPUTS_SCHEMA)]
    truncate: bool = Field(True, description="cut texts longer than the model maximum; false: 422 instead")
    truncation_direction: Direction = Field("right", description="the side a long input is cut on")
    raw_scores: bool = Field(False, description="true: logits; false: probabilities")

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: object) -> object:
        """TEI's reading: a text; a list that starts with a text is one input ([text] or [text, text_pair]);
        a list of lists is a batch. Kept as (items, batched), each item a text or a [text, text_pair]."""
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) > 2:
                raise ValueError(
                    f"is a list of {len(value)} texts; send one text, a pair [text, text_pair], or a batch "
                    "[[text], [text, text_pair], ...]"
                )
            items = [value[0] if len(value) == 1 else value]
            check_inputs(items, pairs=True)
            return items, False
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, list) or not 1 <= len(item) <= 2:
                    raise ValueError(f"[{i}] must be [text] or [text, text_pair] in a batch")
            items = [item[0] if len(item) == 1 else item for item in value]
            check_inputs(items, pairs=True)
            return items, True
        check_inputs(value, pairs=False)
        return [value], False

    def batch(self) -> tuple[list, bool]:
        """(texts and pairs, whether the request was a batch)."""
        items, batched = self.inputs
        return texts_of(items), batched


@router.post("/predict", responses=ERROR_RESPONSES, openapi_extra=body_schema(PredictRequest))
async def predict(request: Request, _auth: ApiKeyAuth) -> Response:
    """TEI's /predict: per input, every label of the adapter with its score, best first; one input gives
    one list, a batch a list per input. The adapter and its version come back in headers."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), PredictRequest)
    texts, batched = body.batch()
    chosen = check_batch(request, len(texts), body.adapter_id)
    adapter_id = required_adapter(chosen, "/predict", "a sequence-classification (SEQ_CLS)")
    tokenize = tokenizing(request, texts, body.truncate, body.truncation_direction)
    run = await infer(request, adapter_id, "/predict", tokenize)
    if run.early is not None:
        return run.early
    results = classification(np.stack(run.outputs), run.handle, raw_scores=body.raw_scores, top_k=None)
    ranked = [
        [
            {"score": score, "label": label}
            for label, score in sorted(r["scores"].items(), key=lambda x: -x[1])
        ]
        for r in results
    ]
    return respond(request, run, ranked if batched else ranked[0], len(texts), bare=True)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: Annotated[str | list[str], WithJsonSchema(INPUTS_SCHEMA)]
    add_special_tokens: bool = Field(True, description="include the tokenizer's [CLS], [SEP], ...")
    prompt_name: PromptName = Field(None, description=PROMPT_NAME)

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        return check_inputs(value, pairs=False)


@router.post("/tokenize", responses=ERROR_RESPONSES, openapi_extra=body_schema(TokenizeRequest))
async def tokenize(request: Request, _auth: ApiKeyAuth) -> Response:
    """TEI's /tokenize: per text, its tokens as the served model's tokenizer makes them (no truncation),
    with `start`/`stop` character offsets (null for special tokens)."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), TokenizeRequest)
    texts = texts_of(body.inputs)
    check_batch(request, len(texts), None)
    tok = request.app.state.base.tokenizer
    special = set(tok.all_special_ids)
    encoded = tok(texts, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
    answer = []
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        tokens = []
        for token_id, (start, stop) in zip(ids, offsets, strict=True):
            is_special = token_id in special and start == stop
            tokens.append(
                {
                    "id": token_id,
                    "text": tok.convert_ids_to_tokens(token_id) if is_special else text[start:stop],
                    "special": is_special,
                    "start": None if is_special else start,
                    "stop": None if is_special else stop,
                }
            )
        answer.append(tokens)
    return Response(orjson.dumps(answer), media_type="application/json")


@router.get("/info", responses=ERROR_RESPONSES, summary="The served model and limits (TEI's /info)")
async def info(request: Request, _auth: ApiKeyAuth) -> dict:
    """TEI's /info fields, and loraplex's own (device, adapter limits)."""
    state = request.app.state
    base, settings = state.base, state.settings
    pooling, _ = pooling_of(request, None, None)
    return {
        "model_id": base.model_name,
        "model_sha": None,
        "model_dtype": base.dtype,
        "model_type": {"embedding": {"pooling": pooling}},
        "max_concurrent_requests": settings.max_queued,
        "max_input_length": base.max_length,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_requests": settings.max_batch_size,
        "max_client_batch_size": settings.max_client_batch,
        "auto_truncate": True,
        "tokenization_workers": None,
        "version": version(),
        "sha": None,
        "docker_label": None,
        "device": base.device,
        "model_family": base.model_type,
        "max_adapter_rank": settings.max_rank,
        "max_adapter_labels": settings.max_labels,
        "adapter_slots": settings.max_resident,
    }
