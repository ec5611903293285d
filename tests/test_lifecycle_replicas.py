"""Several server processes on one store directory: sharing within the staleness bound, restarts, SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from loraplex.adapters.store import AdapterFiles, DirectoryStore
from tests.lifecycle_support import TEXTS, AdapterFactory, PeftReference, raw_logits, upload
from tests.live_server import LiveServer
from tests.test_store import assert_consistent

STALENESS_S = 1.0
# On top of the bound: the time of REQUESTS_OF_MARGIN requests as this machine serves them now (measured,
# so that the bound holds on a fast or a slow machine alike), and never less than MARGIN_FLOOR_S.
REQUESTS_OF_MARGIN = 10
MARGIN_FLOOR_S = 1.5  # what a loaded two-core machine needed
PARTS = {"adapter_config": "json", "adapter_model": "safetensors"}
ATOL = 1e-5


def server_args(store_dir: Path) -> list[str]:
    return ["--adapter-store", str(store_dir), "--staleness-s", str(STALENESS_S), "--max-resident", "4"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-store")


@pytest.fixture(scope="module")
def replicas(store_dir):
    servers = [LiveServer(*server_args(store_dir)) for _ in range(2)]
    starting = [threading.Thread(target=s.start) for s in servers]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    try:
        for srv in servers:
            assert httpx.get(srv.url + "/ready", timeout=60).status_code == 200, srv.log()
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture(scope="module")
def factory() -> AdapterFactory:
    return AdapterFactory()


@pytest.fixture(scope="module")
def reference() -> PeftReference:
    return PeftReference()


def clients(replicas) -> tuple[httpx.Client, httpx.Client]:
    return tuple(httpx.Client(base_url=srv.url, timeout=60) for srv in replicas)


def test_upload_on_one_replica_is_served_by_the_other_at_once(replicas, tmp_path, factory, reference):
    a, b = clients(replicas)
    folder = factory.save(tmp_path / "a", seed=501)
    version = upload(a, "shared", folder).json()["version"]
    # Unknown locally -> B checks the store; no waiting for the staleness bound.
    got, logits = raw_logits(b, "shared", TEXTS)
    assert got == version
    torch.testing.assert_close(logits, reference.logits(folder, TEXTS), atol=ATOL, rtol=0)
    assert b.get("/adapters/shared").json()["version"] == version
    assert "shared" in [info["adapter_id"] for info in b.get("/adapters").json()["adapters"]]


def visible_within(client: httpx.Client) -> float:
    """The staleness bound plus the time of REQUESTS_OF_MARGIN requests to `client`'s replica, now."""
    took = []
    for _ in range(3):
        started = time.monotonic()
        client.get("/adapters")  # a read of every manifest in the store, as a refresh reads one
        took.append(time.monotonic() - started)
    return STALENESS_S + max(MARGIN_FLOOR_S, REQUESTS_OF_MARGIN * max(took))


def kill_hard(server: LiveServer) -> None:
    """SIGKILL the server's supervisor, then wait until its engine and workers are gone too: they die of
    their parent's death, a moment later, and until then a writer among them still holds its store lock
    (so a store opened now would rightly leave that adapter's folders alone)."""
    family, todo = [], [server.proc.pid]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                todo += [int(child) for child in children]
                family += [int(child) for child in children]
    server.signal(signal.SIGKILL)
    server.proc.wait()
    deadline = time.monotonic() + 120  # a bound for a hung machine, not an expected time
    for pid in family:
        while _alive(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived its supervisor"
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, waiting to be reaped, holds no locks and counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def poll_until(check, limit: float) -> float:
    """Seconds until `check()` is true, polling every 20 ms; fails after `limit` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, f"not seen within {limit} s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_replacement_and_deletion_reach_the_other_replica_within_the_bound(
    replicas, tmp_path, factory, reference
):
    a, b = clients(replicas)
    old, new = factory.save(tmp_path / "old", seed=511), factory.save(tmp_path / "new", seed=512)
    old_version = upload(a, "moving", old).json()["version"]
    assert raw_logits(b, "moving", TEXTS)[0] == old_version  # B now caches the old version
    expected = {old_version: reference.logits(old, TEXTS)}

    new_version = upload(a, "moving", new).json()["version"]
    expected[new_version] = reference.logits(new, TEXTS)
    seen = []

    def b_has_new() -> bool:
        version, logits = raw_logits(b, "moving", TEXTS)
        seen.append((version, logits))
        return version == new_version

    bound = visible_within(b)
    assert poll_until(b_has_new, bound) <= bound
    for version, logits in seen:
        torch.testing.assert_close(logits, expected[version], atol=ATOL, rtol=0)

    assert a.delete("/adapters/moving").status_code == 204
    gone = lambda: b.post("/classify", json={"adapter_id": "moving", "inputs": "x"}).status_code == 404  # noqa: E731
    poll_until(gone, visible_within(b))
    assert b.get("/adapters/moving").status_code == 404


def slow_body(request: httpx.Request, pause: float, chunks: int = 20):
    body = request.read()
    step = len(body) // chunks + 1
    for i in range(0, len(body), step):
        yield body[i : i + step]
        time.sleep(pause)


def test_sigkill_mid_upload_then_restart_keeps_every_adapter(
    replicas, store_dir, tmp_path, factory, reference
):
    a, b = clients(replicas)
    folders = {f"keeper-{i}": factory.save(tmp_path / str(i), seed=520 + i) for i in range(3)}
    folders["crashy"] = factory.save(tmp_path / "crashy-old", seed=530)
    versions = {
        adapter_id: upload(a, adapter_id, folder).json()["version"] for adapter_id, folder in folders.items()
    }

    # B dies (SIGKILL) while it is receiving a replacement of "crashy".
    replacement = factory.save(tmp_path / "crashy-new", seed=531)
    files = {name: (replacement / f"{name}.{ext}").read_bytes() for name, ext in PARTS.items()}
    request = b.build_request("PUT", "/adapters/crashy", files=files)
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    outcome = []

    def send() -> None:
        try:
            outcome.append(
                b.put("/adapters/crashy", content=slow_body(request, 0.05), headers=headers).status_code
            )
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.4)
    kill_hard(replicas[1])
    sender.join()
    assert outcome and outcome[0] != 200 and outcome[0] != 201

    store = DirectoryStore(store_dir)
    for adapter_id, version in versions.items():
        assert assert_consistent(store, adapter_id).version == version
    assert list((store_dir / "tmp").iterdir()) == []

    # A restarted replica lists every stored adapter, loads them lazily, and serves them exactly.
    with (
        LiveServer(*server_args(store_dir)) as restarted,
        httpx.Client(base_url=restarted.url, timeout=60) as c,
    ):
        listed = {info["adapter_id"]: info for info in c.get("/adapters").json()["adapters"]}
        assert {k: listed[k]["version"] for k in versions} == versions
        assert not any(info["resident"] for info in listed.values())
        assert re.search(r"^loraplex_store_loads(_total)? 0\.0$", c.get("/metrics").text, re.M)
        for adapter_id, folder in folders.items():
            version, logits = raw_logits(c, adapter_id, TEXTS)
            assert version == versions[adapter_id]
            torch.testing.assert_close(logits, reference.logits(folder, TEXTS), atol=ATOL, rtol=0)
        assert c.get("/adapters/crashy").json()["resident"] is True

        # A kill right after a whole upload was sent lands in validation or in the store write:
        # either way the store holds the old version or the new one, complete.
        newer = factory.save(tmp_path / "crashy-newer", seed=532)
        sender = threading.Thread(target=lambda: _try(lambda: upload(c, "crashy", newer)))
        sender.start()
        time.sleep(0.05)
        kill_hard(restarted)
        sender.join()
    final = assert_consistent(DirectoryStore(store_dir), "crashy")
    candidates = {versions["crashy"]: folders["crashy"], _version_of(newer): newer}
    assert final.version in candidates
    bound = visible_within(a)
    got = poll_until(lambda: raw_logits(a, "crashy", TEXTS)[0] == final.version, bound)
    assert got <= bound
    torch.testing.assert_close(
        raw_logits(a, "crashy", TEXTS)[1],
        reference.logits(candidates[final.version], TEXTS),
        atol=ATOL,
        rtol=0,
    )


def _try(call) -> None:
    with contextlib.suppress(httpx.HTTPError):
        call()


def _version_of(folder: Path) -> str:
    labels = tuple(json.loads((folder / "labels.json").read_text()))
    return AdapterFiles(
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
        labels,
    ).version()
