"""One tenant's failure stays its own: a mixed batch that fails is run again split by adapter.

Each server runs the real engine made to fail for one adapter (rank 16: "intent") in one of three ways
(tests/faulty_engine.py). The test holds the engine so that requests of four adapters queue up and
then run as one mixed batch; every request of the other adapters must get the engine's exact answer,
and those of the failing adapter the error that says whose fault it is: 409 naming the adapter when
the adapter is at fault, 503 with Retry-After when the server is (out of memory). Never a 500.

A fault of the server's own code (the LoRA op, a head) fails every adapter alike: 503 with Retry-After and
a log line with the batch's shape, never a 409 that asks for a corrected upload.
"""

from __future__ import annotations

import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.faulty_engine import ARMED_ENV, FAULT_ENV
from tests.live_server import LiveServer
from tests.paced_engine import EngineControl
from tests.serving_support import TEXTS, metrics, preload_args, reference, sample, scores_of

ADAPTERS = ["sent", "topic", "intent", "dense"]  # ranks 8, 4, 16, 2
FAULTY = "intent"
EXPECTED = {"runtime": (409, "conflict"), "load": (409, "conflict"), "oom": (503, "unavailable")}


def classify(srv: LiveServer, adapter: str, texts: list[str]) -> httpx.Response:
    body = {"adapter_id": adapter, "inputs": texts}
    return httpx.post(srv.url + "/classify", json=body, timeout=120)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def check_answer(response: httpx.Response, adapter: str, texts: list[str]) -> None:
    assert response.status_code == 200, response.text
    ref = reference()
    expected = torch.softmax(ref.logits(adapter, texts).double(), dim=-1)
    torch.testing.assert_close(scores_of(response.json(), ref.labels[adapter]), expected, atol=1e-5, rtol=0)


def check_failure(response: httpx.Response, kind: str) -> None:
    status, error_type = EXPECTED[kind]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type
    assert repr(FAULTY) in body["error"]  # names the adapter whose rows failed
    if status == 503:
        assert int(response.headers["retry-after"]) > 0


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_failing_adapter_fails_only_its_own_requests_in_a_mixed_batch(kind, workers):
    control = EngineControl()
    store = tempfile.mkdtemp(prefix="loraplex-isolation-store-")
    server = LiveServer(
        *workers, "--adapter-store", store, "--max-batch-size", "64", "--max-wait-ms", "0",
        *preload_args(ADAPTERS),
        env={FAULT_ENV: f"{kind}:16"}, control=control, module="tests.faulty_engine",
    )  # fmt: skip
    with server as srv, ThreadPoolExecutor(32) as pool:
        for _ in range(2):  # the second round runs with every adapter already resident
            control.hold()
            first = pool.submit(classify, srv, "sent", TEXTS[:1])  # the engine holds this batch
            wait_for(lambda: control.entered()[0] > control.done()[0])
            jobs = []
            for i in range(24):
                adapter = ADAPTERS[i % len(ADAPTERS)]
                texts = [TEXTS[i % len(TEXTS)], TEXTS[(i + 3) % len(TEXTS)]]
                jobs.append((adapter, texts, pool.submit(classify, srv, adapter, texts)))
            # All 48 rows are queued behind the held batch, so they leave the queue as one mixed batch.
            wait_for(lambda: sample(metrics(srv.url), "loraplex_queue_depth") == 48)
            control.release()
            check_answer(first.result(), "sent", TEXTS[:1])
            for adapter, texts, job in jobs:
                if adapter == FAULTY:
                    check_failure(job.result(), kind)
                else:
                    check_answer(job.result(), adapter, texts)
        # Alone in its batch, the adapter gets the same answer: the engine runs rows without it.
        check_failure(classify(srv, FAULTY, TEXTS[:2]), kind)
        check_answer(classify(srv, "topic", TEXTS[:3]), "topic", TEXTS[:3])
        statuses = {
            dict(labels)["status"]
            for (name, labels), value in metrics(srv.url).items()
            if name == "loraplex_requests_total" and dict(labels)["route"] == "/classify" and value
        }
        assert statuses == {"200", str(EXPECTED[kind][0])}
        assert f"adapter {FAULTY} version" in srv.log()  # the server's log says what failed, and for whom


def check_server_fault(response: httpx.Response, adapter: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error_type"] == "unavailable" and repr(adapter) in body["error"]
    assert "the fault is the server's" in body["error"] and "Upload a corrected" not in body["error"]
    assert int(response.headers["retry-after"]) > 0


def test_a_fault_in_the_lora_op_is_the_servers_even_for_adapters_that_ran_before():
    """The LoRA op breaks after two adapters have answered: neither is blamed (no 409 asking for a new
    upload), each request gets 503 with Retry-After, and the log holds the failed batch's shape."""
    armed = Path(tempfile.mkdtemp(prefix="loraplex-fault-")) / "armed"
    store = tempfile.mkdtemp(prefix="loraplex-isolation-store-")
    server = LiveServer(
        "--adapter-store", store, *preload_args(["sent", "topic"]),
        env={FAULT_ENV: "lora:0", ARMED_ENV: str(armed)}, module="tests.faulty_engine",
    )  # fmt: skip
    with server as srv:
        for adapter in ("sent", "topic"):  # both known good
            check_answer(classify(srv, adapter, TEXTS[:2]), adapter, TEXTS[:2])
        armed.touch()
        for adapter in ("sent", "topic", "sent"):
            check_server_fault(classify(srv, adapter, TEXTS[:3]), adapter)
        log = srv.log()
        assert "server fault: rows of adapter topic" in log
        assert re.search(r"batch: 3 rows x \d+ tokens, rows per adapter \{'topic@[0-9a-f]+': 3\}", log)


def test_a_fault_in_a_head_is_the_servers():
    """Every adapter's head raises from the start: 503 for all of them, never 409. The engine still runs
    rows without an adapter, so a probe with the empty slot (which skips the heads) would wrongly blame
    each adapter."""
    store = tempfile.mkdtemp(prefix="loraplex-isolation-store-")
    server = LiveServer(
        "--adapter-store", store, *preload_args(["sent", "topic"]),
        env={FAULT_ENV: "head:0"}, module="tests.faulty_engine",
    )  # fmt: skip
    with server as srv, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda a: (a, classify(srv, a, TEXTS[:2])), ["sent", "topic"] * 2))
        for adapter, response in answers:
            check_server_fault(response, adapter)
        assert "IndexError" in srv.log() and "server fault" in srv.log()
