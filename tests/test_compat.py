"""Clients as they are: the official OpenAI SDK with its defaults, TEI's routes and request fields, one rule
for naming the adapter on every route, and the access log, against one live server (API key set, JSON logs).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from tests.live_server import LiveServer
from tests.peft_factory import tokenizer
from tests.task_support import save_task_adapter

KEY = "compat-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["The service was quick and the food was excellent.", "Terrible.", "Cancel my plan, please."]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    adapters = {
        "emb": save_task_adapter(root / "emb", "FEATURE_EXTRACTION", seed=4),
        "sent": save_task_adapter(root / "sent", "SEQ_CLS", num_labels=3, seed=6),
        "cross": save_task_adapter(root / "cross", "SEQ_CLS", num_labels=1, seed=5),
        "ner": save_task_adapter(root / "ner", "TOKEN_CLS", num_labels=3, seed=7),
        "qa": save_task_adapter(root / "qa", "QUESTION_ANS", num_labels=2, seed=8),
    }
    preload = [arg for name, path in adapters.items() for arg in ("--preload", f"{name}={path}")]
    server = LiveServer(
        "--adapter-store",
        str(root / "store"),
        "--log-format",
        "json",
        *preload,
        env={"LORAPLEX_API_KEY": KEY},
    ).start()
    yield server
    server.stop()


@pytest.fixture
def sdk(srv):
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def post(srv, route: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(srv.url + route, json=body, headers={**AUTH, **(headers or {})}, timeout=60)


def embed_floats(srv, adapter_id: str | None, texts: list[str]) -> np.ndarray:
    body = {"inputs": texts, **({"adapter_id": adapter_id} if adapter_id else {})}
    answer = post(srv, "/embed", body)
    assert answer.status_code == 200, answer.text
    return np.array([r["embedding"] for r in answer.json()["results"]], dtype=np.float32)


# ---- OpenAI's SDK ----


def test_sdk_embeddings_with_its_defaults_are_base64_and_decode_to_the_vectors(srv, sdk):
    raw = sdk.embeddings.with_raw_response.create(model="emb", input=TEXTS)
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"  # the SDK's default
    answer = raw.parse()
    assert answer.model == "emb" and [d.index for d in answer.data] == [0, 1, 2]
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    np.testing.assert_allclose(got, embed_floats(srv, "emb", TEXTS), atol=1e-6, rtol=0)
    tokens = sum(len(ids) for ids in tokenizer()(TEXTS)["input_ids"])
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens


def test_sdk_float_format_and_the_base_model(srv, sdk):
    floats = sdk.embeddings.create(model=BASE, input="hello there", encoding_format="float")
    np.testing.assert_allclose(
        floats.data[0].embedding, embed_floats(srv, None, ["hello there"])[0], atol=1e-7
    )
    short = sdk.embeddings.create(model="all-MiniLM-L6-v2", input=["hello there"], dimensions=384)
    assert len(short.data[0].embedding) == 384


def test_sdk_models_list_the_base_and_every_adapter_with_its_task(sdk):
    models = {m.id: m for m in sdk.models.list()}
    assert set(models) == {BASE, "emb", "sent", "cross", "ner", "qa"}
    tasks = {name: (m.model_extra["task_type"], m.model_extra["routes"]) for name, m in models.items()}
    assert tasks[BASE] == ("FEATURE_EXTRACTION", ["/embed", "/v1/embeddings"])
    assert tasks["emb"] == ("FEATURE_EXTRACTION", ["/embed", "/v1/embeddings"])
    assert tasks["sent"] == ("SEQ_CLS", ["/classify", "/predict"])
    assert tasks["cross"] == ("SEQ_CLS", ["/classify", "/predict", "/rerank"])
    assert tasks["ner"] == ("TOKEN_CLS", ["/tokens"]) and tasks["qa"] == ("QUESTION_ANS", ["/answer"])
    assert all(m.object == "model" and m.created > 0 for m in models.values())
    assert sdk.models.retrieve("sent").model_extra["task_type"] == "SEQ_CLS"


def test_sdk_errors_carry_the_message_and_kind(srv, sdk):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.embeddings.create(model="emb", input="hi", dimensions=64)
    assert "384 dimensions" in refused.value.message and refused.value.code == "validation"
    assert refused.value.type == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError) as wrong_task:
        sdk.embeddings.create(model="sent", input="hi")
    assert "POST /classify" in wrong_task.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.embeddings.create(model="nope", input="hi")
    assert missing.value.code == "not_found" and "nope" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nope")
    stranger = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with stranger, pytest.raises(openai.AuthenticationError) as denied:
        stranger.models.list()
    assert denied.value.type == "authentication_error"
    # The shape itself, with API.md's kind kept beside OpenAI's fields.
    body = post(srv, "/v1/embeddings", {"model": "emb", "input": []}).json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    assert (
        set(body["error"]) == {"message", "type", "param", "code"}
        and "empty list" in body["error"]["message"]
    )
    # Other routes keep API.md's flat shape.
    assert post(srv, "/embed", {"inputs": []}).json()["error_type"] == "validation"
    assert isinstance(post(srv, "/embed", {"inputs": []}).json()["error"], str)


# ---- TEI's routes ----


def classify(srv, adapter_id: str, inputs: list) -> list[dict]:
    answer = post(srv, "/classify", {"adapter_id": adapter_id, "inputs": inputs})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def ranked(result: dict) -> list[tuple[str, float]]:
    return sorted(result["scores"].items(), key=lambda item: -item[1])


def same_ranking(got: list[dict], want: list[tuple[str, float]]) -> bool:
    """TEI's predictions against /classify's scores, best first (rows batched apart differ in last bits)."""
    return [p["label"] for p in got] == [label for label, _ in want] and np.allclose(
        [p["score"] for p in got], [score for _, score in want], atol=1e-5, rtol=0
    )


def test_predict_takes_tei_inputs_and_answers_in_tei_shape(srv):
    pair = ["how do I cancel", TEXTS[2]]
    want = classify(srv, "sent", [TEXTS[0], pair, TEXTS[1]])
    single = post(srv, "/predict", {"inputs": TEXTS[0]}, {"X-Adapter-Id": "sent"})
    assert single.status_code == 200, single.text
    assert same_ranking(single.json(), ranked(want[0]))
    assert single.headers["x-adapter-id"] == "sent" and single.headers["x-adapter-version"]
    one_pair = post(srv, "/predict", {"adapter_id": "sent", "inputs": pair}).json()
    assert same_ranking(one_pair, ranked(want[1]))
    batch = post(srv, "/predict", {"inputs": [[TEXTS[0]], pair, [TEXTS[1]]]}, {"X-Adapter-Id": "sent"}).json()
    assert len(batch) == 3 and all(same_ranking(row, ranked(w)) for row, w in zip(batch, want, strict=True))
    raw = post(srv, "/predict", {"inputs": TEXTS[0], "raw_scores": True}, {"X-Adapter-Id": "sent"}).json()
    raw_want = post(srv, "/classify", {"adapter_id": "sent", "inputs": TEXTS[0], "raw_scores": True}).json()
    assert same_ranking(raw, ranked(raw_want["results"][0]))


@pytest.mark.parametrize(
    "body, headers, words",
    [
        ({"inputs": "hi"}, {}, "X-Adapter-Id"),
        ({"inputs": ["a", "b", "c"]}, {"X-Adapter-Id": "sent"}, "list of 3 texts"),
        ({"inputs": [["a", "b", "c"]]}, {"X-Adapter-Id": "sent"}, "[text, text_pair]"),
        ({"inputs": "hi", "adapter_id": "cross"}, {"X-Adapter-Id": "sent"}, "names 'sent'"),
        ({"inputs": "hi"}, {"X-Adapter-Id": "emb"}, "POST /embed"),
    ],
)
def test_predict_refusals(srv, body, headers, words):
    answer = post(srv, "/predict", body, headers)
    assert answer.status_code == 422 and words in answer.json()["error"], answer.text


def test_tokenize_and_info(srv):
    text = "Hello, wonderful world"
    tokens = post(srv, "/tokenize", {"inputs": text}).json()
    want = tokenizer()(text, return_offsets_mapping=True)
    assert [t["id"] for t in tokens[0]] == want["input_ids"]
    assert tokens[0][0] == {"id": want["input_ids"][0], "text": "[CLS]", "special": True, "start": None,
                            "stop": None}  # fmt: skip
    words = [t for t in tokens[0] if not t["special"]]
    assert [(t["start"], t["stop"]) for t in words] == [tuple(o) for o in want["offset_mapping"][1:-1]]
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in words)
    bare = post(srv, "/tokenize", {"inputs": [text, "ok"], "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == want["input_ids"][1:-1] and len(bare) == 2
    # TEI's prompt_name: no prompts are configured, so null (as TEI's clients send it) and nothing else
    assert post(srv, "/tokenize", {"inputs": text, "prompt_name": None}).json() == tokens
    prompt = post(srv, "/tokenize", {"inputs": text, "prompt_name": "query"})
    assert prompt.status_code == 422 and "no prompts configured" in prompt.json()["error"], prompt.text
    info = httpx.get(srv.url + "/info", headers=AUTH, timeout=60).json()
    assert info["model_id"] == BASE and info["max_input_length"] == 512
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["model_dtype"] == "float32"
    assert info["max_client_batch_size"] == 32 and info["version"]


def test_embed_and_rerank_take_tei_fields(srv):
    long = " ".join(["word"] * 600)
    left = post(srv, "/embed", {"inputs": [long, "end"], "truncation_direction": "Left", "normalize": False})
    lower = post(srv, "/embed", {"inputs": [long, "end"], "truncation_direction": "left", "normalize": False})
    assert left.status_code == 200 and left.json()["results"] == lower.json()["results"]
    assert left.json()["results"][0]["truncated"] is True and left.json()["normalize"] is False
    same = post(srv, "/embed", {"inputs": "hi", "dimensions": 384, "prompt_name": None})
    assert same.status_code == 200
    prompt = post(srv, "/embed", {"inputs": "hi", "prompt_name": "query"})
    assert prompt.status_code == 422 and "prompt_name" in prompt.json()["error"]
    short = post(srv, "/embed", {"inputs": "hi", "dimensions": 8})
    assert short.status_code == 422 and "384 dimensions" in short.json()["error"]
    for ids in ([101, 7592, 102], [[101, 7592, 102]]):  # TEI takes token ids too; texts only here
        refused = post(srv, "/embed", {"inputs": ids})
        assert refused.status_code == 422 and "must be a string" in refused.json()["error"], refused.text
    cut = post(srv, "/rerank", {"adapter_id": "cross", "query": "cancel", "texts": [long, "end"]})
    truncated = {r["index"]: r["truncated"] for r in cut.json()["results"]}
    assert cut.status_code == 200 and truncated == {0: True, 1: False}  # cut by default; TEI's: refused
    tei = {"query": "cancel", "texts": TEXTS, "raw_scores": True, "return_text": True, "truncate": True,
           "truncation_direction": "Right"}  # fmt: skip
    reranked = post(srv, "/rerank", {**tei, "adapter_id": "cross"})
    assert reranked.status_code == 200 and {r["text"] for r in reranked.json()["results"]} == set(TEXTS)


# ---- one rule for the adapter ----


def test_adapter_named_by_body_header_or_model(srv):
    by_header = post(srv, "/embed", {"inputs": TEXTS}, {"X-Adapter-Id": "emb"}).json()
    assert by_header["adapter_id"] == "emb"
    np.testing.assert_array_equal(
        np.array([r["embedding"] for r in by_header["results"]], dtype=np.float32),
        embed_floats(srv, "emb", TEXTS),
    )
    same = post(srv, "/embed", {"adapter_id": "emb", "inputs": "hi"}, {"X-Adapter-Id": "emb"})
    assert same.status_code == 200
    by_model = post(srv, "/v1/embeddings", {"model": "emb", "input": "hi"}, {"X-Adapter-Id": "emb"})
    assert by_model.status_code == 200 and by_model.json()["adapter_id"] == "emb"
    # `model` naming the base model names no adapter: the header's runs on it
    on_base = post(srv, "/v1/embeddings", {"model": BASE, "input": "hi"}, {"X-Adapter-Id": "emb"})
    assert on_base.status_code == 200 and on_base.json()["adapter_id"] == "emb"
    conflict = post(srv, "/v1/embeddings", {"model": "sent", "input": "hi"}, {"X-Adapter-Id": "emb"})
    assert conflict.status_code == 422 and "send one adapter" in conflict.text, conflict.text


# route -> (the adapter it is asked for, a body that does not name it)
UNNAMED = {
    "/classify": ("sent", {"inputs": [TEXTS[0], ["how do I cancel", TEXTS[2]]]}),
    "/predict": ("sent", {"inputs": [[TEXTS[0]], ["how do I cancel", TEXTS[2]]]}),
    "/rerank": ("cross", {"query": "cancel", "texts": TEXTS, "return_text": True}),
    "/tokens": ("ner", {"inputs": TEXTS, "aggregation": "none"}),
    "/answer": ("qa", {"question": "What was quick?", "context": TEXTS[0], "top_k": 2}),
    "/embed": ("emb", {"inputs": TEXTS}),
}


@pytest.mark.parametrize("route", UNNAMED)
def test_the_header_alone_names_the_adapter_as_the_body_does(srv, route):
    adapter_id, body = UNNAMED[route]
    by_body = post(srv, route, {"adapter_id": adapter_id, **body})
    by_header = post(srv, route, body, {"X-Adapter-Id": adapter_id})
    assert by_body.status_code == 200 and by_header.status_code == 200, (by_body.text, by_header.text)
    assert by_header.json() == by_body.json()
    # /predict answers in TEI's bare shape, with the adapter in headers; the others name it in the body
    named = by_header.headers["x-adapter-id"] if route == "/predict" else by_header.json()["adapter_id"]
    assert named == adapter_id
    other = "cross" if adapter_id == "sent" else "sent"
    conflict = post(srv, route, {"adapter_id": adapter_id, **body}, {"X-Adapter-Id": other})
    assert conflict.status_code == 422 and "send one adapter" in conflict.json()["error"], conflict.text
    unnamed = post(srv, route, body)
    if route == "/embed":  # the one route that serves the base model itself
        assert unnamed.status_code == 200 and unnamed.json()["adapter_id"] is None, unnamed.text
    else:
        error = unnamed.json()
        assert unnamed.status_code == 422 and error["error_type"] == "validation", unnamed.text
        assert "adapter_id is required" in error["error"] and "X-Adapter-Id header" in error["error"]


# ---- logs ----


def json_lines(srv) -> list[dict]:
    return [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]


def access_lines(srv) -> list[dict]:
    return [line for line in json_lines(srv) if line["logger"] == "loraplex.access"]


def test_every_request_has_a_json_access_line_and_the_start_line_says_what_runs(srv):
    marker = "no-such-adapter"  # an id no other test sends
    post(srv, "/classify", {"adapter_id": "sent", "inputs": ["a", "b"]})
    post(srv, "/classify", {"adapter_id": marker, "inputs": "a"})
    found = {}
    for line in access_lines(srv):  # written once the answer is sent: both are there by now
        if line["route"] == "/classify" and line["adapter"] in ("sent", marker):
            found[line["adapter"]] = line
    assert found["sent"]["status"] == 200 and found["sent"]["rows"] == 2 and found["sent"]["method"] == "POST"
    assert found[marker]["status"] == 404 and found[marker]["ms"] >= 0
    assert set(found["sent"]) >= {
        "time",
        "level",
        "message",
        "method",
        "route",
        "adapter",
        "status",
        "rows",
        "ms",
    }
    log = srv.log()
    start = [line["message"] for line in json_lines(srv) if " ready on http://" in line["message"]]
    assert len(start) == 1, log[-3000:]
    from loraplex.console import version

    assert f"loraplex {version()} ready" in start[0] and "cpu in float32" in start[0] and BASE in start[0]
    assert "requests api key" in start[0]
    assert "Consider training" not in log and "MISSING" not in log  # the head is explained instead
    assert KEY not in log
