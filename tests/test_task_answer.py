"""/answer through a live server against PEFT's `PeftModel` (AutoModelForQuestionAnswering with the adapter
alone) read by a plain loop implementation of the question-answering pipeline's decoding: short contexts,
contexts of several windows, top_k, max_answer_len, the null answer, several adapters at once, bad input,
and the client."""

from __future__ import annotations

import asyncio
import math
from functools import lru_cache

import httpx
import pytest
import torch

from loraplex.client import Answer, AsyncClient, Client, ValidationError
from tests.device_support import TOLERANCE
from tests.peft_factory import tokenizer
from tests.task_support import peft_model, save_task_adapter, serve

SHORT = [
    (
        "Who wrote the first program?",
        "Ada Lovelace wrote the first program for the Analytical Engine in 1843.",
    ),
    ("Where is the café?", "The café opens at eight in Zürich, next to the old station."),
    ("What?", "ok"),
]
LONG_CONTEXT = " ".join(
    f"In {1900 + i} the committee of district {i} met in hall {i % 7} and voted on proposal {i * 3}."
    for i in range(6)
)
QUESTION = "When did the committee vote on the proposal?"
WINDOWS = {"max_seq_len": 48, "doc_stride": 8}  # LONG_CONTEXT in several windows of 48 tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-answer")
    return {
        "qa": save_task_adapter(root / "qa", "QUESTION_ANS", num_labels=2, seed=11),
        "qa-all": save_task_adapter(
            root / "qa-all",
            "QUESTION_ANS",
            num_labels=2,
            seed=12,
            target_modules=("query", "key", "value", "dense"),
        ),
        "sent": save_task_adapter(root / "sent", "SEQ_CLS", num_labels=3, seed=13),
    }


@pytest.fixture(scope="module")
def srv(adapters, tmp_path_factory):
    server = serve(tmp_path_factory.mktemp("store"), adapters)
    yield server
    server.stop()


def post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/answer", json=body, timeout=60)


def inputs(pairs) -> list[dict]:
    return [{"question": q, "context": c} for q, c in pairs]


@lru_cache(maxsize=4)
def _model(adapter_dir):
    return peft_model(adapter_dir, "QUESTION_ANS")


def _softmax(values: list[float], keep: list[bool]) -> list[float]:
    top = max(v for v, k in zip(values, keep, strict=True) if k)
    exps = [math.exp(v - top) if k else 0.0 for v, k in zip(values, keep, strict=True)]
    total = sum(exps)
    return [e / total for e in exps]


def reference(
    adapter_dir, pairs, *, top_k=1, doc_stride=128, max_answer_len=15, max_seq_len=512,
    handle_impossible_answer=False,
) -> tuple[list[list[dict]], list[int]]:  # fmt: skip
    """The pipeline's answers from PeftModel's logits, one window at a time, in plain loops; and the
    number of windows per input."""
    tok = tokenizer()
    results, counts = [], []
    for question, context in pairs:
        enc = tok(
            question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
            return_overflowing_tokens=True, return_offsets_mapping=True,
        )  # fmt: skip
        counts.append(len(enc["input_ids"]))
        spans: dict[tuple[int, int], float] = {}
        null = math.inf
        for w, ids in enumerate(enc["input_ids"]):
            with torch.inference_mode():
                out = _model(adapter_dir)(
                    input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([enc["token_type_ids"][w]])
                )
            in_context = [s == 1 for s in enc.sequence_ids(w)]
            keep = [c or t == tok.cls_token_id for c, t in zip(in_context, ids, strict=True)]
            p_start = _softmax(out.start_logits[0].double().tolist(), keep)
            p_end = _softmax(out.end_logits[0].double().tolist(), keep)
            null = min(null, p_start[0] * p_end[0])
            offsets = enc["offset_mapping"][w]
            for s in range(len(ids)):
                for e in range(s, min(len(ids), s + max_answer_len)):
                    if in_context[s] and in_context[e]:
                        chars = (offsets[s][0], offsets[e][1])
                        spans[chars] = max(spans.get(chars, 0.0), p_start[s] * p_end[e])
        ranked = [{"answer": context[a:b], "score": p, "start": a, "end": b} for (a, b), p in spans.items()]
        if handle_impossible_answer:
            ranked.append({"answer": "", "score": null, "start": 0, "end": 0})
        ranked.sort(key=lambda r: -r["score"])
        results.append(ranked[:top_k])
    return results, counts


def assert_same(got: list[list[dict]], want: list[list[dict]]) -> None:
    assert len(got) == len(want)
    for got_row, want_row in zip(got, want, strict=True):
        assert [(a["answer"], a["start"], a["end"]) for a in got_row] == [
            (a["answer"], a["start"], a["end"]) for a in want_row
        ]
        for a, b in zip(got_row, want_row, strict=True):
            assert abs(a["score"] - b["score"]) <= TOLERANCE, (a, b)


def test_peft_runs_question_answering_without_token_types(adapters):
    """PeftModelForQuestionAnswering drops token_type_ids (in training too), so /answer's windows are all
    of type 0; the encoder itself would give other logits with the pair's types."""
    tok = tokenizer()
    batch = tok(*SHORT[0], return_tensors="pt")
    model = _model(adapters["qa"])
    with torch.inference_mode():
        typed = model(**batch).start_logits
        untyped = model(input_ids=batch["input_ids"]).start_logits
        encoder_typed = model.base_model.model(**batch).start_logits
    assert batch["token_type_ids"].any()
    torch.testing.assert_close(typed, untyped, atol=0, rtol=0)
    assert (encoder_typed - typed).abs().max() > 1e-3


def test_short_contexts_match_peft(srv, adapters):
    response = post(srv, {"adapter_id": "qa", "inputs": inputs(SHORT)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter_id"] == "qa" and body["adapter_version"]
    want, counts = reference(adapters["qa"], SHORT)
    assert counts == [1, 1, 1]
    assert_same(body["results"], want)
    for (_, context), [best] in zip(SHORT, body["results"], strict=True):
        assert context[best["start"] : best["end"]] == best["answer"] != ""
    # One object instead of a list: the same answer, as a list of one.
    one = post(srv, {"adapter_id": "qa", "inputs": {"question": SHORT[1][0], "context": SHORT[1][1]}})
    assert one.status_code == 200, one.text
    assert_same(one.json()["results"], want[1:2])
    # ... or the question and its context at the top level, without inputs.
    top = post(srv, {"adapter_id": "qa", "question": SHORT[1][0], "context": SHORT[1][1]})
    assert top.status_code == 200, top.text
    assert_same(top.json()["results"], want[1:2])


def test_a_long_context_is_read_in_windows(srv, adapters):
    pairs = [(QUESTION, LONG_CONTEXT), SHORT[0]]
    options = {**WINDOWS, "top_k": 4}
    want, counts = reference(adapters["qa"], pairs, **options)
    assert counts[0] >= 3 and counts[1] == 1
    response = post(srv, {"adapter_id": "qa", "inputs": inputs(pairs), **options})
    assert response.status_code == 200, response.text
    assert_same(response.json()["results"], want)
    # The answers come from all over the context, not from its first window alone.
    first_window_end = tokenizer()(QUESTION, LONG_CONTEXT, truncation="only_second", max_length=48,
                                   return_offsets_mapping=True)["offset_mapping"][-2][1]  # fmt: skip
    assert any(a["start"] >= first_window_end for a in response.json()["results"][0])
    # The default window (the model's 512 tokens) holds this context whole: other answers.
    whole, counts = reference(adapters["qa"], pairs[:1], top_k=4)
    assert counts == [1]
    response = post(srv, {"adapter_id": "qa", "inputs": inputs(pairs[:1]), "top_k": 4})
    assert_same(response.json()["results"], whole)


def test_top_k_and_max_answer_len(srv, adapters):
    options = {"top_k": 6, "max_answer_len": 2}
    want, _ = reference(adapters["qa-all"], SHORT[:2], **options)
    response = post(srv, {"adapter_id": "qa-all", "inputs": inputs(SHORT[:2]), **options})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert_same(results, want)
    assert [len(r) for r in results] == [6, 6]
    for row in results:
        assert [a["score"] for a in row] == sorted((a["score"] for a in row), reverse=True)
        for a in row:  # at most two tokens each
            assert len(tokenizer()(a["answer"], add_special_tokens=False)["input_ids"]) <= 2
    # A span longer than the context is no error: every span the context has competes.
    whole, _ = reference(adapters["qa-all"], [SHORT[2]], top_k=50, max_answer_len=10_000)
    response = post(srv, {"adapter_id": "qa-all", "inputs": inputs([SHORT[2]]), "top_k": 50,
                          "max_answer_len": 10_000})  # fmt: skip
    assert response.status_code == 200, response.text
    assert_same(response.json()["results"], whole)


def test_handle_impossible_answer_ranks_the_null_answer(srv, adapters):
    # With this adapter the null answer beats every span of "blue", and no span of "Paris".
    pairs = [("What?", "blue"), ("What?", "Paris")]
    want, _ = reference(adapters["qa"], pairs, handle_impossible_answer=True)
    assert [row[0]["answer"] for row in want] == ["", "Paris"]
    response = post(srv, {"adapter_id": "qa", "inputs": inputs(pairs), "handle_impossible_answer": True})
    assert response.status_code == 200, response.text
    assert_same(response.json()["results"], want)
    [null] = response.json()["results"][0]
    assert (null["answer"], null["start"], null["end"]) == ("", 0, 0)
    # Without the option there is no null answer.
    plain = post(srv, {"adapter_id": "qa", "inputs": inputs(pairs)}).json()["results"]
    assert [row[0]["answer"] for row in plain] == ["blue", "Paris"]
    # Over several windows: the least null score of the windows, ranked among all the spans.
    long = [(QUESTION, LONG_CONTEXT)]
    options = {**WINDOWS, "top_k": 10_000, "handle_impossible_answer": True}
    want, counts = reference(adapters["qa"], long, **options)
    assert counts[0] >= 3
    response = post(srv, {"adapter_id": "qa", "inputs": inputs(long), **options})
    assert response.status_code == 200, response.text
    [got] = response.json()["results"]
    # Every span is listed (fewer than top_k), so near-ties may be ordered either way: compare as sets.
    assert len(got) == len(want[0]) < 10_000
    assert [a["score"] for a in got] == sorted((a["score"] for a in got), reverse=True)
    scores = {(a["answer"], a["start"], a["end"]): a["score"] for a in got}
    for a in want[0]:
        assert abs(scores[a["answer"], a["start"], a["end"]] - a["score"]) <= TOLERANCE, a
    assert [a["start"] for a in got if a["answer"] == ""] == [0]


NAMES = ("qa", "qa-all", "qa")


def test_several_adapters_in_one_stream(srv, adapters):
    """Requests for two QA adapters and a classifier at once: batched together, each as it is alone."""
    pairs = [(QUESTION, LONG_CONTEXT), SHORT[0]]
    want = {name: reference(adapters[name], pairs, **WINDOWS, top_k=2)[0] for name in ("qa", "qa-all")}
    classify_body = {"adapter_id": "sent", "inputs": ["What a lovely day."], "raw_scores": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            bodies = [{"adapter_id": name, "inputs": inputs(pairs), **WINDOWS, "top_k": 2} for name in NAMES]
            calls = [http.post("/answer", json=body) for body in bodies]
            calls.append(http.post("/classify", json=classify_body))
            return await asyncio.gather(*calls)

    responses = asyncio.run(scenario())
    for response, name in zip(responses[:-1], NAMES, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["adapter_id"] == name
        assert_same(response.json()["results"], want[name])
    assert responses[-1].status_code == 200, responses[-1].text
    assert want["qa"] != want["qa-all"]


LONG_QUESTION = " ".join(["why"] * 60)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"inputs": {"question": "", "context": "text"}}, ["inputs.question", "empty"]),
        ({"inputs": [{"question": "Who?", "context": "  \n\t "}]}, ["inputs[0].context", "no tokens"]),
        ({"inputs": [{"question": "   ", "context": "text"}]}, ["inputs[0].question", "no tokens"]),
        ({"inputs": inputs(SHORT), "doc_stride": 64, "max_seq_len": 64}, ["doc_stride", "below"]),
        ({"inputs": inputs(SHORT), "doc_stride": 512}, ["doc_stride", "below"]),
        ({"inputs": inputs(SHORT), "top_k": 0}, ["top_k"]),
        ({"inputs": inputs(SHORT), "max_answer_len": 0}, ["max_answer_len"]),
        ({"inputs": inputs(SHORT), "doc_stride": -1}, ["doc_stride"]),
        ({"inputs": inputs(SHORT), "max_seq_len": 513}, ["max_seq_len", "512"]),
        ({"inputs": [{"question": LONG_QUESTION, "context": "x"}], "max_seq_len": 40}, ["no room"]),
        ({"inputs": [{"question": "Who?"}]}, ["inputs[0].context", "required"]),
        ({"inputs": [{"question": "Who?", "context": "x", "answer": "y"}]}, ["inputs[0].answer"]),
        ({"inputs": []}, ["empty list"]),
        ({}, ["inputs is required", "question and context"]),
        ({"question": "Who?"}, ["context is required"]),
        ({"context": "x"}, ["question is required"]),
        ({"question": "Who?", "context": "x", "inputs": inputs(SHORT)}, ["not both"]),
        ({"question": "", "context": "x"}, ["question", "empty"]),
        ({"inputs": ["Who?"]}, ["inputs[0]", "object"]),
        ({"inputs": inputs(SHORT), "top_k": "2"}, ["top_k"]),
        ({"inputs": inputs(SHORT * 11)}, ["33 questions", "at most 32"]),
        # 3,000 words in windows that move 2 tokens: thousands of rows, refused before tokenizing them.
        ({"inputs": [{"question": "Who?", "context": "word " * 3000}], "max_seq_len": 16, "doc_stride": 9},
         ["windows", "at most 32 per request"]),
        # About 150 windows: far below the queue's 1,024, but one request may not take more rows than
        # max_client_batch (32), however its inputs are cut.
        ({"inputs": [{"question": "Who?", "context": "word " * 300}], "max_seq_len": 16, "doc_stride": 9},
         ["windows", "at most 32 per request"]),
    ],
)  # fmt: skip
def test_bad_input_is_a_422_in_the_contract_shape(srv, body, words):
    response = post(srv, {"adapter_id": "qa", **body})
    assert response.status_code == 422, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == "validation"
    for word in words:
        assert word in error["error"], error["error"]


def test_wrong_task_adapter_names_the_route_to_use(srv):
    response = post(srv, {"adapter_id": "sent", "inputs": inputs(SHORT[:1])})
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"
    assert "POST /classify instead of /answer" in response.json()["error"]
    # And a QA adapter on /classify is sent here.
    response = httpx.post(srv.url + "/classify", json={"adapter_id": "qa", "inputs": "text"}, timeout=60)
    assert response.status_code == 422 and "POST /answer" in response.json()["error"]
    assert post(srv, {"adapter_id": "nobody", "inputs": inputs(SHORT[:1])}).status_code == 404


def test_client_answer_sync_and_async(srv, adapters):
    want, _ = reference(adapters["qa"], SHORT, top_k=2)
    with Client(srv.url) as client:
        one = client.answer("qa", SHORT[0][0], SHORT[0][1], top_k=2)
        many = client.answer("qa", SHORT, top_k=2)
        dicts = client.answer("qa", inputs(SHORT[:1]), top_k=2)
        with pytest.raises(ValidationError, match="top_k"):
            client.answer("qa", SHORT, top_k=0)
    assert isinstance(one.results[0][0], Answer) and one.adapter_id == "qa"
    assert_same([[a.__dict__ for a in row] for row in one.results], want[:1])
    assert_same([[a.__dict__ for a in row] for row in many.results], want)
    assert dicts.results == one.results and many.adapter_version == one.adapter_version

    async def scenario():
        async with AsyncClient(srv.url) as client:
            return await client.answer("qa", SHORT, top_k=2)

    assert asyncio.run(scenario()).results == many.results
