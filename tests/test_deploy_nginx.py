"""Two loraplex replicas on loopback sharing one store directory, behind the real nginx running the
repository's own template (rendered with loopback upstreams, nothing else changed).

The replicas run with the image's environment (docker/Dockerfile's ENV) and every HTTP(S) proxy pointed at
a closed port, so reaching their ready state also shows a container needs no network to start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.deploy_support import REPO, Nginx, free_port, image_env, render_nginx_template, upload
from tests.live_server import LiveServer
from tests.peft_factory import peft_logits, save_peft_adapter

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed (.ci/run installs nginx-light)",
)

ADMIN = "admin-token-for-tests-3f9c1b7e5d2a8064"
API_KEY = "api-key-for-tests-8e1d4c7b2a9f6035e1"
STALENESS_S = 1.0
TEXTS = ["the service was wonderful", "terrible, never again", "it was fine I guess"]


class Cluster:
    def __init__(self, replicas: dict[str, LiveServer], nginx: Nginx, adapters: dict[str, Path]):
        self.replicas = replicas
        self.nginx = nginx
        self.adapters = adapters
        self.client = httpx.Client(timeout=60)

    def logs(self) -> str:
        parts = [f"--- replica {name}\n{srv.log()[-3000:]}" for name, srv in self.replicas.items()]
        return "\n".join([*parts, f"--- nginx\n{self.nginx.error_log()[-3000:]}"])

    def classify(self, adapter_id: str, url: str | None = None, header: bool = True, texts=TEXTS):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        if header:
            headers["X-Adapter-Id"] = adapter_id
        body = {"adapter_id": adapter_id, "inputs": texts, "raw_scores": True}
        return self.client.post(f"{url or self.nginx.url}/classify", json=body, headers=headers)

    def put(self, adapter_id: str, adapter_dir: Path):
        return upload(self.client, self.nginx.url, adapter_id, adapter_dir, token=ADMIN)

    def delete(self, adapter_id: str):
        return self.client.delete(
            f"{self.nginx.url}/adapters/{adapter_id}", headers={"Authorization": f"Bearer {ADMIN}"}
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    adapters = {
        "v1": save_peft_adapter(root / "v1", seed=1, labels=["neg", "neu", "pos"]),
        "v2": save_peft_adapter(root / "v2", seed=2, r=4, target_modules=["query", "key", "value"]),
    }
    closed = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in image_env().items() if k.startswith(("LORAPLEX_", "HF_", "TRANSFORMERS_"))}
    env.update(
        LORAPLEX_ADAPTER_STORE=str(root / "store"),
        LORAPLEX_ADMIN_TOKEN=ADMIN,
        LORAPLEX_API_KEY=API_KEY,
        HF_HOME=str(root / "hf"),
        HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed,
    )  # fmt: skip
    replicas = {
        name: LiveServer("--replica-id", name, "--staleness-s", str(STALENESS_S), env=env)
        for name in ("r1", "r2")
    }
    with ThreadPoolExecutor(2) as pool:  # both load the model at once
        list(pool.map(LiveServer.start, replicas.values()))
    port = free_port()
    nginx = Nginx(render_nginx_template([srv.port for srv in replicas.values()], port), port)
    try:
        nginx.start()
        yield Cluster(replicas, nginx, adapters)
    finally:
        nginx.stop()
        for srv in replicas.values():
            srv.stop()


def reference(adapter_dir: Path) -> torch.Tensor:
    return peft_logits(adapter_dir, TEXTS)


def assert_matches(body: dict, expected: torch.Tensor, labels: list[str]) -> None:
    got = torch.tensor([[r["scores"][label] for label in labels] for r in body["results"]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_upload_then_classify_through_nginx_on_both_replicas(cluster):
    created = cluster.put("sentiment", cluster.adapters["v1"])
    assert created.status_code == 201, created.text
    version = created.json()["version"]
    expected = reference(cluster.adapters["v1"])
    answered_by = set()
    for i in range(12):
        # Without X-Adapter-Id nginx spreads requests round-robin, so both replicas must answer, the one
        # that did not take the upload reading it from the shared store.
        reply = cluster.classify("sentiment", header=False)
        assert reply.status_code == 200, f"request {i}: {reply.text}\n{cluster.logs()}"
        body = reply.json()
        assert body["adapter_version"] == version
        assert_matches(body, expected, ["neg", "neu", "pos"])
        answered_by.add(reply.headers["x-loraplex-replica"])
    assert answered_by == {"r1", "r2"}


def test_the_same_adapter_id_always_reaches_the_same_replica(cluster):
    ids = [f"affinity-{i}" for i in range(16)]
    for adapter_id in ids:
        reply = cluster.put(adapter_id, cluster.adapters["v1"])
        assert reply.status_code in (200, 201), reply.text
    owner = {}
    for _ in range(4):
        for adapter_id in ids:
            reply = cluster.classify(adapter_id)
            assert reply.status_code == 200, reply.text
            replica = reply.headers["x-loraplex-replica"]
            assert owner.setdefault(adapter_id, replica) == replica, f"{adapter_id} moved between replicas"
    # A consistent hash over two replicas gives each some of the 16 ids.
    assert set(owner.values()) == {"r1", "r2"}, owner


def wait_for(predicate, timeout: float) -> float:
    """Seconds until predicate() held; fails after `timeout`."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, "not within the bound"
        time.sleep(0.05)


def test_replace_and_delete_through_nginx_reach_both_replicas_within_the_staleness_bound(cluster):
    v1, v2 = cluster.adapters["v1"], cluster.adapters["v2"]
    first = cluster.put("swap", v1)
    assert first.status_code == 201
    old = first.json()["version"]
    direct = {name: srv.url for name, srv in cluster.replicas.items()}
    for url in direct.values():  # both replicas have the old version in memory
        assert cluster.classify("swap", url=url).json()["adapter_version"] == old

    replaced = cluster.put("swap", v2)
    assert replaced.status_code == 200, replaced.text
    new = replaced.json()["version"]
    assert new != old
    # The replica that took the PUT answers with the new version at once ...
    writer = replaced.headers["x-loraplex-replica"]
    assert cluster.classify("swap", url=direct[writer]).json()["adapter_version"] == new
    # ... and the other one within the staleness bound, plus the time of ten requests as this machine
    # serves them now (never less than 1.5 s): measured, so that it holds on a fast or a slow machine.
    took = []
    for _ in range(3):
        started = time.monotonic()
        cluster.classify("swap", url=direct[writer])
        took.append(time.monotonic() - started)
    bound = STALENESS_S + max(1.5, 10 * max(took))
    expected = reference(v2)
    for url in direct.values():
        wait_for(lambda u=url: cluster.classify("swap", url=u).json()["adapter_version"] == new, bound)
        body = cluster.classify("swap", url=url).json()
        assert_matches(body, expected, [f"label_2_{i}" for i in range(3)])

    gone = cluster.delete("swap")
    assert gone.status_code == 204, gone.text
    assert cluster.classify("swap", url=direct[gone.headers["x-loraplex-replica"]]).status_code == 404
    for url in direct.values():
        wait_for(lambda u=url: cluster.classify("swap", url=u).status_code == 404, bound)
    assert cluster.classify("swap").json()["error_type"] == "not_found"


def test_errors_keep_the_api_shape_through_nginx(cluster):
    # The replicas' own errors pass through unchanged, headers included.
    unauthorized = cluster.client.post(
        f"{cluster.nginx.url}/classify", json={"adapter_id": "sentiment", "inputs": "x"}
    )
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error_type"] == "unauthorized"
    assert unauthorized.headers["www-authenticate"] == "Bearer"
    missing = cluster.classify("no-such-adapter")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    # nginx's own: a body above its /classify limit ...
    huge = cluster.client.post(
        f"{cluster.nginx.url}/classify",
        content=b"x" * (5 * 1024 * 1024),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    assert huge.status_code == 413 and huge.json()["error_type"] == "payload_too_large"
    # ... while an adapter-sized upload is let through to the server (which judges it: here, 422).
    big = cluster.client.put(
        f"{cluster.nginx.url}/adapters/too-big",
        files={"adapter_config": ("adapter_config.json", b"{}"),
               "adapter_model": ("adapter_model.safetensors", b"\0" * (8 * 1024 * 1024))},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )  # fmt: skip
    assert big.status_code in (415, 422) and big.json()["error_type"] in (
        "validation",
        "unsupported_media_type",
    )
    assert "x-loraplex-replica" in big.headers  # answered by a replica, not by nginx
    # The metrics the GPU autoscaler reads are there.
    assert "loraplex_queue_depth" in cluster.client.get(f"{cluster.nginx.url}/metrics").text


def test_image_healthcheck_probes_a_live_replica(cluster):
    probe = [sys.executable, str(REPO / "docker" / "healthcheck.py")]
    env = {"PATH": os.environ["PATH"], "LORAPLEX_PORT": str(cluster.replicas["r1"].port)}
    for args in ([], ["/ready"]):
        result = subprocess.run(probe + args, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    assert subprocess.run([*probe, "/admin"], env=env, capture_output=True).returncode == 2


def test_killing_a_replica_mid_load_loses_no_request(cluster):
    """Runs last: it kills r2. Every request nginx may retry (all of them, /classify included) succeeds."""
    ids = [f"load-{i}" for i in range(8)]
    for adapter_id in ids:
        assert cluster.put(adapter_id, cluster.adapters["v1"]).status_code in (200, 201)
    expected = reference(cluster.adapters["v1"])
    results: list[tuple[int, str, float, dict | str]] = []
    lock = threading.Lock()
    killed_at: list[float] = []

    def worker(n: int) -> None:
        with httpx.Client(timeout=60) as client:
            for i in range(30):
                adapter_id = ids[(n + i) % len(ids)]
                headers = {"Authorization": f"Bearer {API_KEY}"}
                if i % 3:  # most requests name their adapter, some do not
                    headers["X-Adapter-Id"] = adapter_id
                body = {"adapter_id": adapter_id, "inputs": TEXTS, "raw_scores": True}
                try:
                    reply = client.post(f"{cluster.nginx.url}/classify", json=body, headers=headers)
                    replica = reply.headers.get("x-loraplex-replica", "")
                    payload = reply.json() if reply.status_code == 200 else reply.text
                    outcome = (reply.status_code, replica, time.monotonic(), payload)
                except httpx.HTTPError as exc:
                    outcome = (0, "", time.monotonic(), repr(exc))
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    while len(results) < 30:
        time.sleep(0.01)
    victim = cluster.replicas["r2"]
    victim.proc.send_signal(signal.SIGKILL)
    killed_at.append(time.monotonic())
    for thread in threads:
        thread.join(120)
    victim.proc.wait(10)

    failures = [r for r in results if r[0] != 200]
    assert not failures, (
        f"{len(failures)} of {len(results)} requests failed: {failures[:3]}\n{cluster.logs()}"
    )
    assert len(results) == 120
    for _, _, _, body in results:
        assert_matches(body, expected, ["neg", "neu", "pos"])
    before = {replica for _, replica, t, _ in results if t < killed_at[0]}
    after = {replica for _, replica, t, _ in results if t > killed_at[0] + 0.5}
    assert before == {"r1", "r2"}, "the load did not reach both replicas before the kill"
    assert after == {"r1"}
