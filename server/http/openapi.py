"""/openapi.json: FastAPI's document plus what the routes cannot declare where they are defined.

- Limits that are settings: the text lists of every inference route (`inputs`, `input`, `texts`) hold at
  most `max_client_batch` items.
- Example bodies for every operation, taken from a real server with the tweet-sentiment demo adapter
  (`loraplex serve --preload tweet-sentiment=adapters/demo/tweet-sentiment`).
"""

from __future__ import annotations

from fastapi import FastAPI

_INFO = {
    "adapter_id": "tweet-sentiment",
    "version": "e7f07dee2fee",
    "sha256": "80f63cca6982096571b34443507903353578e85a3f3e6f2aaf4a48f44c7be4a5",
    "rank": 8,
    "lora_alpha": 16,
    "target_modules": ["query", "key", "value", "dense"],
    "num_labels": 3,
    "labels": ["negative", "neutral", "positive"],
    "size_bytes": 1366612,
    "created_at": "2026-12-02T09:20:48Z",
    "resident": True,
}
_CLASSIFY = {
    "adapter_id": "tweet-sentiment",
    "inputs": ["The service was quick and the food was excellent.", "The train was late again."],
}
_CLASSIFIED = {
    "adapter_id": "tweet-sentiment",
    "adapter_version": "e7f07dee2fee",
    "results": [
        {
            "label": "positive",
            "score": 0.9887,
            "scores": {"negative": 0.0047, "neutral": 0.0067, "positive": 0.9887},
            "truncated": False,
        },
        {
            "label": "negative",
            "score": 0.7016,
            "scores": {"negative": 0.7016, "neutral": 0.2878, "positive": 0.0106},
            "truncated": False,
        },
    ],
}
_TEXT = "The train was late again."
# all-MiniLM-L6-v2 gives 384 values; the example shows the first eight of the real vector for _TEXT.
_VECTOR = [-0.0109, -0.0095, 0.0143, 0.1642, 0.0795, 0.0801, 0.0033, 0.0265]
_EMBED = {"inputs": [_TEXT]}
_EMBEDDED = {
    "adapter_id": None,
    "adapter_version": "base",
    "pooling": "mean",
    "normalize": True,
    "results": [{"embedding": _VECTOR, "truncated": False}],
}
_OPENAI_EMBED = {"model": "all-MiniLM-L6-v2", "input": _TEXT}
_OPENAI_EMBEDDED = {
    "adapter_id": None,
    "adapter_version": "base",
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": _VECTOR}],
    "model": "all-MiniLM-L6-v2",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
# A cross-encoder adapter with the one label "relevance".
_RERANK = {
    "adapter_id": "relevance",
    "query": "When does the train leave?",
    "texts": ["The food was excellent.", "The train leaves at 9:15 from platform 2."],
    "return_text": True,
}
_RERANKED = {
    "adapter_id": "relevance",
    "adapter_version": "472f81a76ccd",
    "results": [
        {"index": 1, "score": 0.9512, "truncated": False, "text": _RERANK["texts"][1]},
        {"index": 0, "score": 0.0214, "truncated": False, "text": _RERANK["texts"][0]},
    ],
}
# A QUESTION_ANS adapter fine-tuned for extractive answers (SQuAD-style).
_TIMETABLE = "The train to Berlin leaves at 9:15 from platform 2."
_ANSWER = {
    "adapter_id": "squad",
    "inputs": [
        {"question": "When does the train leave?", "context": _TIMETABLE},
        {"question": "Where does it leave from?", "context": _TIMETABLE},
    ],
}
_ANSWERED = {
    "adapter_id": "squad",
    "adapter_version": "5b1e0c93d2a4",
    "results": [
        [{"answer": "9:15", "score": 0.8731, "start": 30, "end": 34}],
        [{"answer": "platform 2", "score": 0.7904, "start": 40, "end": 50}],
    ],
}
# A TOKEN_CLS adapter with the labels O, B-PER, I-PER, B-LOC, I-LOC (the embedded model is uncased).
_TOKENS = {"adapter_id": "ner", "inputs": ["Angela Merkel visited Paris last week."], "aggregation": "simple"}
_TOKENED = {
    "adapter_id": "ner",
    "adapter_version": "9c4d2e7a1f03",
    "results": [
        [
            {"entity_group": "PER", "score": 0.9713, "word": "angela merkel", "start": 0, "end": 13},
            {"entity_group": "LOC", "score": 0.9402, "word": "paris", "start": 22, "end": 27},
        ]
    ],
    "truncated": [False],
}
# A multipart body as Swagger UI fills it in; adapter_model is a file, which an example cannot hold.
_UPLOAD = {
    "adapter_config": {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["query", "key", "value", "dense"],
        "modules_to_save": ["classifier"],
    },
    "labels": '["negative", "neutral", "positive"]',
}

# (path, method) -> {"request": example, status: example}
EXAMPLES: dict[tuple[str, str], dict] = {
    ("/classify", "post"): {"request": _CLASSIFY, "200": _CLASSIFIED},
    ("/embed", "post"): {"request": _EMBED, "200": _EMBEDDED},
    ("/v1/embeddings", "post"): {"request": _OPENAI_EMBED, "200": _OPENAI_EMBEDDED},
    ("/rerank", "post"): {"request": _RERANK, "200": _RERANKED},
    ("/tokens", "post"): {"request": _TOKENS, "200": _TOKENED},
    ("/answer", "post"): {"request": _ANSWER, "200": _ANSWERED},
    ("/adapters", "get"): {"200": {"adapters": [_INFO]}},
    ("/adapters/{adapter_id}", "put"): {
        "request": _UPLOAD,
        "201": {**_INFO, "resident": False},
        "200": {**_INFO, "resident": False},
    },
    ("/adapters/{adapter_id}", "get"): {"200": _INFO},
    ("/health", "get"): {"200": {"status": "ok"}},
    ("/ready", "get"): {"200": {"status": "ready"}},
}
_PATH_EXAMPLES = {"adapter_id": "tweet-sentiment"}
# The body fields that are lists of texts, each capped by check_batch at max_client_batch.
TEXT_LISTS = ("inputs", "input", "texts")


def install_openapi(app: FastAPI, *, max_client_batch: int) -> None:
    """Make `app.openapi()` build (once) the document described above."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = complete(FastAPI.openapi(app), max_client_batch=max_client_batch)
        return app.openapi_schema

    app.openapi = openapi


def complete(doc: dict, *, max_client_batch: int) -> dict:
    for item in doc["paths"].values():
        for operation in item.values():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            properties = media.get("schema", {}).get("properties", {})
            for name in TEXT_LISTS:
                for option in [properties.get(name, {}), *properties.get(name, {}).get("anyOf", ())]:
                    if option.get("type") == "array":
                        option.setdefault("maxItems", max_client_batch)
            for parameter in operation.get("parameters", ()):
                if parameter["name"] in _PATH_EXAMPLES:
                    parameter["example"] = _PATH_EXAMPLES[parameter["name"]]
    for (path, method), examples in EXAMPLES.items():
        operation = doc["paths"][path][method]
        if "request" in examples:
            for media in operation["requestBody"]["content"].values():
                media["example"] = examples["request"]
        for status, response in operation["responses"].items():
            for media in response.get("content", {}).values():
                if status in examples:
                    media["example"] = examples[status]
    return doc
