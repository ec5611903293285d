"""The server as processes: HTTP workers around one engine process.

Each test holds the real engine at its gate (tests/paced_engine.py), so that requests are in flight at the
moment a process is killed, on a fast machine as on a slow one. Workers are told apart by the
X-Loraplex-Worker header; the engine's pid is in the supervisor's start line.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.live_server import LiveServer
from tests.paced_engine import EngineControl
from tests.serving_support import TEXTS, adapter_dirs, metrics, preload_args, reference, sample, scores_of

BOUND_S = 60.0  # a bound for a slow machine, never an expected time


def wait_for(predicate, timeout: float = BOUND_S, message: str = "condition", show=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            seen = f" (last: {show()})" if show else ""
            raise AssertionError(f"{message} not reached within {timeout} s{seen}")
        time.sleep(0.02)


def engine_pid(srv: LiveServer) -> int:
    match = re.search(r"1 engine process \(pid (\d+)\)", srv.log())
    assert match, srv.log()
    return int(match.group(1))


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.add(int(entry))
    return found


class Connection:
    """One keep-alive HTTP/1.1 connection, and the worker that accepted it."""

    def __init__(self, srv: LiveServer):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=BOUND_S)
        self.conn.request("GET", "/health")
        response = self.conn.getresponse()
        response.read()
        self.worker = response.getheader("x-loraplex-worker")

    def classify(self, adapter: str, texts: list[str]) -> tuple[int | str, dict]:
        """(status, body); ("closed", {}) when the connection was cut instead of answered."""
        body = json.dumps({"adapter_id": adapter, "inputs": texts})
        try:
            self.conn.request("POST", "/classify", body, {"content-type": "application/json"})
            response = self.conn.getresponse()
            return response.status, {"body": json.loads(response.read()), **dict(response.getheaders())}
        except (ConnectionError, http.client.HTTPException, OSError):
            return "closed", {}

    def close(self) -> None:
        self.conn.close()


def connections_to_each(srv: LiveServer, workers: int, each: int) -> dict[str, list[Connection]]:
    """At least `each` open connections accepted by every one of `workers` workers."""
    found: dict[str, list[Connection]] = {}
    extra = []
    for _ in range(400):
        if len(found) == workers and all(len(c) >= each for c in found.values()):
            break
        connection = Connection(srv)
        group = found.setdefault(connection.worker, [])
        (group if len(group) < each else extra).append(connection)
    for connection in extra:
        connection.close()
    assert len(found) == workers and all(len(c) >= each for c in found.values()), {
        w: len(c) for w, c in found.items()
    }
    return found


@pytest.fixture
def control():
    return EngineControl()


def test_workers_share_one_engine_one_queue_and_one_metrics_view(control):
    store = tempfile.mkdtemp(prefix="loraplex-procs-store-")
    with LiveServer(
        "--workers", "2", "--adapter-store", store, "--max-queued", "6", "--max-client-batch", "3",
        "--max-wait-ms", "0",
        *preload_args(["sent", "topic"]), control=control,
    ) as srv:  # fmt: skip
        groups = connections_to_each(srv, 2, 3)
        (first, a), (second, b) = groups.items()
        # Rows of both workers wait in one queue: its bound counts them all.
        control.hold()
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(a[0].classify, "sent", TEXTS[:3])]
            wait_for(lambda: control.entered()[1] == 3, message="a batch held in the engine")
            held += [pool.submit(c.classify, "sent", TEXTS[:3]) for c in (b[0], a[1])]
            wait_for(lambda: _depth(srv) == 6, message="both workers' rows queued")
            for connection in (a[2], b[1]):
                status, refused = connection.classify("sent", TEXTS[:1])
                assert status == 429, refused
            control.release()
            answers = [f.result(timeout=BOUND_S) for f in held]
        assert [status for status, _ in answers] == [200, 200, 200]
        # An upload answered through one worker is what the other serves next.
        upload = httpx.put(
            f"{srv.url}/adapters/sent",
            files={
                "adapter_config": (adapter_dirs()["topic"] / "adapter_config.json").read_bytes(),
                "adapter_model": (adapter_dirs()["topic"] / "adapter_model.safetensors").read_bytes(),
            },
            timeout=BOUND_S,
        )
        assert upload.status_code == 200, upload.text
        version = upload.json()["version"]
        for connection in (a[2], b[1]):
            status, answer = connection.classify("sent", TEXTS[:1])
            assert status == 200 and answer["body"]["adapter_version"] == version
        # Every worker's /metrics counts every worker's requests.
        views = []
        for connections in (a, b):
            connections[0].conn.request("GET", "/metrics")
            response = connections[0].conn.getresponse()
            assert response.getheader("x-loraplex-worker") in (first, second)
            views.append(response.read().decode())
        counted = [
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in view.splitlines()
                if line.startswith("loraplex_requests_total{")
                and 'route="/classify"' in line
                and 'status="200"' in line
            )
            for view in views
        ]
        assert counted == [5.0, 5.0], counted
        for connection in a + b:
            connection.close()


def test_a_worker_that_dies_is_replaced_and_its_requests_end_at_once(control):
    store = tempfile.mkdtemp(prefix="loraplex-procs-store-")
    args = ["--workers", "2", "--adapter-store", store, *preload_args(["sent"])]
    with LiveServer(*args, control=control) as srv:
        groups = connections_to_each(srv, 2, 3)
        (doomed, a), (kept, b) = groups.items()
        pid = next(p for p in children(srv.proc.pid) if p != engine_pid(srv) and _accepts(p, a[0]))
        dropped_before = sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="disconnect")
        control.hold()
        with ThreadPoolExecutor(6) as pool:
            kept_answers = [pool.submit(b[0].classify, "sent", TEXTS[:2])]
            wait_for(lambda: control.entered()[0] == 1, message="a batch held in the engine", show=srv.log)
            doomed_answers = [pool.submit(c.classify, "sent", TEXTS[:2]) for c in a]
            kept_answers += [pool.submit(c.classify, "sent", TEXTS[:2]) for c in b[1:]]
            wait_for(lambda: _depth(srv) == 10, message="both workers' rows queued", show=srv.log)
            os.kill(pid, signal.SIGKILL)
            # The dead worker's clients see their connections closed at once, not a hang.
            assert [f.result(timeout=BOUND_S)[0] for f in doomed_answers] == ["closed"] * 3
            # Its queued rows are dropped by the engine; the other worker's stay and are answered.
            wait_for(lambda: _depth(srv) == 4, message="the dead worker's rows dropped")
            dropped = sample(metrics(srv.url), "loraplex_dropped_inputs_total", reason="disconnect")
            assert dropped - dropped_before == 6
            control.release()
            assert [f.result(timeout=BOUND_S)[0] for f in kept_answers] == [200] * 3
        # A new worker takes the dead one's place.
        wait_for(lambda: srv.log().count("loraplex.http.app: worker") == 3, message="the worker replaced")
        assert len(children(srv.proc.pid)) == 3
        assert "exited with code -9; starting another" in srv.log()
        replaced = connections_to_each(srv, 2, 1)
        assert set(replaced) == {doomed, kept}
        for connections in replaced.values():
            status, _ = connections[0].classify("sent", TEXTS[:1])
            assert status == 200
        for connection in b:
            connection.close()


def test_an_engine_that_dies_fails_requests_with_503_and_stops_the_server(control):
    store = tempfile.mkdtemp(prefix="loraplex-procs-store-")
    srv = LiveServer("--workers", "2", "--adapter-store", store, *preload_args(["sent"]), control=control)
    with srv:
        connection = Connection(srv)
        control.hold()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(connection.classify, "sent", TEXTS[:2])
            wait_for(lambda: control.entered()[0] >= 1, message="a batch in the engine", show=srv.log)
            os.kill(engine_pid(srv), signal.SIGKILL)
            status, answer = waiting.result(timeout=BOUND_S)
        assert status == 503, answer
        assert answer["retry-after"] == "1"
        assert "engine process" in answer["body"]["error"]
        assert srv.proc.wait(BOUND_S) != 0
        assert "the engine process exited with code -9" in srv.log()


def _depth(srv: LiveServer) -> float:
    return sample(metrics(srv.url), "loraplex_queue_depth")


def _accepts(pid: int, connection: Connection) -> bool:
    """Whether process `pid` holds the server end of `connection`'s socket."""
    local = connection.conn.sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == local:  # the server end: its remote port is ours
                inodes.add(fields[9])
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            target = os.readlink(f"{fds}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_the_server_on_cuda_answers_as_the_engine_on_the_cpu(dtype, tol):
    """Workers around an engine process on the GPU: every adapter's probabilities as the CPU engine's."""
    ref = reference()
    store = tempfile.mkdtemp(prefix="loraplex-procs-store-")
    args = ["--device", "cuda", "--dtype", dtype, "--workers", "2", "--adapter-store", store, *preload_args()]
    with LiveServer(*args) as srv, httpx.Client(base_url=srv.url, timeout=BOUND_S) as client:
        for name in ref.labels:
            response = client.post("/classify", json={"adapter_id": name, "inputs": TEXTS})
            assert response.status_code == 200, response.text
            got = scores_of(response.json(), ref.labels[name])
            want = torch.softmax(ref.logits(name, TEXTS).double(), dim=-1)
            assert (got - want).abs().max().item() <= tol, name
