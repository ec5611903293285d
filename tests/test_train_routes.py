"""`loraplex train` for the routes beyond /classify's labels: `--task rerank` (a one-output cross-encoder,
served by /rerank), `--task embed` (in-batch negatives, served by /embed), `--task regression` with a
second text and `--labels 1` (one output, a regression). Each learns a small data set that needs what the
task adds (both texts, the new pairing), beats its baseline, and a live server answers with it through its
route what PEFT's `PeftModel` computes; `--model` that cannot be had exits 2 with one line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from loraplex.train.trainer import main
from tests.live_server import REPO
from tests.peft_factory import tokenizer
from tests.task_support import peft_model, serve
from tests.test_train_tasks import TOPICS, WORDS, write_jsonl

PARTNERS = ["falcon", "copper", "violet", "harbor", "maple", "tiger", "silver", "lemon", "orbit", "velvet"]
ROWS = 80  # per data set, 16 of them held out
COMMON = ["--batch-size", "8", "--max-length", "32", "--learning-rate", "3e-3", "--validation-split", "16"]


# ----------------------------------------------------------------------------- tiny learnable data sets


GRADES = [0.0, 0.3, 0.7, 1.0]  # graded relevance: none, one, two or all three words of the query's topic


def rerank_data(root: Path) -> Path:
    """A query names a topic; a text is relevant (1) when it holds a word of that topic, else 0."""
    rng = random.Random(8)
    rows = []
    for i in range(ROWS):
        query = rng.choice(list(TOPICS))
        topic = query if i % 2 else rng.choice([t for t in TOPICS if t != query])
        text = f"the {rng.choice(TOPICS[topic])} {rng.choice(WORDS)}"
        rows.append({"query": query, "passage": text, "relevance": int(topic == query)})
    return write_jsonl(root / "rerank.jsonl", rows)


def graded_rerank_data(root: Path) -> Path:
    """A query names a topic; a text of three words is as relevant as the number of them of that topic
    says (GRADES): relevances between 0 and 1, not only the two ends."""
    rng = random.Random(10)
    rows = []
    for _ in range(ROWS):
        query = rng.choice(list(TOPICS))
        count = rng.randrange(len(GRADES))
        words = [rng.choice(TOPICS[query]) for _ in range(count)] + rng.sample(WORDS, 3 - count)
        rng.shuffle(words)
        rows.append({"text": query, "text_pair": " ".join(words), "label": GRADES[count]})
    return write_jsonl(root / "graded.jsonl", rows)


def embed_data(root: Path) -> Path:
    """Two of ten words, and their partners (a pairing the base model cannot know) in the same order."""
    rng = random.Random(7)
    rows = []
    for _ in range(ROWS):
        a, b = rng.sample(range(len(PARTNERS)), 2)
        rows.append({"text": f"{WORDS[a]} and {WORDS[b]}", "text_pair": f"{PARTNERS[a]} with {PARTNERS[b]}"})
    return write_jsonl(root / "embed.jsonl", rows)


def pair_score_data(root: Path) -> Path:
    """How many of the first text's two words the second text holds: 0, 1 or 2; only both texts tell."""
    rng = random.Random(9)
    rows = []
    for _ in range(ROWS):
        first = rng.sample(WORDS, 2)
        shared = rng.randint(0, 2)
        others = rng.sample([w for w in WORDS if w not in first], 2 - shared)
        second = first[:shared] + others
        rng.shuffle(second)
        rows.append({"text": " ".join(first), "other": " ".join(second), "score": shared})
    return write_jsonl(root / "overlap.jsonl", rows)


# name -> (data, options)
ADAPTERS = {
    "rerank": (
        rerank_data,
        ["--task", "rerank", "--text-column", "query", "--text-pair-column", "passage",
         "--label-column", "relevance", "--max-steps", "120"],
    ),
    "graded-rerank": (graded_rerank_data, ["--task", "rerank", "--max-steps", "60"]),
    "embed": (embed_data, ["--task", "embed", "--max-steps", "40"]),
    "pair-regression": (
        pair_score_data,
        ["--task", "regression", "--text-pair-column", "other", "--label-column", "score",
         "--max-steps", "60"],
    ),
    "labels-1": (
        pair_score_data,
        ["--task", "pairs", "--labels", "1", "--text-pair-column", "other", "--label-column", "score",
         "--max-steps", "60"],
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-routes")
    out = {}
    for name, (make, options) in ADAPTERS.items():
        out[name] = root / name
        assert main([str(make(root)), "-o", str(out[name]), *COMMON, *options]) == 0, name
    return out


@pytest.fixture(scope="module")
def srv(trained, tmp_path_factory):
    server = serve(tmp_path_factory.mktemp("store"), trained)
    yield server
    server.stop()


def post(srv, route: str, body: dict) -> dict:
    response = httpx.post(srv.url + route, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def report(adapter: Path) -> dict:
    return json.loads((adapter / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------ rerank


def test_rerank_learns_a_cross_encoder_that_rerank_serves_as_peft_does(trained, srv):
    adapter = trained["rerank"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "problem_type" not in config
    assert json.loads((adapter / "labels.json").read_text()) == ["relevance"]
    metrics = report(adapter)
    validation = metrics["validation"]
    assert metrics["task"] == "rerank" and metrics["weak"] == []
    assert validation["auc"] > 0.9, validation
    assert validation["mse"] < validation["mean_baseline"]["mse"], validation

    query, texts = "food", ["the dog garden", "a bowl of soup", "the red letter", "fresh bread and stone"]
    results = post(srv, "/rerank", {"adapter_id": "rerank", "query": query, "texts": texts})["results"]
    batch = tokenizer()([query] * len(texts), texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = torch.sigmoid(peft_model(adapter, "SEQ_CLS")(**batch).logits[:, 0])
    order = sorted(range(len(texts)), key=lambda i: -want[i])
    assert [r["index"] for r in results] == order
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), want[order], atol=1e-5, rtol=0)
    assert {r["index"] for r in results[:2]} == {1, 3}  # the two food texts first: what the data taught


def test_rerank_learns_graded_relevance(trained, srv):
    adapter = trained["graded-rerank"]
    metrics = report(adapter)
    validation = metrics["validation"]
    assert metrics["task"] == "rerank" and metrics["weak"] == []
    assert validation["mse"] < validation["mean_baseline"]["mse"] / 2, validation

    texts = ["soup stone river", "river bread rice", "table pencil music", "rice soup bread"]  # 1, 2, 0, 3
    body = {"adapter_id": "graded-rerank", "query": "food", "texts": texts}
    results = post(srv, "/rerank", body)["results"]
    assert [r["index"] for r in results] == [3, 1, 0, 2]  # more of the topic, more relevant
    batch = tokenizer()(["food"] * len(texts), texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = torch.sigmoid(peft_model(adapter, "SEQ_CLS")(**batch).logits[:, 0])
    got = torch.tensor([r["score"] for r in sorted(results, key=lambda r: r["index"])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- embed


def test_embed_learns_the_pairing_and_embed_serves_it_as_peft_does(trained, srv):
    adapter = trained["embed"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and not config.get("modules_to_save")
    assert not (adapter / "labels.json").exists()  # no head, no labels
    metrics = report(adapter)
    validation = metrics["validation"]
    assert metrics["task"] == "embed" and metrics["weak"] == [] and metrics["pooling"] == "mean"
    assert validation["mrr"] > validation["base_model_baseline"]["mrr"] + 0.2, validation

    texts = [f"{WORDS[a]} and {WORDS[b]}" for a, b in ((0, 9), (4, 2), (7, 1))]
    partners = [f"{PARTNERS[a]} with {PARTNERS[b]}" for a, b in ((0, 9), (4, 2), (7, 1))]
    body = post(srv, "/embed", {"adapter_id": "embed", "inputs": texts + partners})
    assert body["pooling"] == "mean" and body["normalize"] is True
    got = torch.tensor([r["embedding"] for r in body["results"]])
    batch = tokenizer()(texts + partners, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = peft_model(adapter, "FEATURE_EXTRACTION")(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    want = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    similarity = got[:3] @ got[3:].T
    assert similarity.argmax(1).tolist() == [0, 1, 2]  # each text finds its own partners


# ---------------------------------------------------------------------------- regression with two texts


@pytest.mark.parametrize("name", ["pair-regression", "labels-1"])
def test_regression_of_pairs_reads_both_texts_and_classify_serves_it_as_peft_does(name, trained, srv):
    adapter = trained[name]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["problem_type"] == "regression"
    assert json.loads((adapter / "labels.json").read_text()) == ["score"]
    metrics = report(adapter)
    validation = metrics["validation"]
    assert metrics["task"] == "regression" and metrics["weak"] == []
    assert validation["mse"] < validation["mean_baseline"]["mse"] / 2, validation
    assert metrics["settings"]["text_pair_column"] == "other"

    pairs = [["river cloud", "cloud river"], ["river cloud", "music stone"], ["table pencil", "pencil sun"]]
    results = post(srv, "/classify", {"adapter_id": name, "inputs": pairs})["results"]
    got = torch.tensor([r["score"] for r in results])
    batch = tokenizer()([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = peft_model(adapter, "SEQ_CLS")(**batch).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(abs(s - t) < 0.6 for s, t in zip(got.tolist(), [2, 0, 1], strict=True)), got


# ---------------------------------------------------------------------------------------------- weak results


def nothing_to_learn(task: str, root: Path) -> Path:
    """Rows from which no adapter can do better than the task's trivial baseline: every rerank and
    regression row has the same texts (whatever the adapter answers, it answers it for every row), and
    every embed row pairs a text with itself (the base model already finds each pair's partner first)."""
    rows = []
    for i in range(16):
        if task == "rerank":
            rows.append({"text": "food", "text_pair": "the river stone", "label": int(i % 4 == 0)})
        elif task == "regression":
            rows.append({"text": "the river was okay", "label": 1.0 if i % 2 else 3.0})
        else:
            text = f"{WORDS[i % len(WORDS)]} and {PARTNERS[i % len(PARTNERS)]} {i}"
            rows.append({"text": text, "text_pair": text})
    return write_jsonl(root / f"{task}-nothing.jsonl", rows)


# task -> what its weak result is said to be no better than
WEAK = {
    "rerank": "no better than always answering the training mean relevance 0.25",
    "regression": "no better than always answering the training mean 2 ",
    "embed": "no better than the base model's own embeddings (1.0000, top-1 1.0000)",
}


@pytest.mark.parametrize("task", WEAK)
def test_a_weak_result_exits_3_naming_the_reason_and_writes_nothing_unless_allowed(task, tmp_path, capsys):
    reason = WEAK[task]
    data = nothing_to_learn(task, tmp_path)
    out = tmp_path / "weak"
    # validated on its own rows: the training mean is the validation rows' mean, the best constant answer
    options = [str(data), "-o", str(out), "--task", task, "--validation-file", str(data), "--max-steps", "1",
               "--batch-size", "8", "--max-length", "16"]  # fmt: skip
    assert main(options) == 3
    err = capsys.readouterr().err
    assert "warning: a weak result" in err and reason in err and "--allow-weak" in err, err
    assert f"nothing written to {out}" in err
    assert not out.exists() or not any(out.iterdir()), "nothing is written without --allow-weak"

    assert main([*options, "--allow-weak"]) == 0
    assert "adapter written to" in capsys.readouterr().out
    written = report(out)
    assert written["task"] == task and any(reason in weak for weak in written["weak"]), written["weak"]
    assert (out / "adapter_model.safetensors").is_file()


# -------------------------------------------------------------------------------------- bad data, --model


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("rerank", '{"text": "q", "text_pair": "a", "label": 1}\n{"text": "q", "text_pair": "b", "label": 3}',
         ["line 2", "outside [0, 1]"]),
        ("rerank", '{"text": "q", "text_pair": "a", "label": 0}\n{"text": "q", "text_pair": "b", "label": 0}',
         ["relevant and irrelevant"]),
        ("embed", '{"text": "a", "label": "x"}\n', ["no column 'text_pair'", "--text-pair-column"]),
        ("embed", '{"text": "a", "text_pair": "b"}\n{"text": "c", "text_pair": ""}\n',
         ["an empty 'text_pair'", "line 2"]),
        ("regression", '{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n', None),
    ],
)  # fmt: skip
def test_bad_data_exits_2_naming_the_row(task, text, expected, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    out = tmp_path / "adapter"
    options = [str(data), "-o", str(out), "--task", task, "--validation-split", "0"]
    if expected is None:  # a regression asked for a second text that the rows lack
        expected = ["no column 'other'", "--text-pair-column"]
        options += ["--text-pair-column", "other"]
    assert main(options) == 2
    err = capsys.readouterr().err
    assert "error:" in err and all(part in err for part in expected), err
    assert not out.exists()


@pytest.mark.parametrize("offline", ["1", None])
def test_a_model_that_cannot_be_had_is_one_line_and_exit_2(offline, tmp_path):
    """HF_HUB_OFFLINE, or a hub id the hub does not have or cannot be asked for: one line, no retries."""
    data = rerank_data(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    options = ["--task", "rerank", "--text-column", "query", "--text-pair-column", "passage",
               "--label-column", "relevance", "--model", "loraplex-tests/no-such-model"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "loraplex", "train", str(data), "-o", str(tmp_path / "out"), *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("loraplex train: error: --model "), done.stderr
    assert "loraplex-tests/no-such-model" in errors[0] and "Retrying" not in done.stderr
