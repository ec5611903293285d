"""Auth, the batcher's wait, overload, disconnects and the SIGTERM drain, on one small real server.

The server has tight limits (2 rows per batch, 16 queued inputs) so that queues form on purpose. Its
engine is the real one behind a gate that the tests hold (tests/paced_engine.py): a queue stays full,
or a request stays in flight, for as long as a test needs, on a fast machine as on a slow one.
Its last test stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.live_server import LiveServer
from tests.paced_engine import EngineControl
from tests.serving_support import LONG_TEXT, TEXTS, metrics, preload_args, reference, sample, scores_of

API_KEY = "key-3b9f0c51e2d84a7f6c0d9e8b1a2f3c4d"
ADMIN_TOKEN = "admin-c7d1a2e9f05b4368a1e7c3d9b0f2"
AUTH = {"authorization": f"Bearer {API_KEY}"}
MEDIUM_TEXT = " ".join(TEXTS * 3)  # a couple of hundred tokens


@pytest.fixture(scope="module")
def control(workers):  # one per server: its counts are that engine's
    return EngineControl()


@pytest.fixture(scope="module")
def srv(control, workers):
    store = tempfile.mkdtemp(prefix="loraplex-limits-store-")
    server = LiveServer(
        *workers,
        "--adapter-store", store, "--max-batch-size", "2", "--max-queued", "16", "--max-client-batch", "16",
        "--max-wait-ms", "400", "--drain-grace-s", "60", *preload_args(["sent", "topic"]),
        env={"LORAPLEX_API_KEY": API_KEY, "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN}, control=control,
    )  # fmt: skip
    with server:
        yield server


@pytest.fixture(autouse=True)
def _open_gate(control):
    yield
    control.release()


def classify(srv, inputs, adapter="sent", headers=AUTH, timeout=120) -> httpx.Response:
    body = {"adapter_id": adapter, "inputs": inputs}
    return httpx.post(srv.url + "/classify", json=body, headers=headers, timeout=timeout)


def depth(srv) -> float:
    return sample(metrics(srv.url), "loraplex_queue_depth")


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}, {"authorization": f"Basic {API_KEY}"},
     {"authorization": f"Bearer {API_KEY}x"}, {"authorization": "Bearer"}],
    ids=["none", "wrong", "no-scheme", "basic", "longer", "empty"],
)  # fmt: skip
def test_inference_needs_the_api_key(srv, headers):
    response = classify(srv, "hello", headers=headers)
    assert response.status_code == 401
    assert response.json()["error_type"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_api_key_and_admin_token_both_allow_inference_and_reads(srv):
    for token in (API_KEY, ADMIN_TOKEN):
        headers = {"authorization": f"Bearer {token}"}
        assert classify(srv, "hello", headers=headers).status_code == 200
        assert httpx.get(srv.url + "/adapters", headers=headers, timeout=60).status_code == 200
    assert httpx.get(srv.url + "/adapters", timeout=60).status_code == 401


def test_adapter_writes_need_the_admin_token(srv):
    for headers in ({}, AUTH):
        assert httpx.delete(srv.url + "/adapters/topic", headers=headers, timeout=60).status_code == 401
        assert httpx.put(srv.url + "/adapters/topic", headers=headers, timeout=60).status_code == 401
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (
        httpx.delete(srv.url + "/adapters/not-there", headers=admin, timeout=60).status_code == 404
    )  # past auth


def test_operations_routes_stay_open(srv):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(srv.url + path, timeout=60).status_code == 200


def test_tokens_never_reach_the_log(srv):
    classify(srv, "hello")
    classify(srv, "hello", headers={"authorization": "Bearer wrong"})
    log = srv.log()
    assert API_KEY not in log and ADMIN_TOKEN not in log


def test_idle_engine_waits_for_a_batch_to_fill_but_not_when_full(srv):
    lone = classify(srv, "hello")
    full = classify(srv, ["hello", "world"])  # --max-batch-size 2
    # An idle engine holds a lone input for the whole --max-wait-ms (400): a lower bound, at any speed.
    assert int(lone.headers["x-queue-time"]) >= 400 - 1
    # A full batch does not wait for it: whatever the machine's speed, it waits less than the lone input.
    assert int(full.headers["x-queue-time"]) < int(lone.headers["x-queue-time"])


def test_overload_gets_429_with_retry_after_while_admitted_requests_succeed(srv, control):
    ref = reference()
    expected = torch.softmax(ref.logits("topic", TEXTS[:2]).double(), dim=-1)
    queue_limit = 16  # --max-queued
    control.hold()

    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as client:
            # The engine holds one batch of 2 long rows, so the queue is empty and nothing leaves it;
            # then 48 requests of 2 inputs arrive at once: far more than the 16 queued inputs allowed.
            entered = control.entered()[0]
            long = {"adapter_id": "sent", "inputs": [LONG_TEXT] * 2}
            busy = asyncio.ensure_future(client.post("/classify", json=long))
            while control.entered()[0] == entered:
                await asyncio.sleep(0.02)
            body = {"adapter_id": "topic", "inputs": TEXTS[:2]}
            tasks = [asyncio.ensure_future(client.post("/classify", json=body)) for _ in range(48)]
            # Each request is either answered (429) or queued (2 inputs) while the engine is held.
            while sum(t.done() for t in tasks) + (await asyncio.to_thread(depth, srv)) // 2 < len(tasks):
                await asyncio.sleep(0.02)
            refused = [t.result() for t in tasks if t.done()]
            queued = await asyncio.to_thread(depth, srv)
            control.release()
            return refused, queued, await asyncio.gather(*tasks), await busy

    refused, queued, responses, busy = asyncio.run(burst())
    assert busy.status_code == 200
    assert queued == queue_limit  # the queue took exactly as many inputs as it may hold ...
    assert [r.status_code for r in refused] == [429] * (len(responses) - queue_limit // 2)  # ... no more
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == queue_limit // 2 and statuses.count(429) == len(refused), statuses
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error_type"] == "overloaded"
            assert int(response.headers["retry-after"]) >= 1
        else:
            torch.testing.assert_close(
                scores_of(response.json(), ref.labels["topic"]), expected, atol=1e-5, rtol=0
            )
    assert depth(srv) == 0
    assert classify(srv, "hello").status_code == 200


def test_429_exactly_when_the_inputs_would_not_fit_in_the_queue(srv, control):
    control.hold()
    pool = ThreadPoolExecutor(4)
    entered = control.entered()[0]
    busy = pool.submit(classify, srv, TEXTS[:2])  # the engine holds this batch; the queue is empty
    wait_for(lambda: control.entered()[0] > entered)
    admitted = [pool.submit(classify, srv, (TEXTS * 2)[:15])]
    wait_for(lambda: depth(srv) == 15)
    over = classify(srv, TEXTS[:2])  # 15 + 2 > 16
    assert over.status_code == 429 and over.json()["error_type"] == "overloaded"
    assert "15 inputs are queued and the limit is 16" in over.json()["error"]
    admitted.append(pool.submit(classify, srv, TEXTS[:1]))  # 15 + 1 = 16: fits
    wait_for(lambda: depth(srv) == 16)
    assert classify(srv, TEXTS[:1]).status_code == 429  # 16 + 1 > 16
    control.release()
    assert busy.result(timeout=120).status_code == 200
    assert [f.result(timeout=120).status_code for f in admitted] == [200, 200]
    pool.shutdown()


def test_client_leaving_while_the_idle_engine_waits_does_not_stall_it(srv):
    before = sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="disconnect")
    with pytest.raises(httpx.ReadTimeout):  # gone within the 400 ms the idle engine waits for more rows
        classify(srv, "hello", timeout=httpx.Timeout(10, read=0.1))
    wait_for(lambda: sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="disconnect") > before)
    time.sleep(0.5)  # let the wait run out with nothing left to batch
    assert classify(srv, "hello", timeout=20).status_code == 200


def test_disconnected_client_has_its_queued_inputs_dropped(srv, control):
    before = sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="disconnect")
    entered_before = control.entered()[1]
    control.hold()  # the first batch stays in the engine: the other rows wait in the queue
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        classify(srv, (TEXTS * 2)[:16], timeout=httpx.Timeout(10, read=0.3))
    wait_for(lambda: sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="disconnect") > before)
    wait_for(lambda: sample(metrics(srv.url), "loraplex_requests_in_flight") == 0)
    samples = metrics(srv.url)
    assert sample(samples, "loraplex_queue_depth") == 0
    # Rows still queued never ran: the engine stopped spending time on a client that left.
    taken = control.entered()[1] - entered_before
    dropped = sample(samples, "loraplex_dropped_inputs_total", reason="disconnect") - before
    assert dropped == 16 - taken and taken <= 2  # --max-batch-size 2: only the held batch was taken
    control.release()
    assert classify(srv, "hello").status_code == 200


def test_sigterm_drains_accepted_requests_then_exits_0(srv, control):
    ref = reference()
    texts = [LONG_TEXT, MEDIUM_TEXT, *TEXTS[:2]]
    expected = torch.softmax(ref.logits("sent", texts).double(), dim=-1)
    entered_before = control.entered()[1]
    control.hold()  # accepted work stays unfinished until the test has seen the drain refuse new work
    pool = ThreadPoolExecutor(4)
    accepted = [pool.submit(classify, srv, texts) for _ in range(4)]  # 16 inputs: all fit in the queue
    wait_for(lambda: depth(srv) + control.entered()[1] - entered_before == 16)

    srv.signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(srv.url + "/ready", timeout=60).status_code == 503, timeout=30)
    assert httpx.get(srv.url + "/ready", timeout=60).json()["error_type"] == "unavailable"
    late = classify(srv, "hello")  # not accepted: refused at once, not queued behind the drain
    assert late.status_code == 503 and late.json()["error_type"] == "unavailable"
    assert srv.proc.poll() is None and not any(f.done() for f in accepted)  # the drain waits for them

    control.release()
    for future in accepted:
        response = future.result(timeout=120)
        assert response.status_code == 200, response.text
        torch.testing.assert_close(
            scores_of(response.json(), ref.labels["sent"]), expected, atol=1e-5, rtol=0
        )
    assert srv.proc.wait(timeout=60) == 0
    pool.shutdown()
