"""/classify through real uvicorn: engine-exact results, concurrency across adapters, metrics, headers."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from tests.peft_factory import peft_logits
from tests.serving_support import (
    ADAPTER_SPECS,
    LONG_TEXT,
    TEXTS,
    adapter_dirs,
    main_server,
    metrics,
    reference,
    sample,
    scores_of,
)


@pytest.fixture(scope="module")
def srv():
    return main_server()


@pytest.fixture(scope="module")
def ref():
    return reference()


def post(srv, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(srv.url + "/classify", json=body, timeout=60, **kwargs)


@pytest.mark.parametrize("name", ["sent", "intent"])
@pytest.mark.parametrize("raw_scores", [False, True])
def test_classify_returns_what_the_engine_gives(srv, ref, name, raw_scores):
    labels = ref.labels[name]
    texts = TEXTS[:5]
    expected = ref.logits(name, texts).double()
    if not raw_scores:
        expected = torch.softmax(expected, dim=-1)

    one = post(srv, {"adapter_id": name, "inputs": texts[0], "raw_scores": raw_scores})
    batch = post(srv, {"adapter_id": name, "inputs": texts, "raw_scores": raw_scores})

    for response, want in ((one, expected[:1]), (batch, expected)):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter_id"] == name
        assert len(body["results"]) == len(want)
        got = scores_of(body, labels)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for result, row in zip(body["results"], got, strict=True):
            assert result["label"] == labels[int(row.argmax())]
            assert result["score"] == max(result["scores"].values())
        if not raw_scores:
            torch.testing.assert_close(got.sum(dim=-1), torch.ones(len(want), dtype=torch.float64))
    info = httpx.get(f"{srv.url}/adapters/{name}", timeout=10).json()
    assert one.json()["adapter_version"] == batch.json()["adapter_version"] == info["version"]


def test_classify_matches_peft(srv):
    folder = adapter_dirs()["topic"]
    response = post(srv, {"adapter_id": "topic", "inputs": TEXTS, "raw_scores": True})
    labels = list(response.json()["results"][0]["scores"])
    got = scores_of(response.json(), labels).float()
    torch.testing.assert_close(got, peft_logits(folder, TEXTS), atol=1e-4, rtol=0)


def test_long_input_is_truncated_by_default(srv, ref):
    response = post(srv, {"adapter_id": "tox", "inputs": [LONG_TEXT], "raw_scores": True})
    assert response.status_code == 200, response.text
    got = scores_of(response.json(), ref.labels["tox"])
    torch.testing.assert_close(got, ref.logits("tox", [LONG_TEXT]).double(), atol=1e-5, rtol=0)


def test_truncate_false_names_the_input_and_its_token_count(srv, ref):
    tokens = len(ref.engine.tokenizer(LONG_TEXT)["input_ids"])
    response = post(srv, {"adapter_id": "sent", "inputs": ["short", LONG_TEXT], "truncate": False})
    assert response.status_code == 422
    body = response.json()
    assert body["error_type"] == "validation"
    assert "Input 1" in body["error"] and f"{tokens} tokens" in body["error"]
    assert post(srv, {"adapter_id": "sent", "inputs": "short", "truncate": False}).status_code == 200


def test_unknown_adapter_is_404_never_a_fallback(srv):
    response = post(srv, {"adapter_id": "no-such-adapter", "inputs": "hello"})
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"


def test_adapter_id_header_must_match_the_body(srv):
    ok = post(srv, {"adapter_id": "sent", "inputs": "hello"}, headers={"X-Adapter-Id": "sent"})
    assert ok.status_code == 200
    bad = post(srv, {"adapter_id": "sent", "inputs": "hello"}, headers={"X-Adapter-Id": "tox"})
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"


def test_timing_headers_in_milliseconds(srv):
    """The parts add up within the whole, and the whole fits in what the client itself waited: a header in
    another unit (seconds, microseconds) or counted from another start breaks one of the two."""
    started = time.perf_counter()
    response = post(srv, {"adapter_id": "sent", "inputs": TEXTS})
    waited_ms = (time.perf_counter() - started) * 1000
    times = {h: int(response.headers[h]) for h in ("x-queue-time", "x-inference-time", "x-total-time")}
    # Each header is rounded to a whole millisecond: one apiece of slack.
    assert times["x-queue-time"] + times["x-inference-time"] <= times["x-total-time"] + 2
    assert times["x-total-time"] <= waited_ms + 1


def test_64_concurrent_clients_mixed_adapters_no_cross_talk(srv, ref):
    names = list(ADAPTER_SPECS)
    rng = random.Random(7)
    # Each client: its own adapter and its own texts, some a single string and some a batch.
    jobs = []
    for client in range(64):
        name = names[client % len(names)]
        texts = rng.sample(TEXTS, rng.randint(1, 4))
        jobs.append((name, texts[0] if client % 3 == 0 else texts))
    expected = {
        name: dict(zip(TEXTS, torch.softmax(ref.logits(name, TEXTS).double(), dim=-1), strict=True))
        for name in names
    }
    before = metrics(srv.url)

    async def run_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/classify", json={"adapter_id": n, "inputs": t}) for n, t in jobs)
            )

    responses = asyncio.run(run_all())
    for (name, inputs), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        texts = [inputs] if isinstance(inputs, str) else inputs
        got = scores_of(response.json(), ref.labels[name])
        want = torch.stack([expected[name][t] for t in texts])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    after = metrics(srv.url)

    def delta(name: str, **labels) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    batches = delta("loraplex_batch_size_count")
    rows = delta("loraplex_batch_size_sum")
    assert rows == sum(1 if isinstance(t, str) else len(t) for _, t in jobs)
    assert batches < rows  # rows were batched together ...
    assert delta("loraplex_batch_adapters_bucket", le="1.0") < batches  # ... across adapters
    # Six adapters, four slots: every batch kept to four distinct adapters, and slots were recycled.
    assert delta("loraplex_batch_adapters_bucket", le="4.0") == batches
    assert delta("loraplex_slot_evictions_total") > 0
    assert sample(after, "loraplex_resident_adapters") == 4
    assert sample(after, "loraplex_queue_depth") == 0


def test_metrics_exposition(srv):
    post(srv, {"adapter_id": "sent", "inputs": "hello"})
    samples = metrics(srv.url)
    names = {name for name, _ in samples}
    for name in (
        "loraplex_requests_total",
        "loraplex_request_duration_seconds_bucket",
        "loraplex_queue_duration_seconds_bucket",
        "loraplex_tokenization_duration_seconds_bucket",
        "loraplex_inference_duration_seconds_bucket",
        "loraplex_batch_size_bucket",
        "loraplex_batch_tokens_bucket",
        "loraplex_batch_adapters_bucket",
        "loraplex_queue_depth",
        "loraplex_requests_in_flight",
        "loraplex_inputs_total",
        "loraplex_resident_adapters",
        "loraplex_host_cached_adapters",
        "loraplex_slot_hits_total",
        "loraplex_slot_misses_total",
        "loraplex_slot_evictions_total",
        "loraplex_adapter_load_duration_seconds_bucket",
    ):
        assert name in names, name
    assert all(name.startswith("loraplex_") for name in names)
    assert sample(samples, "loraplex_requests_total", route="/classify", method="POST", status="200") > 0


def test_adapter_label_cardinality_is_bounded(srv):
    for name in ADAPTER_SPECS:
        assert post(srv, {"adapter_id": name, "inputs": "hello"}).status_code == 200
    adapters = {
        dict(labels)["adapter"] for name, labels in metrics(srv.url) if name == "loraplex_inputs_total"
    }
    # --metrics-max-adapters 3: the first adapters the engine served are named (the overflowing one of
    # an earlier test among them, though none of its answers counted), every later one is "other".
    assert 1 <= len(adapters - {"other"}) <= 3
    assert "other" in adapters


def test_openapi_documents_classify(srv):
    schema = httpx.get(srv.url + "/openapi.json", timeout=10).json()
    body = schema["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"adapter_id", "inputs", "truncate", "raw_scores"} <= set(body["properties"])
    assert httpx.get(srv.url + "/docs", timeout=10).status_code == 200
