"""Python client for a loraplex server: classify texts, and upload, list, inspect and delete adapters.

    from loraplex.client import Client

    with Client("http://127.0.0.1:8000", api_key="...", admin_token="...") as client:
        client.upload("sentiment", "adapters/demo/tweet-sentiment")    # a PEFT directory or PeftModel
        answer = client.classify("sentiment", ["what a lovely day", "my flight got cancelled"])
        print(answer.adapter_version, [r.label for r in answer.results])

Every error the server answers is raised as an `APIError` subclass carrying its `status`, `error_type`
and message (`NotFoundError`, `ValidationError`, `OverloadedError` with `retry_after`, ...); a server
that cannot be reached raises `ConnectionFailedError`. `AsyncClient` has the same methods as coroutines.
Requests that name an adapter carry an `X-Adapter-Id` header so a load balancer can route by adapter.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"
_ADAPTER_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # the server's rule for adapter ids


# -------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """The server answered with an error. `status` is the HTTP status (None when nothing was answered),
    `error_type` the contract's kind ("validation", "not_found", ...), `message` its sentence."""

    error_type = "internal"

    def __init__(
        self, message: str, *, status: int | None = None, error_type: str | None = None,
        retry_after: float | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type or type(self).error_type
        self.retry_after = retry_after  # seconds, from Retry-After (429 and some 503s)

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{self.message} ({where}{self.error_type})"


class ValidationError(APIError):
    error_type = "validation"


class BadRequestError(APIError):
    error_type = "bad_request"


class UnauthorizedError(APIError):
    error_type = "unauthorized"


class NotFoundError(APIError):
    error_type = "not_found"


class ConflictError(APIError):
    error_type = "conflict"


class PayloadTooLargeError(APIError):
    error_type = "payload_too_large"


class UnsupportedMediaTypeError(APIError):
    error_type = "unsupported_media_type"


class OverloadedError(APIError):
    error_type = "overloaded"


class UnavailableError(APIError):
    error_type = "unavailable"


class InternalServerError(APIError):
    error_type = "internal"


class ConnectionFailedError(APIError):
    """No answer: the server could not be reached or did not answer in time."""

    error_type = "connection"


ERRORS: dict[str, type[APIError]] = {
    cls.error_type: cls
    for cls in (
        ValidationError,
        BadRequestError,
        UnauthorizedError,
        NotFoundError,
        ConflictError,
        PayloadTooLargeError,
        UnsupportedMediaTypeError,
        OverloadedError,
        UnavailableError,
        InternalServerError,
    )
}
# For answers without the contract's JSON body (e.g. a proxy's own error page).
STATUS_KINDS = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation", 429: "overloaded", 502: "unavailable",
    503: "unavailable", 504: "unavailable",
}  # fmt: skip


def error_from_response(response: httpx.Response) -> APIError:
    """The typed exception for an error answer (status >= 400)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, kind = body["error"], str(body.get("error_type") or "")
    else:
        text = " ".join(response.text.split())[:200]
        message = f"HTTP {response.status_code} {response.reason_phrase}" + (f": {text}" if text else "")
        kind = ""
    kind = kind or STATUS_KINDS.get(response.status_code, "internal" if response.status_code >= 500 else "")
    retry_after = None
    if "retry-after" in response.headers:
        try:
            retry_after = float(response.headers["retry-after"])
        except ValueError:
            retry_after = None
    cls = ERRORS.get(kind, APIError)
    return cls(message, status=response.status_code, error_type=kind or None, retry_after=retry_after)


# --------------------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Prediction:
    label: str  # the arg-max label
    score: float  # its probability (or logit with raw_scores)
    scores: dict[str, float]  # every label of the adapter, in head order


@dataclass(frozen=True)
class Classification:
    adapter_id: str
    adapter_version: str  # the version that computed every result
    results: list[Prediction]  # one per input, in input order
    raw: dict = field(repr=False, compare=False)  # the JSON body as answered

    @classmethod
    def from_json(cls, body: dict) -> Classification:
        results = [Prediction(r["label"], r["score"], dict(r["scores"])) for r in body["results"]]
        return cls(body["adapter_id"], body["adapter_version"], results, body)


@dataclass(frozen=True)
class Embeddings:
    adapter_id: str | None  # None: the base model
    adapter_version: str
    vectors: list[list[float]]  # one per input, in input order
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict) -> Embeddings:
        vectors = [r["embedding"] for r in body["results"]]
        return cls(body["adapter_id"], body["adapter_version"], vectors, body)


@dataclass(frozen=True)
class Ranked:
    index: int  # position of the text in the request
    score: float
    text: str | None = None


@dataclass(frozen=True)
class Ranking:
    adapter_id: str
    adapter_version: str
    results: list[Ranked]  # best first
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict) -> Ranking:
        results = [Ranked(r["index"], r["score"], r.get("text")) for r in body["results"]]
        return cls(body["adapter_id"], body["adapter_version"], results, body)


@dataclass(frozen=True)
class Entity:
    label: str  # the entity type ("PER"); with aggregation "none" the token's own label ("B-PER")
    score: float
    word: str
    start: int | None  # character offsets in the input text; None where the tokenizer has none
    end: int | None
    index: int | None = None  # aggregation "none": the token's position in the tokenized input

    @classmethod
    def from_json(cls, e: dict) -> Entity:
        label = e["entity_group"] if "entity_group" in e else e["entity"]
        return cls(label, e["score"], e["word"], e["start"], e["end"], e.get("index"))


@dataclass(frozen=True)
class Entities:
    adapter_id: str
    adapter_version: str
    results: list[list[Entity]]  # one list per input, in input order; entities in text order
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict) -> Entities:
        results = [[Entity.from_json(e) for e in row] for row in body["results"]]
        return cls(body["adapter_id"], body["adapter_version"], results, body)


@dataclass(frozen=True)
class Answer:
    answer: str  # the span of the context; "" for the null answer
    score: float  # p_start * p_end
    start: int  # character offsets in the context; 0 and 0 for the null answer
    end: int


@dataclass(frozen=True)
class Answers:
    adapter_id: str
    adapter_version: str
    results: list[list[Answer]]  # per input, in input order: up to top_k answers, best first
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict) -> Answers:
        rows = body["results"]
        results = [[Answer(a["answer"], a["score"], a["start"], a["end"]) for a in row] for row in rows]
        return cls(body["adapter_id"], body["adapter_version"], results, body)


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    version: str
    labels: list[str]
    num_labels: int
    rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    sha256: str | None = None
    size_bytes: int | None = None
    created_at: str | None = None
    resident: bool | None = None
    task_type: str | None = None  # SEQ_CLS, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION
    routes: list[str] = field(default_factory=list)  # the inference routes that serve it
    created: bool | None = None  # upload(): True when the id was new (201), False when replaced (200)
    warnings: list[str] = field(default_factory=list)  # upload(): what the server noticed but accepted
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON body as answered

    @classmethod
    def from_json(cls, body: dict, created: bool | None = None) -> AdapterInfo:
        labels = list(body.get("labels") or [])
        return cls(
            adapter_id=body["adapter_id"],
            version=body["version"],
            labels=labels,
            num_labels=body.get("num_labels", len(labels)),
            rank=body.get("rank"),
            lora_alpha=body.get("lora_alpha"),
            target_modules=list(body.get("target_modules") or []),
            sha256=body.get("sha256"),
            size_bytes=body.get("size_bytes"),
            created_at=body.get("created_at"),
            resident=body.get("resident"),
            task_type=body.get("task_type"),
            routes=list(body.get("routes") or []),
            warnings=list(body.get("warnings") or []),
            created=created,
            raw=body,
        )


# -------------------------------------------------------------------------------------- requests (shared)


@dataclass
class _Call:
    """One request and how to read its successful answer; both clients send it the same way."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    admin: bool = False
    adapter_id: str | None = None
    json: Any = None
    files: dict | None = None
    data: dict | None = None


def _adapter_path(adapter_id: str) -> str:
    return "/adapters/" + quote(adapter_id, safe="")


def _classify_call(adapter_id: str, inputs: str | list, truncate: bool, raw_scores: bool, **options) -> _Call:
    body = {"adapter_id": adapter_id, "inputs": inputs, "truncate": truncate, "raw_scores": raw_scores}
    body |= {name: value for name, value in options.items() if value is not None}
    return _Call("POST", "/classify", lambda r: Classification.from_json(r.json()), adapter_id=adapter_id,
                 json=body)  # fmt: skip


def _embed_call(inputs: str | list[str], adapter_id: str | None, **options) -> _Call:
    body = {"inputs": inputs, **{name: value for name, value in options.items() if value is not None}}
    if adapter_id is not None:
        body["adapter_id"] = adapter_id
    return _Call("POST", "/embed", lambda r: Embeddings.from_json(r.json()), adapter_id=adapter_id, json=body)


def _embed_arguments(adapter_id: Any, inputs: Any) -> tuple[str | None, Any]:
    """(adapter_id, inputs) from `embed`'s arguments, in the order of the other methods; a call in the
    order of earlier versions, embed(inputs, adapter_id), still works where it cannot be mistaken (a list
    of texts first, or a text that is no adapter id before one that is), with a DeprecationWarning."""
    if inputs is None:
        if adapter_id is None:
            raise TypeError("embed() takes (adapter_id, inputs); inputs is missing.")
        return None, adapter_id  # embed(texts): the base model
    if isinstance(adapter_id, list) or (
        isinstance(adapter_id, str)
        and not _ADAPTER_ID.fullmatch(adapter_id)
        and isinstance(inputs, str)
        and _ADAPTER_ID.fullmatch(inputs)
    ):
        warnings.warn(
            "embed(inputs, adapter_id) is the old argument order; call embed(adapter_id, inputs), as "
            "classify, tokens, answer and rerank take them.",
            DeprecationWarning,
            stacklevel=3,
        )
        return inputs, adapter_id
    if adapter_id is not None and not isinstance(adapter_id, str):
        raise TypeError(
            f"embed() takes (adapter_id, inputs); adapter_id must be a string or None, not {adapter_id!r:.60}"
        )
    return adapter_id, inputs


def _rerank_call(adapter_id: str, query: str, texts: list[str], **options) -> _Call:
    body = {"adapter_id": adapter_id, "query": query, "texts": texts}
    body |= {name: value for name, value in options.items() if value is not None}
    return _Call("POST", "/rerank", lambda r: Ranking.from_json(r.json()), adapter_id=adapter_id, json=body)


def _tokens_call(adapter_id: str, inputs: str | list[str], aggregation: str, **options) -> _Call:
    body = {"adapter_id": adapter_id, "inputs": inputs, "aggregation": aggregation}
    body |= {name: value for name, value in options.items() if value is not None}
    return _Call("POST", "/tokens", lambda r: Entities.from_json(r.json()), adapter_id=adapter_id, json=body)


def _answer_call(adapter_id: str, question: str | list, context: str | None, **options) -> _Call:
    if isinstance(question, str):
        if context is None:
            raise TypeError("answer() takes a question and its context, or a list of (question, context).")
        inputs: dict | list = {"question": question, "context": context}
    else:
        pairs = [(p["question"], p["context"]) if isinstance(p, dict) else p for p in question]
        inputs = [{"question": q, "context": c} for q, c in pairs]
    body = {"adapter_id": adapter_id, "inputs": inputs}
    body |= {name: value for name, value in options.items() if value is not None}
    return _Call("POST", "/answer", lambda r: Answers.from_json(r.json()), adapter_id=adapter_id, json=body)


def _upload_call(adapter_id: str, config: bytes, weights: bytes, labels: str | list[str] | None) -> _Call:
    files = {
        "adapter_config": (CONFIG_FILE, config, "application/json"),
        "adapter_model": (WEIGHTS_FILE, weights, "application/octet-stream"),
    }
    data = None
    if labels is not None:
        data = {"labels": labels if isinstance(labels, str) else json.dumps(list(labels))}

    def parse(response: httpx.Response) -> AdapterInfo:
        return AdapterInfo.from_json(response.json(), created=response.status_code == 201)

    return _Call(
        "PUT", _adapter_path(adapter_id), parse, admin=True, adapter_id=adapter_id, files=files, data=data
    )


def _list_call() -> _Call:
    return _Call("GET", "/adapters", lambda r: [AdapterInfo.from_json(a) for a in r.json()["adapters"]])


def _get_call(adapter_id: str) -> _Call:
    return _Call(
        "GET", _adapter_path(adapter_id), lambda r: AdapterInfo.from_json(r.json()), adapter_id=adapter_id
    )


def _delete_call(adapter_id: str) -> _Call:
    return _Call("DELETE", _adapter_path(adapter_id), lambda r: None, admin=True, adapter_id=adapter_id)


def read_adapter_dir(directory: str | os.PathLike[str]) -> tuple[bytes, bytes, str | None]:
    """(adapter_config.json, adapter_model.safetensors, labels.json text or None) of a PEFT directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is not a directory; pass the folder PEFT's save_pretrained wrote."
        )
    for name, hint in (
        (CONFIG_FILE, ""),
        (WEIGHTS_FILE, " (save with safe_serialization=True; .bin is refused)"),
    ):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}{hint}.")
    labels = directory / LABELS_FILE
    return (
        (directory / CONFIG_FILE).read_bytes(),
        (directory / WEIGHTS_FILE).read_bytes(),
        labels.read_text(encoding="utf-8") if labels.is_file() else None,
    )


def _read_source(source: Any, labels: list[str] | None) -> tuple[bytes, bytes, str | list[str] | None]:
    """What to upload for a directory or an in-memory PeftModel; explicit `labels` win over the source's."""
    if isinstance(source, (str, os.PathLike)):
        config, weights, file_labels = read_adapter_dir(source)
        return config, weights, labels if labels is not None else file_labels
    if not hasattr(source, "save_pretrained") or not hasattr(source, "peft_config"):
        raise TypeError(f"upload() takes a directory or a PeftModel, not {type(source).__name__}.")
    with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
        name = source.active_adapter
        source.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        saved = Path(tmp) if (Path(tmp) / CONFIG_FILE).is_file() else Path(tmp) / name
        config, weights, _ = read_adapter_dir(saved)
    if labels is None:
        id2label = getattr(getattr(source, "config", None), "id2label", None) or {}
        names = [id2label[i] for i in sorted(id2label)]
        if names != [f"LABEL_{i}" for i in range(len(names))]:
            labels = names
    return config, weights, labels


# ----------------------------------------------------------------------------------------------- clients


class _Base:
    def __init__(self, url: str | None, api_key: str | None, admin_token: str | None):
        self.url = (url or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or None
        self.admin_token = admin_token or None

    def _headers(self, call: _Call) -> dict[str, str]:
        headers = {}
        token = self.admin_token if call.admin else (self.api_key or self.admin_token)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # Header values must be plain ASCII; an id that is not can only be answered 404/422 by the server.
        if call.adapter_id is not None and call.adapter_id.isascii() and call.adapter_id.isprintable():
            headers["X-Adapter-Id"] = call.adapter_id
        return headers

    def _request(self, call: _Call) -> dict:
        return {"method": call.method, "url": call.path, "headers": self._headers(call), "json": call.json,
                "files": call.files, "data": call.data}  # fmt: skip

    def _answer(self, call: _Call, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise error_from_response(response)
        return call.parse(response)

    def _unreachable(self, exc: httpx.TransportError) -> ConnectionFailedError:
        what = "did not answer in time" if isinstance(exc, httpx.TimeoutException) else "cannot be reached"
        return ConnectionFailedError(f"loraplex server at {self.url} {what}: {exc or type(exc).__name__}")


class Client(_Base):
    """Blocking client. `timeout` is in seconds per request; use as a context manager or call close()."""

    def __init__(
        self, url: str | None = DEFAULT_URL, *, api_key: str | None = None, admin_token: str | None = None,
        timeout: float = 60.0, transport: httpx.BaseTransport | None = None,
    ):  # fmt: skip
        super().__init__(url, api_key, admin_token)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def _send(self, call: _Call) -> Any:
        try:
            response = self._http.request(**self._request(call))
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return self._answer(call, response)

    def classify(
        self, adapter_id: str, inputs: str | list, *, truncate: bool = True, raw_scores: bool = False,
        top_k: int | None = None, threshold: float | None = None, truncation_direction: str | None = None,
    ) -> Classification:  # fmt: skip
        """Classify one text, a [text, text_pair] pair, or a list of them with one adapter; results come
        back in input order (`.raw` holds the fields of multi-label adapters and top_k)."""
        options = dict(top_k=top_k, threshold=threshold, truncation_direction=truncation_direction)
        return self._send(_classify_call(adapter_id, inputs, truncate, raw_scores, **options))

    def embed(
        self, adapter_id: str | None, inputs: str | list[str] | None = None, *, pooling: str | None = None,
        normalize: bool | None = None,
    ) -> Embeddings:  # fmt: skip
        """One vector per text from a FEATURE_EXTRACTION adapter, or from the base model: `embed(None,
        texts)` or `embed(texts)`. Arguments in the order of classify, tokens, answer and rerank."""
        adapter_id, inputs = _embed_arguments(adapter_id, inputs)
        return self._send(_embed_call(inputs, adapter_id, pooling=pooling, normalize=normalize))

    def rerank(
        self, adapter_id: str, query: str, texts: list[str], *, top_n: int | None = None,
        return_text: bool = False,
    ) -> Ranking:  # fmt: skip
        """The texts by relevance to `query` under a cross-encoder adapter, best first."""
        return self._send(_rerank_call(adapter_id, query, texts, top_n=top_n, return_text=return_text))

    def tokens(
        self, adapter_id: str, inputs: str | list[str], aggregation: str = "simple", *,
        ignore_labels: list[str] | None = None, truncate: bool | None = None,
        truncation_direction: str | None = None,
    ) -> Entities:  # fmt: skip
        """Entities per text from a token-classification adapter, as Hugging Face's token-classification
        pipeline gives them ("simple": B-/I- tags grouped; "none": every token; "first", "average",
        "max": whole words); labels in `ignore_labels` (default ["O"]) are left out."""
        options = dict(ignore_labels=ignore_labels, truncate=truncate)
        options["truncation_direction"] = truncation_direction
        return self._send(_tokens_call(adapter_id, inputs, aggregation, **options))

    def answer(
        self, adapter_id: str, question: str | list, context: str | None = None, *, top_k: int | None = None,
        doc_stride: int | None = None, max_answer_len: int | None = None, max_question_len: int | None = None,
        max_seq_len: int | None = None, handle_impossible_answer: bool | None = None,
    ) -> Answers:  # fmt: skip
        """Spans of `context` that answer `question` (or of each context of a list of (question, context)
        pairs or {"question", "context"} dicts) from a question-answering adapter; `.results[i]` holds input
        i's up to top_k answers, best first."""
        options = dict(top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len,
                       max_question_len=max_question_len, max_seq_len=max_seq_len,
                       handle_impossible_answer=handle_impossible_answer)  # fmt: skip
        return self._send(_answer_call(adapter_id, question, context, **options))

    def upload(self, adapter_id: str, source: str | os.PathLike[str] | Any, *, labels: list[str] | None = None
               ) -> AdapterInfo:  # fmt: skip
        """Create or replace an adapter from a PEFT directory (adapter_config.json, adapter_model.safetensors,
        optional labels.json) or an in-memory PeftModel. `.created` says whether the id was new."""
        return self._send(_upload_call(adapter_id, *_read_source(source, labels)))

    def upload_files(self, adapter_id: str, adapter_config: bytes, adapter_model: bytes,
                     labels: str | list[str] | None = None) -> AdapterInfo:  # fmt: skip
        """Upload the two files' contents as they are (labels: a list, or JSON text sent unchanged)."""
        return self._send(_upload_call(adapter_id, adapter_config, adapter_model, labels))

    def list(self) -> list[AdapterInfo]:
        return self._send(_list_call())

    def get(self, adapter_id: str) -> AdapterInfo:
        return self._send(_get_call(adapter_id))

    def delete(self, adapter_id: str) -> None:
        self._send(_delete_call(adapter_id))

    def ready(self) -> bool:
        """True when the server answers /ready with 200 (model loaded, warmed, not draining)."""
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError as e:
            raise self._unreachable(e) from e

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same client for asyncio: every method is a coroutine. Use `async with` or `await close()`."""

    def __init__(
        self, url: str | None = DEFAULT_URL, *, api_key: str | None = None, admin_token: str | None = None,
        timeout: float = 60.0, transport: httpx.AsyncBaseTransport | None = None,
    ):  # fmt: skip
        super().__init__(url, api_key, admin_token)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)

    async def _send(self, call: _Call) -> Any:
        try:
            response = await self._http.request(**self._request(call))
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        return self._answer(call, response)

    async def classify(
        self, adapter_id: str, inputs: str | list, *, truncate: bool = True, raw_scores: bool = False,
        top_k: int | None = None, threshold: float | None = None, truncation_direction: str | None = None,
    ) -> Classification:  # fmt: skip
        options = dict(top_k=top_k, threshold=threshold, truncation_direction=truncation_direction)
        return await self._send(_classify_call(adapter_id, inputs, truncate, raw_scores, **options))

    async def embed(
        self, adapter_id: str | None, inputs: str | list[str] | None = None, *, pooling: str | None = None,
        normalize: bool | None = None,
    ) -> Embeddings:  # fmt: skip
        adapter_id, inputs = _embed_arguments(adapter_id, inputs)
        return await self._send(_embed_call(inputs, adapter_id, pooling=pooling, normalize=normalize))

    async def rerank(
        self, adapter_id: str, query: str, texts: list[str], *, top_n: int | None = None,
        return_text: bool = False,
    ) -> Ranking:  # fmt: skip
        return await self._send(_rerank_call(adapter_id, query, texts, top_n=top_n, return_text=return_text))

    async def tokens(
        self, adapter_id: str, inputs: str | list[str], aggregation: str = "simple", *,
        ignore_labels: list[str] | None = None, truncate: bool | None = None,
        truncation_direction: str | None = None,
    ) -> Entities:  # fmt: skip
        options = dict(ignore_labels=ignore_labels, truncate=truncate)
        options["truncation_direction"] = truncation_direction
        return await self._send(_tokens_call(adapter_id, inputs, aggregation, **options))

    async def answer(
        self, adapter_id: str, question: str | list, context: str | None = None, *, top_k: int | None = None,
        doc_stride: int | None = None, max_answer_len: int | None = None, max_question_len: int | None = None,
        max_seq_len: int | None = None, handle_impossible_answer: bool | None = None,
    ) -> Answers:  # fmt: skip
        options = dict(top_k=top_k, doc_stride=doc_stride, max_answer_len=max_answer_len,
                       max_question_len=max_question_len, max_seq_len=max_seq_len,
                       handle_impossible_answer=handle_impossible_answer)  # fmt: skip
        return await self._send(_answer_call(adapter_id, question, context, **options))

    async def upload(self, adapter_id: str, source: str | os.PathLike[str] | Any, *,
                     labels: list[str] | None = None) -> AdapterInfo:  # fmt: skip
        return await self._send(_upload_call(adapter_id, *_read_source(source, labels)))

    async def upload_files(self, adapter_id: str, adapter_config: bytes, adapter_model: bytes,
                           labels: str | list[str] | None = None) -> AdapterInfo:  # fmt: skip
        return await self._send(_upload_call(adapter_id, adapter_config, adapter_model, labels))

    async def list(self) -> list[AdapterInfo]:
        return await self._send(_list_call())

    async def get(self, adapter_id: str) -> AdapterInfo:
        return await self._send(_get_call(adapter_id))

    async def delete(self, adapter_id: str) -> None:
        await self._send(_delete_call(adapter_id))

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError as e:
            raise self._unreachable(e) from e

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
