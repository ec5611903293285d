"""The per-request timeout and the drain's grace period, with work that would take minutes to finish."""

from __future__ import annotations

import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.live_server import LiveServer
from tests.serving_support import LONG_TEXT, metrics, preload_args, sample

HUGE = [LONG_TEXT] * 256  # 256 rows of 512 tokens, one per batch: far longer than the timeout


@pytest.fixture(scope="module")
def srv():
    store = tempfile.mkdtemp(prefix="loraplex-timeout-store-")
    server = LiveServer(
        "--adapter-store", store, "--request-timeout-s", "5", "--drain-grace-s", "1", "--max-batch-size", "1",
        "--max-client-batch", "256", "--max-queued", "512", *preload_args(["sent"]),
    )  # fmt: skip
    with server:
        yield server


def classify(srv, inputs) -> httpx.Response:
    return httpx.post(srv.url + "/classify", json={"adapter_id": "sent", "inputs": inputs}, timeout=120)


def test_slow_request_gets_503_and_its_queued_rows_are_dropped(srv):
    started = time.monotonic()
    response = classify(srv, HUGE)
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["error_type"] == "unavailable" and "within 5 s" in body["error"]
    assert 5 <= elapsed < 60
    samples = metrics(srv.url)
    assert sample(samples, "loraplex_dropped_inputs_total", reason="timeout") >= 200
    assert sample(samples, "loraplex_queue_depth") == 0
    assert classify(srv, "hello").status_code == 200


def test_drain_grace_period_bounds_shutdown(srv):
    pool = ThreadPoolExecutor(2)
    pending = [pool.submit(classify, srv, HUGE) for _ in range(2)]
    deadline = time.monotonic() + 60
    while sample(metrics(srv.url), "loraplex_requests_in_flight") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 15  # grace 1 s, then at most one running row and the shutdown
    for future in pending:
        response = future.result(timeout=30)
        assert response.status_code == 503
        assert response.json()["error_type"] == "unavailable"
        assert "shutting down" in response.json()["error"]
    pool.shutdown()
