"""Request and response bodies of the inference and operations routes."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SURROGATE = re.compile("[\ud800-\udfff]")


class ClassifyRequest(BaseModel):
    # strict: `"inputs": 5` or `"truncate": "yes"` is a client error, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)

    adapter_id: str = Field(max_length=64, description="the adapter (task) to classify with")
    inputs: str | list[str] = Field(description="one text, or a list of 1..max_client_batch texts")
    truncate: bool = Field(True, description="cut texts longer than the model maximum; false: 422 instead")
    raw_scores: bool = Field(False, description="true: logits; false: softmax probabilities")

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise ValueError(f"must be a string or a list of strings, not {_json_type(value)}")
        if not texts:
            raise ValueError("is an empty list; send at least one text")
        for i, text in enumerate(texts):
            where = "" if isinstance(value, str) else f"[{i}] "
            if not isinstance(text, str):
                raise ValueError(f"{where}must be a string, not {_json_type(text)}")
            if not text:
                raise ValueError(f"{where}is an empty string; send some text")
            if "\x00" in text:
                raise ValueError(f"{where}contains a NUL character")
            if not text.isascii() and _SURROGATE.search(text):
                raise ValueError(f"{where}contains a lone surrogate, which is not valid Unicode")
        return value

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float] = Field(description="every label of the adapter, in its label order")


class ClassifyResponse(BaseModel):
    adapter_id: str
    adapter_version: str = Field(description="the adapter version that computed every result")
    results: list[ClassifyResult] = Field(description="one per input, in input order")


class ErrorBody(BaseModel):
    error: str = Field(description="a sentence saying what to change")
    error_type: str = Field(description="validation, bad_request, unauthorized, not_found, ...")


class Status(BaseModel):
    status: str


ERROR_RESPONSES = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed body",
        401: "missing or wrong bearer token",
        404: "unknown adapter",
        413: "body over the limit",
        415: "body is not JSON",
        422: "invalid field or input",
        429: "queue full; see Retry-After",
        503: "not ready, shutting down, or timed out",
    }.items()
}


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return names.get(type(value), "a list" if isinstance(value, list) else type(value).__name__)
