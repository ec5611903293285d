"""POST /tokens: token-classification adapters through a live server, every aggregation strategy against
Hugging Face's `token-classification` pipeline on the PEFT model; several label sets in one stream,
truncation on either side, the client, and bad input."""

from __future__ import annotations

import asyncio
import copy
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer, BertConfig, pipeline
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from loraplex.client import AsyncClient, Client, Entities, Entity
from loraplex.client import ValidationError as ClientValidationError
from tests.device_support import TOLERANCE
from tests.family_support import save_model, tiny_config_kwargs
from tests.peft_factory import ALL_LINEAR, tokenizer
from tests.task_support import peft_model, save_task_adapter, serve

NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# A second label set: its own types, and plain labels (no B-/I- prefix) that the pipeline continues.
ORG = ["O", "B-ORG", "I-ORG", "DATE", "B-MISC", "I-MISC"]
TEXTS = [
    "Angela Merkel met Emmanuel Macron in Zürich on Tuesday.",
    "José Müller-Lüdenscheidt's café, naïve!!",
    "Dr. O'Neill flew from São Paulo to New York (twice) — unbelievably.",
    "I ❤ Kraków 🙂 and Łódź.",
    "hi",
]
LONG = " ".join(f"Person{i} visited Town{i}." for i in range(150))
AGGREGATIONS = ["none", "simple", "first", "average", "max"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-tokens")
    return {
        "ner": save_task_adapter(root / "ner", "TOKEN_CLS", num_labels=len(NER), seed=11, labels=NER),
        "org": save_task_adapter(
            root / "org", "TOKEN_CLS", num_labels=len(ORG), seed=12, labels=ORG, target_modules=ALL_LINEAR
        ),
        "sentiment": save_task_adapter(root / "sentiment", "SEQ_CLS", num_labels=3, seed=13),
    }


@pytest.fixture(scope="module")
def srv(adapters, tmp_path_factory):
    server = serve(tmp_path_factory.mktemp("store"), adapters)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models(adapters):
    """The merged PEFT model of each token-classification adapter, with the adapter's labels."""
    made = {}
    for name, labels in (("ner", NER), ("org", ORG)):
        model = peft_model(adapters[name], "TOKEN_CLS").merge_and_unload().eval()
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        made[name] = model
    return made


@pytest.fixture(scope="module")
def expect(models):
    """expect(adapter, aggregation, texts=TEXTS, **options): the pipeline's entities, computed once."""
    cache = {}

    def expected(name: str, aggregation: str, texts=tuple(TEXTS), **options) -> list[list[dict]]:
        key = (name, aggregation, tuple(texts), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            cache[key] = reference(models[name], list(texts), aggregation, **options)
        return cache[key]

    return expected


def reference(model, texts, aggregation: str, tok=None, **options) -> list[list[dict]]:
    classify = pipeline("token-classification", model=model, tokenizer=tok or tokenizer(), device="cpu")
    found = classify(texts, aggregation_strategy=aggregation, **options)
    return [[{k: v.item() if hasattr(v, "item") else v for k, v in e.items()} for e in row] for row in found]


def post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/tokens", json=body, timeout=60)


def assert_same(got: list[list[dict]], want: list[list[dict]]) -> None:
    """Identical entities (type, word, offsets, index) and scores within TOLERANCE."""
    assert len(got) == len(want)
    for row, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        strip = [{k: v for k, v in e.items() if k != "score"} for e in mine]
        assert strip == [{k: v for k, v in e.items() if k != "score"} for e in theirs], row
        for a, b in zip(mine, theirs, strict=True):
            assert abs(a["score"] - b["score"]) <= TOLERANCE, (row, a, b)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_every_aggregation_is_the_pipelines(srv, expect, aggregation):
    for name in ("ner", "org"):
        response = post(srv, {"adapter_id": name, "inputs": TEXTS, "aggregation": aggregation})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter_id"] == name and body["truncated"] == [False] * len(TEXTS)
        assert_same(body["results"], expect(name, aggregation))
        assert any(body["results"]), "the random adapter should tag some entities"
        key = "entity" if aggregation == "none" else "entity_group"
        assert all(key in e for row in body["results"] for e in row)


def test_words_and_offsets_follow_the_text(srv):
    body = post(srv, {"adapter_id": "ner", "inputs": TEXTS, "aggregation": "first"}).json()
    grouped = [e for row in body["results"] for e in row]
    assert grouped and {e["entity_group"] for e in grouped} <= {"PER", "LOC"}
    for text, row in zip(TEXTS, body["results"], strict=True):
        for entity in row:
            assert 0 <= entity["start"] < entity["end"] <= len(text)
    # Word pieces are grouped under "first": no entity starts or ends inside a word.
    for text, row in zip(TEXTS, body["results"], strict=True):
        for entity in row:
            start, end = entity["start"], entity["end"]
            assert start == 0 or not (text[start - 1].isalnum() and text[start].isalnum())
            assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum())


def test_default_is_simple_and_ignore_labels_filters(srv, expect):
    default = post(srv, {"adapter_id": "ner", "inputs": TEXTS}).json()
    assert (
        default["results"]
        == post(srv, {"adapter_id": "ner", "inputs": TEXTS, "aggregation": "simple"}).json()["results"]
    )
    everything = post(srv, {"adapter_id": "org", "inputs": TEXTS, "aggregation": "none", "ignore_labels": []})
    assert_same(everything.json()["results"], expect("org", "none", ignore_labels=[]))
    tokens = sum(len(tokenizer()(t)["input_ids"]) - 2 for t in TEXTS)
    assert sum(len(row) for row in everything.json()["results"]) == tokens
    kept = {"ner": ["O", "PER"], "org": ["O", "DATE", "ORG"]}
    for name, ignore in kept.items():
        body = {"adapter_id": name, "inputs": TEXTS, "aggregation": "average", "ignore_labels": ignore}
        got = post(srv, body).json()["results"]
        assert_same(got, expect(name, "average", ignore_labels=ignore))
        assert not {e["entity_group"] for row in got for e in row} & set(ignore)


def test_adapters_with_different_labels_mixed_in_one_stream(srv, expect):
    # Every adapter and strategy at once, each request's texts in another order.
    jobs = [(name, aggregation) for aggregation in AGGREGATIONS for name in ("org", "ner")]
    jobs = [(name, aggregation, k % len(TEXTS)) for k, (name, aggregation) in enumerate(jobs)]

    def ask(job):
        name, aggregation, i = job
        texts = TEXTS[i:] + TEXTS[:i]
        response = post(srv, {"adapter_id": name, "inputs": texts, "aggregation": aggregation})
        assert response.status_code == 200, response.text
        return job, response.json()["results"]

    with ThreadPoolExecutor(8) as pool:
        for (name, aggregation, i), got in pool.map(ask, jobs):
            want = expect(name, aggregation)
            assert_same(got, want[i:] + want[:i])


def test_a_long_text_is_cut_on_the_side_asked(srv, models):
    for direction in ("right", "left"):
        tok = tokenizer()
        if direction == "left":
            tok = copy.deepcopy(tok)
            tok.truncation_side = "left"
        body = {"adapter_id": "ner", "inputs": [LONG, TEXTS[0]], "truncation_direction": direction}
        response = post(srv, body)
        assert response.status_code == 200, response.text
        assert response.json()["truncated"] == [True, False]
        got = response.json()["results"]
        assert_same(got, reference(models["ner"], [LONG, TEXTS[0]], "simple", tok=tok))
        # The right cut keeps the text's start, the left cut its end.
        if direction == "right":
            assert got[0][0]["start"] < 20 and got[0][-1]["end"] < len(LONG) - 1000
        else:
            assert got[0][0]["start"] > 1000 and got[0][-1]["end"] > len(LONG) - 20
    refused = post(srv, {"adapter_id": "ner", "inputs": ["ok", LONG], "truncate": False})
    assert refused.status_code == 422
    assert refused.json()["error_type"] == "validation" and "Input 1 has" in refused.json()["error"]


def test_client_returns_entities(srv, expect):
    want = expect("ner", "max")[:2]
    with Client(srv.url) as client:
        answer = client.tokens("ner", TEXTS[:2], aggregation="max")
    assert isinstance(answer, Entities) and answer.adapter_id == "ner"
    assert all(isinstance(e, Entity) for row in answer.results for e in row)
    assert [[(e.label, e.word, e.start, e.end) for e in row] for row in answer.results] == [
        [(e["entity_group"], e["word"], e["start"], e["end"]) for e in row] for row in want
    ]

    async def tokens():
        async with AsyncClient(srv.url) as client:
            return await client.tokens("ner", TEXTS[0], aggregation="none", ignore_labels=[])

    single = asyncio.run(tokens())
    assert len(single.results) == 1
    assert [e.index for e in single.results[0]] == list(range(1, len(tokenizer()(TEXTS[0])["input_ids"]) - 1))
    with Client(srv.url) as client, pytest.raises(ClientValidationError):
        client.tokens("sentiment", "hi")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"adapter_id": "ner", "inputs": "hi", "aggregation": "longest"}, 422, "aggregation"),
        ({"adapter_id": "ner", "inputs": []}, 422, "empty list"),
        ({"adapter_id": "ner", "inputs": ""}, 422, "empty string"),
        ({"adapter_id": "ner", "inputs": ["hi"] * 33}, 422, "at most 32"),
        ({"adapter_id": "ner", "inputs": "hi", "ignore_labels": "O"}, 422, "ignore_labels"),
        ({"adapter_id": "ner", "inputs": "hi", "ignore_labels": [1]}, 422, "ignore_labels"),
        ({"adapter_id": "ner", "inputs": "hi", "stride": 16}, 422, "stride"),
        ({"inputs": "hi"}, 422, "adapter_id is required"),
        ({"adapter_id": "sentiment", "inputs": "hi"}, 422, "POST /classify"),
        ({"adapter_id": "nobody", "inputs": "hi"}, 404, "nobody"),
    ],
)
def test_bad_input_is_a_contract_error(srv, body, status, needle):
    response = post(srv, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and needle in error["error"]
    assert error["error_type"] == ("not_found" if status == 404 else "validation")


def test_a_token_adapter_on_classify_is_sent_to_tokens(srv):
    response = httpx.post(srv.url + "/classify", json={"adapter_id": "ner", "inputs": "hi"}, timeout=60)
    assert response.status_code == 422 and "send its requests to POST /tokens" in response.json()["error"]


def test_not_json_is_refused(srv):
    response = httpx.post(
        srv.url + "/tokens", content=b"{", headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400 and response.json()["error_type"] == "bad_request"


def test_openapi_documents_tokens(srv):
    doc = httpx.get(srv.url + "/openapi.json", timeout=60).json()
    media = doc["paths"]["/tokens"]["post"]["requestBody"]["content"]["application/json"]
    schema = media["schema"]["properties"]
    assert schema["aggregation"]["default"] == "simple" and schema["ignore_labels"]["default"] == ["O"]
    assert schema["inputs"]["anyOf"][1]["maxItems"] == 32
    example = media["example"]
    assert post(srv, {**example, "adapter_id": "ner"}).status_code == 200


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A tiny BERT whose tokenizer is a slow (Python) one: no offsets, no word boundaries."""
    root = tmp_path_factory.mktemp("slow-model")
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        **tiny_config_kwargs())  # fmt: skip
    model_dir = save_model(root / "model", config)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    shutil.copy(Path(tokenizer().name_or_path) / "vocab.txt", root / "vocab.txt")
    BertTokenizerLegacy(str(root / "vocab.txt"), do_lower_case=True).save_pretrained(model_dir)
    assert not AutoTokenizer.from_pretrained(model_dir).is_fast
    adapter = save_task_adapter(root / "ner", "TOKEN_CLS", num_labels=len(NER), seed=14, labels=NER,
                                model_dir=model_dir)  # fmt: skip
    return model_dir, adapter


def test_a_slow_tokenizer_has_no_offsets_and_no_word_aggregation(slow_model, tmp_path):
    model_dir, adapter = slow_model
    model = peft_model(adapter, "TOKEN_CLS", model_dir).merge_and_unload().eval()
    model.config.id2label = dict(enumerate(NER))
    slow = AutoTokenizer.from_pretrained(model_dir)
    server = serve(tmp_path / "store", {"ner": adapter}, "--model", str(model_dir))
    try:
        for aggregation in ("none", "simple"):
            response = post(server, {"adapter_id": "ner", "inputs": TEXTS, "aggregation": aggregation})
            assert response.status_code == 200, response.text
            got = response.json()["results"]
            assert_same(got, reference(model, TEXTS, aggregation, tok=slow))
            assert any(got) and all(e["start"] is None and e["end"] is None for row in got for e in row)
        for aggregation in ("first", "average", "max"):
            with pytest.raises(ValueError, match="Slow tokenizers"):
                reference(model, TEXTS, aggregation, tok=slow)
            response = post(server, {"adapter_id": "ner", "inputs": TEXTS, "aggregation": aggregation})
            assert response.status_code == 422
            assert response.json()["error_type"] == "validation" and "simple" in response.json()["error"]
    finally:
        server.stop()
