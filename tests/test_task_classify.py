"""/classify grown: text pairs with token types, multi-label and regression heads, top_k, truncation
flags and direction; each answer against PEFT's `PeftModel` on the embedded model, through a live server."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch

from tests.device_support import TOLERANCE
from tests.peft_factory import tokenizer
from tests.task_support import peft_model, save_task_adapter, serve

PAIRS = [
    ["A man is playing a guitar on stage.", "Someone is performing music."],
    ["The cat sleeps on the sofa.", "A dog is running in the park outside."],
    ["ok", "The quarterly report shows revenue up 12% while costs stayed flat."],
]
TEXTS = ["The service was quick and the food was excellent.", "Terrible.", "Why is my package late?"]
LONG = " ".join(f"word{i}" for i in range(700))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-classify")
    return {
        "nli": save_task_adapter(root / "nli", "SEQ_CLS", num_labels=3, seed=1, target_modules="all-linear"),
        "tags": save_task_adapter(
            root / "tags", "SEQ_CLS", num_labels=4, seed=2, problem_type="multi_label_classification"
        ),
        "stars": save_task_adapter(root / "stars", "SEQ_CLS", num_labels=1, seed=3),
    }


@pytest.fixture(scope="module")
def srv(adapters, tmp_path_factory):
    server = serve(tmp_path_factory.mktemp("store"), adapters)
    yield server
    server.stop()


def post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/classify", json=body, timeout=60)


def reference(adapter_dir, inputs, **tokenize) -> torch.Tensor:
    """PeftModel logits for texts or pairs, token types as the tokenizer makes them."""
    tok = tokenize.pop("tok", tokenizer())
    firsts = [i[0] if isinstance(i, list) else i for i in inputs]
    seconds = [i[1] for i in inputs] if isinstance(inputs[0], list) else None
    batch = tok(firsts, seconds, padding=True, truncation=True, return_tensors="pt", **tokenize)
    with torch.inference_mode():
        return peft_model(adapter_dir, "SEQ_CLS")(**batch).logits.float()


def scores(body: dict) -> torch.Tensor:
    return torch.tensor([list(r["scores"].values()) for r in body["results"]])


def test_pairs_use_token_types_and_match_peft(srv, adapters):
    response = post(srv, {"adapter_id": "nli", "inputs": PAIRS})
    assert response.status_code == 200, response.text
    want = torch.softmax(reference(adapters["nli"], PAIRS), -1)
    torch.testing.assert_close(scores(response.json()), want, atol=TOLERANCE, rtol=0)
    # The pairs' second texts get token type 1: without token types PEFT gives other scores.
    batch = tokenizer()([p[0] for p in PAIRS], [p[1] for p in PAIRS], padding=True, return_tensors="pt")
    batch["token_type_ids"].zero_()
    with torch.inference_mode():
        untyped = torch.softmax(peft_model(adapters["nli"], "SEQ_CLS")(**batch).logits, -1)
    assert (untyped - want).abs().max() > 1e-4
    # A pair and a plain text in one request: each as it is alone.
    mixed = post(srv, {"adapter_id": "nli", "inputs": [PAIRS[0], TEXTS[0]]}).json()
    torch.testing.assert_close(scores(mixed)[0], want[0], atol=TOLERANCE, rtol=0)
    alone = torch.softmax(reference(adapters["nli"], [TEXTS[0]]), -1)[0]
    torch.testing.assert_close(scores(mixed)[1], alone, atol=TOLERANCE, rtol=0)


def test_multi_label_is_a_sigmoid_per_label_with_a_threshold(srv, adapters):
    want = torch.sigmoid(reference(adapters["tags"], TEXTS))
    labels = ["seq_cls_2_0", "seq_cls_2_1", "seq_cls_2_2", "seq_cls_2_3"]
    for threshold in (0.5, 0.3):
        body = post(srv, {"adapter_id": "tags", "inputs": TEXTS, "threshold": threshold}).json()
        torch.testing.assert_close(scores(body), want, atol=TOLERANCE, rtol=0)
        for result, row in zip(body["results"], want, strict=True):
            assert result["labels"] == [name for name, p in zip(labels, row, strict=True) if p >= threshold]
    # The sigmoids of one row do not sum to one, as a softmax would.
    assert (want.sum(-1) - 1).abs().max() > 1e-2


def test_one_label_is_a_raw_score(srv, adapters):
    body = post(srv, {"adapter_id": "stars", "inputs": TEXTS}).json()
    want = reference(adapters["stars"], TEXTS)[:, 0]
    got = torch.tensor([r["score"] for r in body["results"]])
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
    assert (want.abs() != 1).all()  # a softmax over one label would give 1.0


def test_top_k_ranks_the_best_labels(srv, adapters):
    body = post(srv, {"adapter_id": "nli", "inputs": TEXTS, "top_k": 2}).json()
    for result in body["results"]:
        ranked = sorted(result["scores"].items(), key=lambda kv: -kv[1])[:2]
        assert [(t["label"], t["score"]) for t in result["top"]] == ranked
    assert "top" not in post(srv, {"adapter_id": "nli", "inputs": TEXTS}).json()["results"][0]


def test_truncated_flag_and_direction(srv, adapters):
    inputs = [LONG, TEXTS[0], [LONG, "short hypothesis"]]
    for direction in ("right", "left"):
        body = post(srv, {"adapter_id": "nli", "inputs": inputs, "truncation_direction": direction}).json()
        assert [r["truncated"] for r in body["results"]] == [True, False, True]
        tok = copy.deepcopy(tokenizer())
        tok.truncation_side = direction
        parts = ([LONG, TEXTS[0]], [inputs[2]])
        want = torch.cat([torch.softmax(reference(adapters["nli"], i, tok=tok), -1) for i in parts])
        torch.testing.assert_close(scores(body), want, atol=TOLERANCE, rtol=0)
    right = post(srv, {"adapter_id": "nli", "inputs": LONG}).json()["results"][0]["scores"]
    left = post(srv, {"adapter_id": "nli", "inputs": LONG, "truncation_direction": "left"}).json()
    assert right != left["results"][0]["scores"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"inputs": [["a", "b", "c"]]}, 422, "a list of 3 items"),
        ({"inputs": [["a"]]}, 422, "a list of 1 items"),
        ({"inputs": [["a", ""]]}, 422, "empty string"),
        ({"inputs": [["a", 3]]}, 422, "must be a string"),
        ({"inputs": "a", "top_k": 0}, 422, "top_k"),
        ({"inputs": "a", "top_k": 4}, 422, "has 3 labels"),
        ({"inputs": "a", "threshold": 2}, 422, "threshold"),
        ({"inputs": "a", "truncation_direction": "middle"}, 422, "truncation_direction"),
        ({"inputs": LONG, "truncate": False}, 422, "tokens, more than the model's maximum"),
    ],
)
def test_bad_input_is_a_4xx_in_the_contract_shape(srv, body, status, words):
    response = post(srv, {"adapter_id": "nli", **body})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error_type"] == "validation" and words in error["error"], error


def test_nan_threshold_is_a_400(srv):
    raw = b'{"adapter_id": "nli", "inputs": "a", "threshold": NaN}'
    response = httpx.post(
        srv.url + "/classify", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400 and response.json()["error_type"] == "bad_request"
