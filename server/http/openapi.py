"""/openapi.json: FastAPI's document plus what the routes cannot declare where they are defined.

- Limits that are settings: the text lists of every inference route (`inputs`, `input`, `texts`) hold at
  most `max_client_batch` items.
- What the served model decides: `dimensions` is its embedding size (known once the engine is ready; the
  document is kept from then on).
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
    "task_type": "SEQ_CLS",
    "routes": ["/classify", "/predict"],
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

_MODEL = {
    "id": "tweet-sentiment",
    "object": "model",
    "created": 1796288448,
    "owned_by": "loraplex",
    "task_type": "SEQ_CLS",
    "routes": ["/classify", "/predict"],
    "version": "e7f07dee2fee",
}
_BASE_MODEL = {
    "id": "sentence-transformers/all-MiniLM-L6-v2",
    "object": "model",
    "created": 1796288400,
    "owned_by": "loraplex",
    "task_type": "FEATURE_EXTRACTION",
    "routes": ["/embed", "/v1/embeddings"],
    "version": None,
}
_PREDICT = {"adapter_id": "tweet-sentiment", "inputs": _CLASSIFY["inputs"][1]}
_PREDICTED = [
    {"score": 0.7016, "label": "negative"},
    {"score": 0.2878, "label": "neutral"},
    {"score": 0.0106, "label": "positive"},
]
_TOKENIZE = {"inputs": "Hello world"}
_TOKENIZED = [
    [
        {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None},
        {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5},
        {"id": 2088, "text": "world", "special": False, "start": 6, "stop": 11},
        {"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None},
    ]
]
_SERVED = {
    "model_id": "sentence-transformers/all-MiniLM-L6-v2",
    "model_sha": None,
    "model_dtype": "float32",
    "model_type": {"embedding": {"pooling": "mean"}},
    "max_concurrent_requests": 1024,
    "max_input_length": 512,
    "max_batch_tokens": 16384,
    "max_batch_requests": 64,
    "max_client_batch_size": 32,
    "auto_truncate": True,
    "tokenization_workers": None,
    "version": "0.1.0",
    "sha": None,
    "docker_label": None,
    "device": "cpu",
    "model_family": "bert",
    "max_adapter_rank": 64,
    "max_adapter_labels": 32,
    "adapter_slots": 16,
}

# (path, method) -> {"request": example, status: example}
EXAMPLES: dict[tuple[str, str], dict] = {
    ("/v1/models", "get"): {"200": {"object": "list", "data": [_BASE_MODEL, _MODEL]}},
    ("/v1/models/{model}", "get"): {"200": _MODEL},
    ("/predict", "post"): {"request": _PREDICT, "200": _PREDICTED},
    ("/tokenize", "post"): {"request": _TOKENIZE, "200": _TOKENIZED},
    ("/info", "get"): {"200": _SERVED},
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
_PATH_EXAMPLES = {"adapter_id": "tweet-sentiment", "model": "tweet-sentiment"}
# The body fields that are lists of texts, each capped by check_batch at max_client_batch.
TEXT_LISTS = ("inputs", "input", "texts")


def install_openapi(app: FastAPI, *, max_client_batch: int) -> None:
    """Make `app.openapi()` build the document described above, once the served model is known."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        base = app.state.base
        doc = complete(
            FastAPI.openapi(app),
            max_client_batch=max_client_batch,
            dimensions=base.hidden_size if base else None,
        )
        app.openapi_schema = doc if base is not None else None
        return doc

    app.openapi = openapi


def complete(doc: dict, *, max_client_batch: int, dimensions: int | None = None) -> dict:
    for item in doc["paths"].values():
        for operation in item.values():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            properties = media.get("schema", {}).get("properties", {})
            for name in TEXT_LISTS:
                for option in [properties.get(name, {}), *properties.get(name, {}).get("anyOf", ())]:
                    if option.get("type") == "array":
                        option.setdefault("maxItems", max_client_batch)
            for option in [
                properties.get("dimensions", {}),
                *properties.get("dimensions", {}).get("anyOf", ()),
            ]:
                if option.get("type") == "integer" and dimensions is not None:
                    option["minimum"] = option["maximum"] = dimensions
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
