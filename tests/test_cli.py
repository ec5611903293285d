"""The `loraplex` commands against a real server on loopback: texts from arguments, stdin and CSV / JSONL
files sent in chunks of the server's published max_client_batch (4 here) and printed in input order,
JSON lines, a refused chunk, embed and rerank, and `--version` and every option's default in `--help`."""

from __future__ import annotations

import io
import json
import math
import re
from importlib.metadata import version

import pytest

from loraplex import cli
from loraplex.client import Client
from tests.live_server import LiveServer
from tests.peft_factory import peft_logits, save_peft_adapter
from tests.task_support import save_task_adapter

LIMIT = 4  # the server's max_client_batch: 10 texts take three requests
TEXTS = [f"review number {i}: {word}" for i, word in enumerate(
    ["great", "awful", "fine", "superb", "broken", "meh", "lovely", "late", "perfect", "cold"])]  # fmt: skip
NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
LONG = " ".join(f"word{i}" for i in range(600))  # over the model's 512 tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli-adapters")
    return {
        "sent": save_peft_adapter(root / "sent", num_labels=3, seed=0, labels=["neg", "neu", "pos"]),
        "ranker": save_peft_adapter(root / "ranker", num_labels=1, seed=1, labels=["relevant"]),
        "vectors": save_task_adapter(root / "vectors", "FEATURE_EXTRACTION", seed=2),
        "ner": save_task_adapter(root / "ner", "TOKEN_CLS", num_labels=5, seed=3, labels=NER),
        "qa": save_task_adapter(root / "qa", "QUESTION_ANS", num_labels=2, seed=4),
    }


@pytest.fixture(scope="module")
def srv(adapters, tmp_path_factory):
    preload = [arg for name, path in adapters.items() for arg in ("--preload", f"{name}={path}")]
    store = tmp_path_factory.mktemp("cli-store")
    with LiveServer("--adapter-store", str(store), "--max-client-batch", str(LIMIT), *preload) as server:
        yield server


@pytest.fixture(scope="module")
def reference(adapters) -> dict[str, list[float]]:
    """PEFT's own logits for each text under the sentiment adapter."""
    return dict(zip(TEXTS, peft_logits(adapters["sent"], TEXTS).tolist(), strict=True))


def run(capsys, monkeypatch, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """`loraplex ARGV` through the real entry point, in this process (argparse exits become the code)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def flat(vectors) -> list[float]:
    return [x for vector in vectors for x in vector]


def assert_matches_peft(results: list[dict], texts: list[str], reference: dict) -> None:
    assert [r["text"] for r in results] == texts and [r["index"] for r in results] == list(range(len(texts)))
    for r in results:
        assert [r["scores"][lab] for lab in ("neg", "neu", "pos")] == pytest.approx(
            reference[r["text"]], abs=1e-5
        )


# ------------------------------------------------------------------------------------- classify in chunks


def test_stdin_past_the_limit_comes_back_in_input_order(srv, reference, capsys, monkeypatch):
    # 10 texts against a limit of 4: one request would be refused, so this passes only when the limit is
    # read from the server and the chunks' answers are put back in order.
    code, out, err = run(capsys, monkeypatch, "classify", "sent", "-", "--json", "--raw-scores", "--url",
                         srv.url, stdin="\n".join(TEXTS) + "\n\n")  # fmt: skip
    assert code == 0, err
    lines = json_lines(out)
    assert_matches_peft(lines, TEXTS, reference)
    with Client(srv.url) as client:
        version_now = client.get("sent").version
    assert {line["adapter_version"] for line in lines} == {version_now}

    code, out, err = run(capsys, monkeypatch, "classify", "sent", "-", "--url", srv.url,
                         stdin="\n".join(TEXTS))  # fmt: skip
    heading, header, *rows = out.splitlines()
    assert code == 0 and heading == f"adapter sent version {version_now}"
    assert header.split() == ["LABEL", "SCORE", "NEG", "NEU", "POS", "TEXT"]
    assert [row.split("  ")[-1].strip() for row in rows] == TEXTS


def test_arguments_past_the_limit_give_one_json_answer(srv, reference, capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "classify", "sent", *TEXTS, "--json", "--raw-scores",
                         "--url", srv.url)  # fmt: skip
    assert code == 0, err
    body = json.loads(out)
    assert body["adapter_id"] == "sent" and len(body["results"]) == len(TEXTS)
    for text, result in zip(TEXTS, body["results"], strict=True):
        assert list(result["scores"].values()) == pytest.approx(reference[text], abs=1e-5)


def test_chunk_size_below_the_limit(srv, reference, capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "classify", "sent", "-", "--json", "--raw-scores",
                         "--chunk-size", "3", "--url", srv.url, stdin="\n".join(TEXTS))  # fmt: skip
    assert code == 0, err
    assert_matches_peft(json_lines(out), TEXTS, reference)


def test_a_refused_chunk_stops_with_the_servers_message(srv, reference, capsys, monkeypatch):
    texts = TEXTS[:6] + [LONG] + TEXTS[6:]  # index 6: the second request (inputs 5-8), its input 1
    code, out, err = run(capsys, monkeypatch, "classify", "sent", "-", "--json", "--raw-scores",
                         "--no-truncate", "--url", srv.url, stdin="\n".join(texts))  # fmt: skip
    assert code == 1 and "Traceback" not in err
    *printed, error = json_lines(out)
    assert_matches_peft(printed, TEXTS[:4], reference)  # the first request's answers were printed
    assert error["status"] == 422 and error["error_type"] == "validation"
    assert error["error"] in err and "HTTP 422 validation" in err and "inputs 5-8 of 11" in err

    code, out, err = run(capsys, monkeypatch, "classify", "sent", "-", "--no-truncate", "--url", srv.url,
                         stdin="\n".join(texts))  # fmt: skip
    assert code == 1 and out == "" and "Traceback" not in err and "inputs 5-8 of 11" in err


def test_unknown_adapter_and_empty_input(srv, capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "classify", "nope", "-", "--url", srv.url,
                         stdin="\n".join(TEXTS))  # fmt: skip
    assert code == 1 and "not_found" in err and "inputs 1-4 of 10" in err and out == ""
    code, _, err = run(capsys, monkeypatch, "classify", "sent", "-", "--url", srv.url, stdin="\n \n")
    assert code == 2 and "stdin holds no texts" in err


# --------------------------------------------------------------------------------------- CSV and JSONL


def test_csv_column(srv, reference, capsys, monkeypatch, tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [{"id": i, "review": text, "stars": 3} for i, text in enumerate(TEXTS)]
    path.write_text("id,review,stars\n" + "".join(f'{r["id"]},"{r["review"]}",3\n' for r in rows))
    code, out, err = run(capsys, monkeypatch, "classify", "sent", str(path), "--column", "review", "--json",
                         "--raw-scores", "--url", srv.url)  # fmt: skip
    assert code == 0, err
    assert_matches_peft(json_lines(out), TEXTS, reference)

    code, _, err = run(capsys, monkeypatch, "classify", "sent", str(path), "--url", srv.url)
    assert code == 2 and "no column 'text'" in err and "'review'" in err and "--column" in err
    path.write_text('review\n"a, quoted ""text"""\n\n')
    code, out, err = run(capsys, monkeypatch, "classify", "sent", str(path), "--json", "--url", srv.url)
    assert code == 0 and [line["text"] for line in json_lines(out)] == ['a, quoted "text"']


def test_jsonl_column_from_a_file_and_from_stdin(srv, reference, capsys, monkeypatch, tmp_path):
    body = "".join(json.dumps({"body": text, "n": i}) + "\n" for i, text in enumerate(TEXTS))
    path = tmp_path / "reviews.jsonl"
    path.write_text(body)
    code, out, err = run(capsys, monkeypatch, "classify", "sent", str(path), "--column", "body", "--json",
                         "--raw-scores", "--url", srv.url)  # fmt: skip
    assert code == 0, err
    assert_matches_peft(json_lines(out), TEXTS, reference)
    code, out, err = run(capsys, monkeypatch, "classify", "sent", "-", "--format", "jsonl", "--column",
                         "body", "--json", "--raw-scores", "--url", srv.url, stdin=body)  # fmt: skip
    assert code == 0, err
    assert_matches_peft(json_lines(out), TEXTS, reference)

    path.write_text(body + "{not json\n")
    code, out, err = run(capsys, monkeypatch, "classify", "sent", str(path), "--column", "body", "--url",
                         srv.url)  # fmt: skip
    assert code == 2 and f"line {len(TEXTS) + 1} is not JSON" in err and out == ""
    code, _, err = run(capsys, monkeypatch, "classify", "sent", "-", "--column", "body", "--url", srv.url)
    assert code == 2 and "--format jsonl" in err


# ------------------------------------------------------------------------------------ embed and rerank


def test_embed_base_and_adapter(srv, capsys, monkeypatch):
    texts = TEXTS[:6]
    with Client(srv.url) as client:
        base = client.embed(texts[:LIMIT]).vectors + client.embed(texts[LIMIT:]).vectors
        adapted = (
            client.embed("vectors", texts[:LIMIT]).vectors + client.embed("vectors", texts[LIMIT:]).vectors
        )
    code, out, err = run(capsys, monkeypatch, "embed", "--base", *texts, "--json", "--url", srv.url)
    lines = json_lines(out)
    assert code == 0 and [line["text"] for line in lines] == texts and lines[0]["adapter_id"] is None
    assert flat(line["embedding"] for line in lines) == pytest.approx(flat(base), abs=1e-6)
    code, out, err = run(capsys, monkeypatch, "embed", "vectors", "-", "--json", "--url", srv.url,
                         stdin="\n".join(texts))  # fmt: skip
    assert code == 0 and flat(line["embedding"] for line in json_lines(out)) == pytest.approx(
        flat(adapted), abs=1e-6
    )
    assert flat(adapted) != pytest.approx(flat(base), abs=1e-3)

    code, out, err = run(capsys, monkeypatch, "embed", "vectors", *texts, "--url", srv.url)
    heading, header, *rows = out.splitlines()
    assert (
        code == 0
        and heading.startswith("adapter vectors version ")
        and header.split() == ["DIMS", "NORM", "TEXT"]
    )
    for row, vector, text in zip(rows, adapted, texts, strict=True):
        dims, norm, shown = row.split(maxsplit=2)
        assert int(dims) == len(vector) and float(norm) == pytest.approx(math.hypot(*vector), abs=1e-4)
        assert shown.strip() == text
    code, _, err = run(capsys, monkeypatch, "embed", "sent", "hello", "--url", srv.url)
    assert code == 1 and "HTTP 422" in err and "Traceback" not in err
    code, _, err = run(capsys, monkeypatch, "embed", "hello", "--url", srv.url)
    assert code == 2 and "--base" in err


def test_rerank_merges_the_chunks_into_one_order(srv, capsys, monkeypatch):
    query, texts = "is the product good", TEXTS[:7]
    with Client(srv.url) as client:
        scores = [client.rerank("ranker", query, [text]).results[0].score for text in texts]
    best_first = sorted(range(len(texts)), key=lambda i: (-scores[i], i))
    code, out, err = run(capsys, monkeypatch, "rerank", "ranker", "--query", query, "-", "--json", "--url",
                         srv.url, stdin="\n".join(texts))  # fmt: skip
    lines = json_lines(out)
    assert code == 0, err
    assert [line["index"] for line in lines] == best_first and [line["rank"] for line in lines] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]
    assert [line["score"] for line in lines] == pytest.approx([scores[i] for i in best_first], abs=1e-6)
    assert [line["text"] for line in lines] == [texts[i] for i in best_first]

    code, out, err = run(capsys, monkeypatch, "rerank", "ranker", "--query", query, *texts, "--top-n", "2",
                         "--url", srv.url)  # fmt: skip
    _, header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["RANK", "SCORE", "INDEX", "TEXT"]
    assert [row.split()[:3] for row in rows] == [[str(n), f"{scores[i]:.4f}", str(i)]
                                                 for n, i in enumerate(best_first[:2], 1)]  # fmt: skip
    code, _, err = run(capsys, monkeypatch, "rerank", "sent", "--query", query, "a", "b", "--url", srv.url)
    assert code == 1 and "HTTP 422" in err and "Traceback" not in err


def test_tokens_in_chunks_and_as_a_table(srv, capsys, monkeypatch):
    texts = ["Angela Merkel met Emmanuel Macron in Paris", *TEXTS[:5]]
    with Client(srv.url) as client:
        expected = [client.tokens("ner", texts[i : i + LIMIT], "none").raw["results"] for i in (0, LIMIT)]
    expected = expected[0] + expected[1]
    code, out, err = run(capsys, monkeypatch, "tokens", "ner", "-", "--aggregation", "none", "--json",
                         "--url", srv.url, stdin="\n".join(texts))  # fmt: skip
    assert code == 0, err
    lines = json_lines(out)
    assert [line["text"] for line in lines] == texts and [line["index"] for line in lines] == list(range(6))
    for line, entities in zip(lines, expected, strict=True):
        assert [(e["entity"], e["word"], e["start"]) for e in line["entities"]] == [
            (e["entity"], e["word"], e["start"]) for e in entities
        ]
        assert [e["score"] for e in line["entities"]] == pytest.approx(
            [e["score"] for e in entities], abs=1e-6
        )
    assert sum(map(len, expected)) > 0

    code, out, err = run(capsys, monkeypatch, "tokens", "ner", *texts, "--aggregation", "none",
                         "--ignore-labels", "", "--url", srv.url)  # fmt: skip
    heading, header, *rows = out.splitlines()
    assert code == 0 and heading.startswith("adapter ner version ")
    assert header.split() == ["INPUT", "LABEL", "SCORE", "START", "END", "WORD"]
    with Client(srv.url) as client:
        everything = client.tokens("ner", texts[:1], "none", ignore_labels=[]).results[0]
    first = [row.split() for row in rows if row.split()[0] == "0"]  # every token of input 0, O included
    assert [row[1:3] for row in first] == [[e.label, f"{e.score:.4f}"] for e in everything] and everything
    code, _, err = run(capsys, monkeypatch, "tokens", "sent", "hello", "--url", srv.url)
    assert code == 1 and "HTTP 422" in err and "Traceback" not in err


def test_answer_with_the_context_from_stdin(srv, capsys, monkeypatch):
    question = "Where did the meeting take place?"
    context = (
        "The two ministers met in Geneva on Monday. They talked for three hours about trade and fishing."
    )
    with Client(srv.url) as client:
        expected = client.answer("qa", question, context, top_k=3).results[0]
    code, out, err = run(capsys, monkeypatch, "answer", "qa", "--question", question, "--context", "-",
                         "--top-k", "3", "--json", "--url", srv.url, stdin=context)  # fmt: skip
    assert code == 0, err
    got = json.loads(out)["results"][0]
    assert [(a["answer"], a["start"], a["end"]) for a in got] == [
        (a.answer, a.start, a.end) for a in expected
    ]
    assert [a["score"] for a in got] == pytest.approx([a.score for a in expected], abs=1e-6) and len(got) == 3
    assert all(context[a.start : a.end] == a.answer for a in expected)

    code, out, err = run(capsys, monkeypatch, "answer", "qa", "--question", question, "--context", context,
                         "--top-k", "3", "--url", srv.url)  # fmt: skip
    heading, header, *rows = out.splitlines()
    assert code == 0 and heading.startswith("adapter qa version ")
    assert header.split() == ["RANK", "SCORE", "START", "END", "ANSWER"]
    assert [row.split(maxsplit=4) for row in rows] == [
        [str(rank), f"{a.score:.4f}", str(a.start), str(a.end), " ".join(a.answer.split())]
        for rank, a in enumerate(expected, 1)
    ]
    code, _, err = run(capsys, monkeypatch, "answer", "sent", "--question", question, "--context", context,
                       "--url", srv.url)  # fmt: skip
    assert code == 1 and "HTTP 422" in err and "Traceback" not in err
    code, _, err = run(capsys, monkeypatch, "answer", "qa", "--question", question, "--context", "-", "--url",
                       srv.url, stdin=" \n")  # fmt: skip
    assert code == 2 and "context is empty" in err


# --------------------------------------------------------------------------------- --version and --help

COMMANDS = [
    ["serve"], ["train"], ["adapters"], ["adapters", "push"], ["adapters", "ls"], ["adapters", "show"],
    ["adapters", "rm"], ["classify"], ["embed"], ["rerank"], ["tokens"], ["answer"],
]  # fmt: skip


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "loraplex")
def test_version_on_every_command(command, capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, *command, "--version")
    assert code == 0 and out == f"loraplex {version('loraplex')}\n"


def option_helps(text: str) -> dict[str, str]:
    """Each option of an argparse --help and its help text (continuation lines joined)."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            helps[current] = line
        elif current and line.startswith("   "):
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_each_options_default_once(command, capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, *command, "--help")
    helps = option_helps(out)
    assert code == 0 and "--version" in helps
    for option, text in helps.items():
        if option in ("-h", "--version"):
            continue
        said = len(re.findall(r"\bdefault:", text))
        assert said == 1 or (said == 0 and text.endswith("(required)")), (
            f"{' '.join(command)} {option}: {text}"
        )
