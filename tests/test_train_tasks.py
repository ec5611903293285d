"""`loraplex train --task` for every encoder task: a tiny learnable data set per task is learned (the weak
check passes), the adapter carries the task's task_type / problem_type and head, and the engine computes
what PEFT's `PeftModel` computes with it; bad data of each task exits 2 naming the row and the field."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from loraplex.engine.core import Engine
from loraplex.http.inputs import encode
from loraplex.train.trainer import main
from tests.family_support import load_adapter
from tests.peft_factory import tokenizer
from tests.task_support import peft_model

WORDS = ["river", "stone", "cloud", "table", "window", "garden", "pencil", "music", "letter", "forest",
         "bottle", "candle", "mirror", "ocean", "engine"]  # fmt: skip  # of none of the topics or names below
TOPICS = {
    "animal": ["cat", "dog", "horse"],
    "color": ["red", "blue", "green"],
    "food": ["bread", "rice", "soup"],
}
SCORES = {"terrible": 1.0, "bad": 2.0, "okay": 3.0, "good": 4.0, "excellent": 5.0}
NAMES = {"PER": ["alice", "bob", "carol", "dave"], "LOC": ["paris", "london", "rome", "tokyo"]}
ANSWERS = ["falcon", "copper", "violet", "harbor", "maple", "tiger", "silver", "lemon"]
ROWS = 80  # per data set, 16 of them held out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


# ----------------------------------------------------------------------------- tiny learnable data sets


def pairs_data(root: Path) -> Path:
    """'same' when the pair repeats the first text's word, else 'different': only both texts tell."""
    rng = random.Random(1)
    rows = []
    for i in range(ROWS):
        a = rng.choice(WORDS)
        b = a if i % 2 else rng.choice([w for w in WORDS if w != a])
        rows.append({"text": f"{a} {a}", "text_pair": f"{b} {b}", "label": "same" if a == b else "different"})
    return write_jsonl(root / "pairs.jsonl", rows)


def multi_label_data(root: Path) -> Path:
    """A text has a topic's label when it holds one of that topic's words (one or more topics per row)."""
    rng = random.Random(2)
    rows = [["text", "label"]]
    for _ in range(ROWS):
        topics = [t for t in TOPICS if rng.random() < 0.5] or [rng.choice(list(TOPICS))]
        words = [rng.choice(TOPICS[t]) for t in topics] + rng.sample(WORDS, 2)
        rng.shuffle(words)
        rows.append([" ".join(words), ";".join(topics)])
    return write_csv(root / "topics.csv", rows)


def regression_data(root: Path) -> Path:
    """The score of the review's one adjective, 1 (terrible) to 5 (excellent)."""
    rng = random.Random(3)
    rows = [["review", "stars"]]
    for _ in range(ROWS):
        word = rng.choice(list(SCORES))
        rows.append([f"the {rng.choice(WORDS)} was {word}", SCORES[word]])
    return write_csv(root / "stars.csv", rows)


def tokens_data(root: Path) -> Path:
    """Person and place names among common words, tagged PER, LOC and O."""
    rng = random.Random(4)
    rows = []
    for _ in range(ROWS):
        tags = [rng.choice(["PER", "LOC", "O", "O", "O"]) for _ in range(6)]
        words = [rng.choice(NAMES[t]) if t in NAMES else rng.choice(WORDS) for t in tags]
        rows.append({"tokens": words, "tags": tags})
    return write_jsonl(root / "names.jsonl", rows)


def qa_context(rng: random.Random, answer: str) -> str:
    before, after = rng.sample(WORDS, rng.randint(1, 6)), rng.sample(WORDS, rng.randint(1, 6))
    return f"{' '.join(before)} the secret word is {answer} then {' '.join(after)}"


def qa_data(root: Path) -> Path:
    """SQuAD JSON: the answer is the word after 'the secret word is', anywhere in a short context."""
    rng = random.Random(5)
    paragraphs = []
    for i in range(ROWS):
        answer = rng.choice(ANSWERS)
        context = qa_context(rng, answer)
        start = context.index(f"is {answer}") + 3
        qas = [
            {
                "id": str(i),
                "question": "What is the secret word?",
                "answers": [{"text": answer, "answer_start": start}],
            }
        ]
        paragraphs.append({"context": context, "qas": qas})
    path = root / "secret.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "secrets", "paragraphs": paragraphs}]}))
    return path


# task -> (data, extra options, PEFT task type, problem_type, labels.json, headline figure, its baseline)
TASKS = {
    "pairs": (pairs_data, [], "SEQ_CLS", None, ["different", "same"], ("accuracy", "majority_baseline")),
    "multi-label": (
        multi_label_data, ["--label-separator", ";", "--max-steps", "80"],  # three sigmoids learn slower
        "SEQ_CLS", "multi_label_classification",
        ["animal", "color", "food"], ("subset_accuracy", "majority_baseline"),
    ),
    "regression": (
        regression_data, ["--text-column", "review", "--label-column", "stars"], "SEQ_CLS", "regression",
        ["stars"], ("mse", "mean_baseline"),
    ),
    "tokens": (tokens_data, [], "TOKEN_CLS", None, ["LOC", "O", "PER"], ("accuracy", "majority_baseline")),
    "qa": (
        qa_data, ["--doc-stride", "8"], "QUESTION_ANS", None, ["start", "end"],
        ("f1", "first_words_baseline"),
    ),
}  # fmt: skip


def peft_outputs(adapter: Path, task_type: str, batch: dict) -> torch.Tensor:
    """PeftModel's logits `[B, labels]`, or `[B, T, labels]` (qa: start and end logits last)."""
    with torch.inference_mode():
        output = peft_model(adapter, task_type)(**batch)
    if task_type == "QUESTION_ANS":
        return torch.stack([output.start_logits, output.end_logits], -1).float()
    return output.logits.float()


def engine_inputs(task: str, rng: random.Random) -> tuple[list, dict]:
    """(rows for Engine.classify, the same inputs as PeftModel takes them) for a few new inputs."""
    tok = tokenizer()
    if task == "tokens":
        words = [["alice", "stone", "table", "rome"], ["garden", "dave", "ocean", "carol", "paris"]]
        batch = tok(words, is_split_into_words=True, padding=True, return_tensors="pt")
        return [tok(w, is_split_into_words=True)["input_ids"] for w in words], dict(batch)
    if task == "pairs":
        inputs = [("ocean ocean", "ocean ocean"), ("stone stone", "music music"), ("cloud", "cloud cloud")]
    elif task == "qa":
        inputs = [("What is the secret word?", qa_context(rng, a)) for a in ("tiger", "maple", "copper")]
    elif task == "regression":
        inputs = ["the mirror was excellent", "the river was terrible", "the candle was okay"]
    else:
        inputs = ["cat red table", "soup music", "blue horse rice window"]
    firsts = [i[0] if isinstance(i, tuple) else i for i in inputs]
    seconds = [i[1] for i in inputs] if isinstance(inputs[0], tuple) else None
    batch = tok(firsts, seconds, padding=True, return_tensors="pt")
    return encode(tok, 512, inputs), dict(batch)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", num_slots=1, max_rank=16)


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_is_learned_and_served_as_peft_does(task, engine, tmp_path, capsys):
    make, extra, task_type, problem_type, labels, (figure, baseline) = TASKS[task]
    out = tmp_path / "adapter"
    args = [str(make(tmp_path)), "-o", str(out), "--task", task, "--max-steps", "40", "--batch-size", "8",
            "--max-length", "32", "--learning-rate", "3e-3", "--validation-split", "16", *extra]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err  # 3 would be a weak result: the task was not learned
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == task and report["weak"] == []
    validation = report["validation"]
    better = validation[baseline][figure] - validation[figure] if figure == "mse" else None
    if better is None:
        better = validation[figure] - validation[baseline][figure]
    assert better > 0.2, (figure, validation[figure], validation[baseline])

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == task_type and config.get("problem_type") == problem_type
    assert json.loads((out / "labels.json").read_text()) == labels
    head = "qa_outputs" if task == "qa" else "classifier"
    assert head in config["modules_to_save"]

    weights = load_adapter(out, engine)
    assert weights.task == task_type and weights.num_labels == len(labels)
    engine.load_slot(0, weights)
    rows, batch = engine_inputs(task, random.Random(6))
    got = engine.classify(rows, [0] * len(rows))
    want = peft_outputs(out, task_type, batch)
    for i, row in enumerate(got):
        expected = want[i] if want.dim() == 2 else want[i, : len(rows[i])]
        assert row.shape == expected.shape, (row.shape, expected.shape)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)
    check_answers(task, got, rows)


def check_answers(task: str, got: list[torch.Tensor], rows: list) -> None:
    """What the served adapter answers for the new inputs is what the data taught."""
    if task == "pairs":
        assert [int(row.argmax()) for row in got] == [1, 0, 1]  # same, different, same: labels are sorted
    elif task == "multi-label":
        assert [(row > 0).int().tolist() for row in got] == [[1, 1, 0], [0, 0, 1], [1, 1, 1]]
    elif task == "regression":
        stars = [row[0].item() for row in got]  # on the data's own scale: the z-scoring is folded in
        assert all(abs(s - want) < 1.0 for s, want in zip(stars, [5, 1, 3], strict=True)), stars
    elif task == "tokens":
        tok = tokenizer()
        first = tok(["alice", "stone", "table", "rome"], is_split_into_words=True).word_ids()
        tags = [int(got[0][p].argmax()) for p, w in enumerate(first) if w is not None]
        assert tags == [2, 1, 1, 0]  # PER O O LOC
    else:
        tok = tokenizer()
        for row, ids, answer in zip(got, rows, ("tiger", "maple", "copper"), strict=True):
            start, end = int(row[:, 0].argmax()), int(row[:, 1].argmax())
            assert tok.decode(ids[start : end + 1]) == answer


# ------------------------------------------------------------------------------------------- bad data


def squad(context: str, answer: str, start: int) -> str:
    qas = [{"id": "q", "question": "Which?", "answers": [{"text": answer, "answer_start": start}]}]
    return json.dumps({"data": [{"paragraphs": [{"context": context, "qas": qas}]}]})


BAD_DATA = {
    "pairs: an empty second text": (
        "pairs", "d.jsonl",
        '{"text": "a", "text_pair": "b", "label": "x"}\n{"text": "c", "text_pair": " ", "label": "y"}\n',
        ["an empty 'text_pair'", "line 2"],
    ),
    "pairs: no second text column": (
        "pairs", "d.csv", "text,label\na,x\nb,y\n", ["no column 'text_pair'", "--text-pair-column"],
    ),
    "multi-label: labels that are not names": (
        "multi-label", "d.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": {"y": 1}}\n',
        ["'label' that is neither a list", "line 2"],
    ),
    "multi-label: one label only": (
        "multi-label", "d.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": []}\n',
        ["only one label"],
    ),
    "regression: not a number": (
        "regression", "d.csv", "text,label\na,1.5\nb,high\nc,2\n", ["'label' that is not a number", "line 3"],
    ),
    "regression: one value": ("regression", "d.csv", "text,label\na,2\nb,2\n", ["regression needs"]),
    "tokens: tags and words differ in length": (
        "tokens", "d.jsonl",
        '{"tokens": ["a", "b"], "tags": ["O", "X"]}\n{"tokens": ["a", "b", "c"], "tags": ["O", "X"]}\n',
        ["line 2", "'tags' has 2 tags but 'tokens' has 3 words"],
    ),
    "tokens: a CSV file": ("tokens", "d.csv", "tokens,tags\na,O\n", ["reads JSONL"]),
    "qa: answer not at answer_start": (
        "qa", "d.json", squad("the secret word is falcon", "falcon", 3),
        ["data[0].paragraphs[0].qas[0].answers[0]", "'answer_start' 3"],
    ),
    "qa: not SQuAD": ("qa", "d.json", '{"rows": []}', ["not SQuAD JSON"]),
    "qa: --labels": ("qa", "d.json", squad("the word is falcon", "falcon", 12), ["--labels is for"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_of_each_task_exits_2_naming_the_row(case, tmp_path, capsys):
    task, name, text, expected = BAD_DATA[case]
    data = tmp_path / name
    data.write_text(text)
    out = tmp_path / "adapter"
    extra = ["--labels", "start,end"] if "--labels" in case else []
    assert main([str(data), "-o", str(out), "--task", task, "--validation-split", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and all(part in err for part in expected), err
    assert not out.exists()
