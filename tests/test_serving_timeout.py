"""The per-request timeout and the drain's grace period, with an engine that the test holds.

The engine is the real one behind a gate (tests/paced_engine.py): what reaches it stays there until the
test lets it go, so "work that would take longer than the timeout" is the same on any machine. The
assertions are relations (dropped = queued - taken by the engine), never counts that assume a speed.
"""

from __future__ import annotations

import re
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.live_server import LiveServer
from tests.paced_engine import EngineControl
from tests.serving_support import TEXTS, metrics, preload_args, sample

TIMEOUT_S = 4.0
GRACE_S = 0.5  # well inside TIMEOUT_S, so that the drain, not the timeout, answers the drained requests


@pytest.fixture(scope="module")
def control(workers):  # one per server: its counts are that engine's
    return EngineControl()


@pytest.fixture(scope="module")
def srv(control, workers):
    store = tempfile.mkdtemp(prefix="loraplex-timeout-store-")
    server = LiveServer(
        *workers,
        "--adapter-store", store, "--request-timeout-s", str(TIMEOUT_S), "--drain-grace-s", str(GRACE_S),
        "--max-batch-size", "1", "--max-wait-ms", "0", *preload_args(["sent"]), control=control,
    )  # fmt: skip
    with server:
        yield server


@pytest.fixture(autouse=True)
def _open_gate(control):
    yield
    control.release()


def classify(srv, inputs) -> httpx.Response:
    # A request the server never answered would fail here, long before pytest's own timeout.
    return httpx.post(srv.url + "/classify", json={"adapter_id": "sent", "inputs": inputs}, timeout=60)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_slow_request_gets_503_and_its_queued_rows_are_dropped(srv, control):
    before = sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="timeout")
    entered_before = control.entered()[1]
    control.hold()
    control.step(3)  # three rows finish; the fourth stays in the engine past the timeout; the rest queue

    started = time.monotonic()
    response = classify(srv, TEXTS)  # one row per batch (--max-batch-size 1)
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["error_type"] == "unavailable" and f"within {TIMEOUT_S:g} s" in body["error"]
    assert elapsed >= TIMEOUT_S
    assert control.done()[0] == 3  # answered while the engine still held a row: no waiting on it

    samples = metrics(srv.url)
    taken = control.entered()[1] - entered_before  # rows that reached the engine: they are not dropped
    dropped = sample(samples, "loraplex_dropped_inputs_total", reason="timeout") - before
    assert 3 < taken < len(TEXTS)
    assert dropped == len(TEXTS) - taken
    assert sample(samples, "loraplex_queue_depth") == 0

    control.release()
    assert classify(srv, "hello").status_code == 200
    # The held row finished after its request had gone: it is neither dropped nor waited for.
    assert sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="timeout") - before == dropped


def test_drain_grace_period_bounds_shutdown(srv, control):
    before = sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="shutdown")
    entered_before = control.entered()[1]
    control.hold()  # the first row stays in the engine: the queued work would never finish by itself
    pool = ThreadPoolExecutor(2)
    pending = [pool.submit(classify, srv, TEXTS) for _ in range(2)]
    rows = 2 * len(TEXTS)
    wait_for(
        lambda: (
            sample(metrics(srv.url), "loraplex_queue_depth") + control.entered()[1] - entered_before == rows
        )
    )

    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    for future in pending:
        response = future.result(timeout=30)
        assert response.status_code == 503
        assert response.json()["error_type"] == "unavailable"
        assert "shutting down" in response.json()["error"]
    waited = time.monotonic() - started
    assert waited >= GRACE_S  # accepted requests had their grace period ...
    assert srv.proc.poll() is None  # ... and then their answer, though the engine still holds a row
    taken = control.entered()[1] - entered_before

    control.release()  # the running batch finishes; then the process exits
    assert srv.proc.wait(timeout=30) == 0
    pool.shutdown()
    # The workers stopped accepting once drained, so the drain's count is read from the engine's last line.
    match = re.search(r"the drain dropped (\d+) queued inputs", srv.log())
    assert match, srv.log()
    dropped = int(match.group(1)) - before
    assert dropped == rows - taken and dropped > 0
