"""Request and response bodies of the inference and operations routes."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from loraplex.adapters.store import ADAPTER_ID_RE

_SURROGATE = re.compile("[\ud800-\udfff]")

# What the server accepts, stated for /openapi.json (the checks themselves are in the validators below,
# which give better messages). The list's maxItems is the server's max_client_batch, set in openapi.py.
ADAPTER_ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": ADAPTER_ID_RE.pattern}
TEXT_SCHEMA = {"type": "string", "minLength": 1, "pattern": r"^[^\x00]*$"}
INPUTS_SCHEMA = {
    "anyOf": [TEXT_SCHEMA, {"type": "array", "items": TEXT_SCHEMA, "minItems": 1}],
    "description": "one text, or a list of 1..max_client_batch texts; no text is empty or contains NUL",
}
PAIR_SCHEMA = {"type": "array", "items": TEXT_SCHEMA, "minItems": 2, "maxItems": 2}
PAIR_INPUTS_SCHEMA = {
    "anyOf": [TEXT_SCHEMA, {"type": "array", "items": {"anyOf": [TEXT_SCHEMA, PAIR_SCHEMA]}, "minItems": 1}],
    "description": "one text, or a list of 1..max_client_batch items, each a text or a pair "
    "[text, text_pair]; no text is empty or contains NUL",
}


def _direction(value: object) -> object:
    # TEI spells the sides "Right" and "Left"; both spellings mean the same.
    return value.lower() if value in ("Right", "Left") else value


Direction = Annotated[
    Literal["right", "left"],
    BeforeValidator(_direction),
    WithJsonSchema({"type": "string", "enum": ["right", "left", "Right", "Left"], "default": "right"}),
]


def _whole(value: object) -> object:
    # JSON Schema's integer includes 16.0, so the server takes it too; 16.5 and "16" stay errors.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[int, Field(ge=1), BeforeValidator(_whole)]  # a positive whole number


def _no_prompt(value: object) -> object:
    if value is not None:
        raise ValueError("is not supported: this server has no prompts configured; leave it out")
    return value


# TEI's `prompt_name` (/embed, /tokenize) names a prompt of the model's sentence-transformers config; none
# is configured here, so it may only be null.
PromptName = Annotated[None, BeforeValidator(_no_prompt)]
PROMPT_NAME = "TEI's field; no prompts are configured, so only null"

# The adapter of a route that needs one. The document asks for it in the body, which a schema can check; a
# body without it is served too when the X-Adapter-Id header names the adapter (`required_adapter`).
NamedAdapter = Annotated[str | None, WithJsonSchema(ADAPTER_ID_SCHEMA)]


def adapter_field(what: str) -> Any:
    """The `adapter_id` field of a NamedAdapter: documented as `what`, or the header; no default shown (a
    null one would contradict the schema's string)."""
    return Field(
        None,
        max_length=64,
        description=f"{what}; or leave it out and name it in the X-Adapter-Id header",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )


class ClassifyRequest(BaseModel):
    # strict: `"inputs": 5` or `"truncate": "yes"` is a client error, not something to coerce.
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"required": ["adapter_id", "inputs"]}
    )

    adapter_id: NamedAdapter = adapter_field("the adapter (task) to classify with")
    inputs: Annotated[Any, WithJsonSchema(PAIR_INPUTS_SCHEMA)]
    truncate: bool = Field(True, description="cut texts longer than the model maximum; false: 422 instead")
    truncation_direction: Direction = Field("right", description="the side a long input is cut on")
    raw_scores: bool = Field(False, description="true: logits; false: probabilities")
    top_k: Count | None = Field(None, description="add `top`: the k best labels, best first")
    threshold: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False, description="multi-label adapters: `labels` scoring >= this"
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        return check_inputs(value, pairs=True)

    def texts(self) -> list[str | tuple[str, str]]:
        return texts_of(self.inputs)


class TextsRequest(BaseModel):
    """/embed and /tokens: an optional adapter and texts (no pairs)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter_id: Annotated[str | None, WithJsonSchema({"anyOf": [ADAPTER_ID_SCHEMA, {"type": "null"}]})] = (
        Field(None, max_length=64)
    )
    inputs: Annotated[str | list[str], WithJsonSchema(INPUTS_SCHEMA)]
    truncate: bool = Field(True, description="cut texts longer than the model maximum; false: 422 instead")
    truncation_direction: Direction = Field("right", description="the side a long input is cut on")

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        return check_inputs(value, pairs=False)

    def texts(self) -> list[str]:
        return texts_of(self.inputs)


class EmbedRequest(TextsRequest):
    pooling: Literal["mean", "cls", "max"] | None = Field(
        None, description="how token vectors become one; default: the base's sentence-transformers config"
    )
    normalize: bool | None = Field(
        None, description="unit length; default: the base's sentence-transformers config"
    )
    dimensions: Count | None = Field(
        None, description="the model's own dimension only (vectors are never cut); other values: 422"
    )
    prompt_name: PromptName = Field(None, description=PROMPT_NAME)


class TokensRequest(TextsRequest):
    """/tokens: entities per text, as Hugging Face's token-classification pipeline reports them."""

    model_config = ConfigDict(json_schema_extra={"required": ["adapter_id", "inputs"]})

    adapter_id: NamedAdapter = adapter_field("the token-classification (TOKEN_CLS) adapter")
    aggregation: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple",
        description="how tokens become entities, as the token-classification pipeline does (default "
        '"simple": B-/I- tags grouped); "none": every token with its label and index; "first", "average", '
        '"max": the pieces of a word agree on one label (fast tokenizers only)',
    )
    ignore_labels: list[Annotated[str, Field(max_length=256)]] = Field(
        ["O"], max_length=256, description='labels never reported as entities (default ["O"])'
    )


class OpenAIEmbeddingsRequest(BaseModel):
    """POST /v1/embeddings in OpenAI's shape; `model` is an adapter id or the served base model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(max_length=256, description="an adapter id; the base model's name: no adapter")
    input: Annotated[str | list[str], WithJsonSchema(INPUTS_SCHEMA)]
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector's little-endian float32 bytes, base64-encoded"
    )
    dimensions: Count | None = Field(
        None, description="the model's own dimension only (vectors are never cut); other values: 422"
    )
    user: str | None = Field(None, max_length=256)

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        return check_inputs(value, pairs=False)


class RerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"required": ["adapter_id", "query", "texts"]}
    )

    adapter_id: NamedAdapter = adapter_field("the cross-encoder (a one-output SEQ_CLS adapter)")
    query: Annotated[str, WithJsonSchema(TEXT_SCHEMA)]
    texts: Annotated[list[str], WithJsonSchema({"type": "array", "items": TEXT_SCHEMA, "minItems": 1})]
    top_n: Count | None = Field(None, description="only the n best texts")
    return_text: bool = Field(False, description="include each text in its result")
    raw_scores: bool = Field(False, description="true: logits; false: the adapter's probabilities")
    truncate: bool = True
    truncation_direction: Direction = "right"

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: object) -> object:
        return check_inputs(value, pairs=False)

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError("must be a list of strings, not a single string")
        return check_inputs(value, pairs=False)


QA_SCHEMA = {
    "type": "object",
    "properties": {"question": TEXT_SCHEMA, "context": TEXT_SCHEMA},
    "required": ["question", "context"],
    "additionalProperties": False,
}
QA_INPUTS_SCHEMA = {
    "anyOf": [QA_SCHEMA, {"type": "array", "items": QA_SCHEMA, "minItems": 1}],
    "description": 'one {"question": ..., "context": ...} object or a list of 1..max_client_batch of them; '
    "no text is empty or contains NUL",
}
Stride = Annotated[int, Field(ge=0), BeforeValidator(_whole)]


class AnswerRequest(BaseModel):
    """/answer: questions answered by spans of their contexts, as Hugging Face's question-answering
    pipeline answers them."""

    # `inputs`, or one `question` with its `context`: never both shapes in one body.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "required": ["adapter_id"],
            "anyOf": [
                {
                    "required": ["inputs"],
                    "not": {"anyOf": [{"required": ["question"]}, {"required": ["context"]}]},
                },
                {"required": ["question", "context"], "not": {"required": ["inputs"]}},
            ],
        },
    )

    adapter_id: NamedAdapter = adapter_field("a QUESTION_ANS adapter")
    inputs: Annotated[Any, WithJsonSchema(QA_INPUTS_SCHEMA)] = None
    question: Annotated[str | None, WithJsonSchema(TEXT_SCHEMA)] = Field(
        None, description="one question, with `context` (instead of `inputs`)"
    )
    context: Annotated[str | None, WithJsonSchema(TEXT_SCHEMA)] = Field(
        None, description="the context of `question` (instead of `inputs`)"
    )
    top_k: Count = Field(1, description="the k best answers per input, best first")
    doc_stride: Stride = Field(
        128, description="tokens that consecutive windows of a long context share; below the room per window"
    )
    max_answer_len: Count = Field(15, description="longest answer, in tokens")
    max_question_len: Count = Field(64, description="a longer question is cut to this many tokens")
    max_seq_len: Count | None = Field(
        None, description="tokens per window (question, context slice, special tokens); default: the model's"
    )
    handle_impossible_answer: bool = Field(
        False, description='rank the null answer ("", start 0, end 0) with the spans'
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        return check_qa_inputs(value)

    @field_validator("question", "context", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        _check_text(value, "")
        return value

    @model_validator(mode="after")
    def _one_shape(self) -> AnswerRequest:
        top_level = self.question is not None or self.context is not None
        if self.inputs is not None and top_level:
            raise ValueError("send either inputs, or question and context, not both")
        if self.inputs is None:
            if self.question is None or self.context is None:
                missing = "inputs" if not top_level else "context" if self.context is None else "question"
                raise ValueError(
                    f"{missing} is required: send question and context, or inputs (a list of "
                    '{"question": ..., "context": ...} objects)'
                )
            self.inputs = {"question": self.question, "context": self.context}
        return self

    def pairs(self) -> list[tuple[str, str]]:
        items = [self.inputs] if isinstance(self.inputs, dict) else self.inputs
        return [(item["question"], item["context"]) for item in items]


def check_inputs(value: object, *, pairs: bool) -> object:
    """Texts (and with `pairs`, [text, text_pair] items) that are non-empty, NUL-free valid Unicode."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ValueError(f"must be a string or a list of strings, not {_json_type(value)}")
    if not texts:
        raise ValueError("is an empty list; send at least one text")
    for i, item in enumerate(texts):
        where = "" if isinstance(value, str) else f"[{i}] "
        if pairs and isinstance(item, list):
            if len(item) != 2:
                raise ValueError(f"{where}is a list of {len(item)} items; a pair is [text, text_pair]")
            for j, text in enumerate(item):
                _check_text(text, f"{where.rstrip()}[{j}] " if where else f"[{j}] ")
        else:
            _check_text(item, where)
    return value


def check_qa_inputs(value: object) -> object:
    """One {"question", "context"} object or a non-empty list of them; both texts as `check_inputs` wants."""
    items = [value] if isinstance(value, dict) else value
    shape = '{"question": ..., "context": ...} object'
    if not isinstance(items, list):
        raise ValueError(f"must be a {shape} or a list of them, not {_json_type(value)}")
    if not items:
        raise ValueError("is an empty list; send at least one question")
    for i, item in enumerate(items):
        where = "" if isinstance(value, dict) else f"[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be a {shape}, not {_json_type(item)}")
        extra = sorted(set(item) - {"question", "context"})
        if extra:
            raise ValueError(f"{where}.{extra[0][:40]} is not a field of an input; send question and context")
        for name in ("question", "context"):
            if name not in item:
                raise ValueError(f"{where}.{name} is required")
            _check_text(item[name], f"{where}.{name} ")
    return value


def _check_text(text: object, where: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where}must be a string, not {_json_type(text)}")
    if not text:
        raise ValueError(f"{where}is an empty string; send some text")
    if "\x00" in text:
        raise ValueError(f"{where}contains a NUL character")
    if not text.isascii() and _SURROGATE.search(text):
        raise ValueError(f"{where}contains a lone surrogate, which is not valid Unicode")


def texts_of(inputs: str | list) -> list:
    items = [inputs] if isinstance(inputs, str) else inputs
    return [tuple(item) if isinstance(item, list) else item for item in items]


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float] = Field(description="every label of the adapter, in its label order")
    truncated: bool = Field(description="whether the input was cut to the model's maximum length")
    labels: list[str] | None = Field(None, description="multi-label adapters: labels scoring >= threshold")
    top: list[LabelScore] | None = Field(None, description="with top_k: the k best labels, best first")


class ClassifyResponse(BaseModel):
    adapter_id: str
    adapter_version: str = Field(description="the adapter version that computed every result")
    results: list[ClassifyResult] = Field(description="one per input, in input order")


class Answer(BaseModel):
    answer: str = Field(description="the span of the context; empty for the null answer")
    score: float = Field(description="p_start * p_end (the null answer: of the CLS token)")
    start: int = Field(description="first character of the span in the context")
    end: int = Field(description="one past its last character (the null answer: 0 and 0)")


class AnswerResponse(BaseModel):
    adapter_id: str
    adapter_version: str = Field(description="the adapter version that computed every result")
    results: list[list[Answer]] = Field(
        description="per input, in input order: up to top_k answers, best first"
    )


class TokenEntity(BaseModel):
    entity_group: str | None = Field(None, description="aggregated: the entity type (B-PER, I-PER -> PER)")
    entity: str | None = Field(None, description='aggregation "none": the token\'s label')
    score: float = Field(description="the label's probability (a group: the mean of its members')")
    word: str = Field(description="the tokens joined as the tokenizer decodes them")
    start: int | None = Field(description="first character in the input text; null without offsets")
    end: int | None = Field(description="one past the last character")
    index: int | None = Field(None, description='aggregation "none": the token\'s position in the input')


class TokensResponse(BaseModel):
    adapter_id: str
    adapter_version: str = Field(description="the adapter version that computed every result")
    results: list[list[TokenEntity]] = Field(description="per input, in input order: its entities")
    truncated: list[bool] = Field(description="per input: whether it was cut to the model's maximum length")


class ErrorBody(BaseModel):
    error: str = Field(description="a sentence saying what to change")
    error_type: str = Field(description="validation, bad_request, unauthorized, not_found, ...")


class Status(BaseModel):
    status: str


class Health(Status):
    anonymous_inference: bool = Field(
        description="true when inference and adapter reads need no token (no API key is configured)"
    )


_ERRORS = {
    400: ("malformed body", "The request body is not valid JSON: Expecting value at character 0."),
    401: ("missing or wrong bearer token", "this route needs an 'Authorization: Bearer <token>' header."),
    404: ("unknown adapter", "There is no adapter named 'tweet-sentiment'."),
    409: (
        "the adapter is at fault (damaged in the store, or fails or overflows in the engine)",
        "Adapter 'tweet-sentiment' (version 3f2a9c1e0b7d) gives non-finite scores for these inputs: its "
        "weights overflow float32. Upload a corrected adapter.",
    ),
    413: ("body over the limit", "The request body is larger than the limit of 2097152 bytes."),
    415: ("body of the wrong media type", "Send the body as application/json, not text/plain."),
    422: ("invalid field or input", "Invalid request: inputs is an empty list; send at least one text."),
    429: (
        "queue full; see Retry-After",
        "The server is overloaded: 1024 inputs are queued and the limit is 1024. Retry after the time in "
        "Retry-After.",
    ),
    503: (
        "not ready, shutting down, or timed out",
        "The model is still loading; retry when /ready answers 200.",
    ),
}
ERROR_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict"}
ERROR_TYPES |= {413: "payload_too_large"}
ERROR_TYPES |= {415: "unsupported_media_type", 422: "validation", 429: "overloaded", 503: "unavailable"}
ERROR_RESPONSES = {
    code: {
        "model": ErrorBody,
        "description": text,
        "content": {"application/json": {"example": {"error": example, "error_type": ERROR_TYPES[code]}}},
    }
    for code, (text, example) in _ERRORS.items()
}


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return names.get(type(value), "a list" if isinstance(value, list) else type(value).__name__)


class OpenAIError(BaseModel):
    message: str = Field(description="a sentence saying what to change")
    type: str = Field(description="OpenAI's kind: invalid_request_error, not_found_error, ...")
    param: str | None = None
    code: str = Field(description="loraplex's kind, as error_type")


class OpenAIErrorBody(BaseModel):
    """Errors on /v1/*: OpenAI's shape, with API.md's kind beside it."""

    error: OpenAIError
    error_type: str = Field(description="validation, bad_request, unauthorized, not_found, ...")


OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "bad_request": "invalid_request_error",
    "payload_too_large": "invalid_request_error",
    "unsupported_media_type": "invalid_request_error",
    "unauthorized": "authentication_error",
    "not_found": "not_found_error",
    "conflict": "conflict_error",
    "overloaded": "rate_limit_error",
    "unavailable": "server_error",
    "internal": "server_error",
}


def openai_error(message: str, kind: str) -> dict:
    """The /v1/* error body for an error of `kind` (API.md's kinds)."""
    error = {"message": message, "type": OPENAI_TYPES.get(kind, "invalid_request_error"), "param": None}
    return {"error": {**error, "code": kind}, "error_type": kind}


OPENAI_ERROR_RESPONSES = {
    code: {
        "model": OpenAIErrorBody,
        "description": text,
        "content": {"application/json": {"example": openai_error(example, ERROR_TYPES[code])}},
    }
    for code, (text, example) in _ERRORS.items()
}
