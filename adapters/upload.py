"""An upload's parts before any tensor is read: size bounds (streamed), adapter_config.json, labels.

Torch-free, so that an HTTP worker bounds and parses a request without loading the model stack; the
weights themselves are checked where they are loaded (`loraplex.adapters.validate`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator

from loraplex.adapters.errors import InvalidAdapterError, PayloadTooLargeError

MAX_CONFIG_BYTES = 1 << 20
MAX_LABELS_BYTES = 1 << 16
MAX_LABEL_CHARS = 200


async def limited(chunks: AsyncIterable[bytes], limit: int, what: str) -> AsyncIterator[bytes]:
    """Pass `chunks` through, raising PayloadTooLargeError as soon as more than `limit` bytes arrived."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLargeError(f"{what} is larger than the limit of {limit} bytes.")
        yield chunk


def check_size(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise PayloadTooLargeError(f"{what} is {len(data)} bytes, over the limit of {limit} bytes.")


def parse_config(data: bytes) -> dict:
    """adapter_config.json bytes -> dict; a JSON object in UTF-8 or InvalidAdapterError."""
    check_size(data, MAX_CONFIG_BYTES, "adapter_config.json")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidAdapterError(f"adapter_config.json is not valid UTF-8 JSON: {short(exc)}.") from None
    if not isinstance(config, dict):
        raise InvalidAdapterError("adapter_config.json must be a JSON object.")
    return config


def parse_labels(text: str | bytes | None) -> list[str] | None:
    """The optional `labels` field: a JSON array of distinct non-empty strings, or None when absent."""
    if text is None:
        return None
    if isinstance(text, bytes):
        check_size(text, MAX_LABELS_BYTES, "'labels'")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAdapterError("'labels' is not valid UTF-8.") from None
    if len(text) > MAX_LABELS_BYTES:
        raise PayloadTooLargeError(f"'labels' is over the limit of {MAX_LABELS_BYTES} characters.")
    try:
        labels = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidAdapterError(
            'The labels field must be a JSON array of label names, e.g. ["negative", "positive"].'
        ) from None
    if not isinstance(labels, list) or not labels:
        raise InvalidAdapterError(
            'The labels field must be a non-empty JSON array of label names, e.g. ["negative", "positive"].'
        )
    for index, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS:
            raise InvalidAdapterError(
                f"'labels'[{index}] must be a non-empty string of at most {MAX_LABEL_CHARS} characters."
            )
    return labels


def short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
