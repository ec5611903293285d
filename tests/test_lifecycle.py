"""Adapter lifecycle through a real server: upload, classify, hot swap, eviction, delete, hostile uploads.

One server for the module (8 slots, host cache of 16, admin token set); each test uses its own adapter ids.
Its engine is the real one behind a gate that the tests open and close (tests/paced_engine.py), so what
overlaps what is set by the test, not by the machine's speed.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch

from tests.lifecycle_support import TEXTS, AdapterFactory, PeftReference, raw_logits, upload
from tests.live_server import LiveServer
from tests.paced_engine import EngineControl
from tests.peft_factory import peft_logits
from tests.test_validation import MAX_LABELS, MAX_RANK, MAX_UPLOAD, hostile_cases, load_good, snapshot

TOKEN = "admin-secret"
SLOTS = 8
HOST_CACHE = 16
ATOL = 1e-5


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, workers) -> Path:  # a store of its own per server
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def control(workers) -> EngineControl:  # one per server: its counts are that engine's
    return EngineControl()


@pytest.fixture(scope="module")
def server(store_dir, control, workers):
    args = [
        *workers,
        "--adapter-store", str(store_dir), "--max-resident", str(SLOTS), "--max-host-cache", str(HOST_CACHE),
        "--max-rank", str(MAX_RANK), "--max-labels", str(MAX_LABELS), "--max-upload-bytes", str(MAX_UPLOAD),
    ]  # fmt: skip
    with LiveServer(*args, env={"LORAPLEX_ADMIN_TOKEN": TOKEN}, control=control) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture(scope="module")
def factory() -> AdapterFactory:
    return AdapterFactory()


@pytest.fixture(scope="module")
def reference() -> PeftReference:
    return PeftReference()


def metric(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name}(?:_total)? (\S+)$", client.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def test_upload_then_classify_matches_peft(client, tmp_path, factory):
    folder = factory.save(tmp_path / "a", seed=101)
    response = upload(client, "golden", folder)
    assert response.status_code == 201, response.text
    info = response.json()
    labels = json.loads((folder / "labels.json").read_text())
    assert info["adapter_id"] == "golden" and len(info["version"]) == 12
    assert (info["rank"], info["lora_alpha"], info["target_modules"]) == (8, 16, ["query", "value"])
    assert (info["num_labels"], info["labels"]) == (3, labels)
    assert info["size_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
    assert info["created_at"].endswith("Z")

    version, logits = raw_logits(client, "golden", TEXTS)
    assert version == info["version"]
    torch.testing.assert_close(logits, peft_logits(folder, TEXTS), atol=ATOL, rtol=0)
    probs = client.post("/classify", json={"adapter_id": "golden", "inputs": TEXTS}).json()["results"]
    torch.testing.assert_close(
        torch.tensor([list(r["scores"].values()) for r in probs]), logits.softmax(-1), atol=ATOL, rtol=0
    )
    assert list(probs[0]["scores"]) == labels

    shown = client.get("/adapters/golden").json()
    assert info.pop("warnings") == []  # the upload's own answer: nothing to warn about here
    assert shown == {**info, "resident": True}
    assert shown in client.get("/adapters").json()["adapters"]


def test_reupload_keeps_version_and_replacement_answers_200(client, tmp_path, factory):
    first = factory.save(tmp_path / "a", seed=111)
    second = factory.save(tmp_path / "b", seed=112)
    created = upload(client, "replace-me", first)
    again = upload(client, "replace-me", first)
    assert (created.status_code, again.status_code) == (201, 200)
    assert again.json()["version"] == created.json()["version"]
    assert again.json()["created_at"] == created.json()["created_at"]
    replaced = upload(client, "replace-me", second)
    assert replaced.status_code == 200 and replaced.json()["version"] != created.json()["version"]
    relabelled = client.put(
        "/adapters/replace-me",
        files={
            "adapter_config": ("adapter_config.json", (second / "adapter_config.json").read_bytes()),
            "adapter_model": (
                "adapter_model.safetensors",
                (second / "adapter_model.safetensors").read_bytes(),
            ),
        },
    )
    assert relabelled.status_code == 200
    assert relabelled.json()["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert relabelled.json()["version"] != replaced.json()["version"]


def test_writes_need_the_admin_token(server, client, store_dir, tmp_path, factory):
    folder = factory.save(tmp_path / "a", seed=121)
    assert upload(client, "guarded", folder).status_code == 201
    before = snapshot(store_dir)
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert upload(anonymous, "guarded", factory.save(tmp_path / "b", seed=122)).status_code == 401
        wrong = upload(anonymous, "other", folder, headers={"Authorization": "Bearer nope"})
        assert (wrong.status_code, wrong.json()["error_type"]) == (401, "unauthorized")
        assert anonymous.delete("/adapters/guarded").status_code == 401
        assert anonymous.get("/adapters/guarded").status_code == 200  # reads are open without an API key
    assert snapshot(store_dir) == before


def test_hostile_uploads_get_their_error_and_change_nothing(server, client, store_dir, tmp_path, factory):
    good_dir = factory.save(tmp_path / "good", seed=131)
    assert upload(client, "victim", good_dir).status_code == 201
    version, expected = raw_logits(client, "victim", TEXTS)
    good = load_good(good_dir)
    before = snapshot(store_dir)
    failures = []
    for case in hostile_cases(good):
        files = {
            "adapter_config": (
                "adapter_config.json",
                case.config if case.config is not None else good.config_bytes,
            ),
            "adapter_model": (case.model_filename, case.model if case.model is not None else good.model),
        }
        files = {name: part for name, part in files.items() if name not in case.omit}
        data = {"labels": case.labels if case.labels is not None else good.labels, **case.parts}
        url = "/adapters/" + quote(case.adapter_id, safe="")
        if case.json_body is not None:
            response = client.put(url, json=case.json_body)
        elif case.chunked:
            request = client.build_request("PUT", url, files=files, data=data)
            body = request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            chunks = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
            response = client.put(url, content=chunks, headers=headers)
        else:
            response = client.put(url, files=files, data=data)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if (response.status_code, body.get("error_type")) != (case.status, case.error_type) or not body.get(
            "error"
        ):
            failures.append(f"{case.name}: {response.status_code} {response.text[:200]}")
        if snapshot(store_dir) != before:
            failures.append(f"{case.name}: the store changed")
    assert failures == []
    # Serving is unaffected: same version, same answers, and the server still takes good uploads.
    assert raw_logits(client, "victim", TEXTS)[0] == version
    torch.testing.assert_close(raw_logits(client, "victim", TEXTS)[1], expected, atol=0, rtol=0)
    assert upload(client, "after-hostile", good_dir).status_code == 201


def test_more_hot_adapters_than_slots_zipf_traffic(client, tmp_path, reference):
    # Two shapes so that slots are rewritten with different ranks, targets and label counts.
    wide = AdapterFactory(r=4, lora_alpha=8, target_modules=("query", "key", "value", "dense"), num_labels=2)
    narrow = AdapterFactory(r=8, lora_alpha=16)
    folders = {}
    for i in range(40):
        folders[f"zipf-{i}"] = (wide if i % 2 else narrow).save(tmp_path / str(i), seed=1000 + i)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda item: upload(client, *item).status_code, folders.items()))
    assert statuses == [201] * 40
    expected = {adapter_id: reference.logits(folder, TEXTS) for adapter_id, folder in folders.items()}
    evictions, store_loads = metric(client, "loraplex_slot_evictions"), metric(client, "loraplex_store_loads")

    rng = random.Random(0)
    ids = list(folders)
    weights = [1 / (rank + 1) for rank in range(len(ids))]
    picks = rng.choices(ids, weights=weights, k=160)

    def ask(adapter_id: str) -> str | None:
        with httpx.Client(base_url=client.base_url, timeout=60) as own:
            response = own.post(
                "/classify", json={"adapter_id": adapter_id, "inputs": TEXTS, "raw_scores": True}
            )
        if response.status_code != 200:
            return f"{adapter_id}: {response.status_code} {response.text[:200]}"
        rows = torch.tensor([list(r["scores"].values()) for r in response.json()["results"]])
        if not torch.allclose(rows, expected[adapter_id], atol=ATOL, rtol=0):
            return f"{adapter_id}: off by {(rows - expected[adapter_id]).abs().max().item():.2e}"
        return None

    with ThreadPoolExecutor(12) as pool:
        problems = [p for p in pool.map(ask, picks) if p]
    assert problems == []
    assert len(set(picks)) > SLOTS
    assert metric(client, "loraplex_slot_evictions") > evictions
    assert metric(client, "loraplex_store_loads") > store_loads  # 40 adapters > host cache of 16
    assert metric(client, "loraplex_resident_adapters") == SLOTS


def test_hot_swap_under_load(client, tmp_path, factory, reference):
    versions = [factory.save(tmp_path / str(i), seed=2000 + i) for i in range(21)]
    first = upload(client, "swap", versions[0])
    assert first.status_code == 201
    index_of = {first.json()["version"]: 0}
    expected = {0: reference.logits(versions[0], TEXTS)}
    answered: list[tuple[float, int]] = [(time.monotonic(), 0)]  # (when the PUT answered, version index)
    results: list[tuple[float, int, str, torch.Tensor | None]] = []  # (sent, status, version, logits)
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as own:
            while not stop.is_set():
                sent = time.monotonic()
                response = own.post(
                    "/classify", json={"adapter_id": "swap", "inputs": TEXTS, "raw_scores": True}
                )
                if response.status_code != 200:
                    results.append((sent, response.status_code, response.text, None))
                    continue
                body = response.json()
                rows = torch.tensor([list(r["scores"].values()) for r in body["results"]])
                results.append((sent, 200, body["adapter_version"], rows))

    def answer_after(moment: float) -> None:
        """Wait until a request sent after `moment` has its answer, so that every version is asked for."""
        deadline = time.monotonic() + 300
        while not any(sent > moment for sent, *_ in list(results)):
            assert time.monotonic() < deadline, "no answer for five minutes"
            time.sleep(0.01)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        answer_after(answered[0][0])
        for i in range(1, 21):
            response = upload(client, "swap", versions[i])
            assert response.status_code == 200, response.text
            index_of[response.json()["version"]] = i
            answered.append((time.monotonic(), i))
            expected[i] = reference.logits(versions[i], TEXTS)
            answer_after(answered[-1][0])
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert [r for r in results if r[1] != 200] == []
    stale, wrong = [], []
    for sent, _, version, rows in results:
        index = index_of[version]
        if not torch.allclose(rows, expected[index], atol=ATOL, rtol=0):
            wrong.append(version)
        newest_answered = max(i for when, i in answered if when <= sent)
        if index < newest_answered:
            stale.append((version, newest_answered))
    assert wrong == []
    assert stale == []
    assert set(index_of) == {r[2] for r in results}  # every version was answered, none other


def test_delete_while_in_use(client, control, tmp_path, factory, reference):
    folder = factory.save(tmp_path / "a", seed=301)
    info = upload(client, "doomed", folder).json()
    expected = reference.logits(folder, TEXTS * 10)
    records: list[tuple[float, float, int, dict]] = []  # (sent, received, status, body)
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=client.base_url, timeout=60) as own:
            while not stop.is_set():
                sent = time.monotonic()
                response = own.post(
                    "/classify", json={"adapter_id": "doomed", "inputs": TEXTS * 10, "raw_scores": True}
                )
                records.append((sent, time.monotonic(), response.status_code, response.json()))

    def wait_until(done, what: str) -> None:
        deadline = time.monotonic() + 300
        while not done():
            assert time.monotonic() < deadline, f"{what} did not happen within five minutes"
            time.sleep(0.01)

    entered = control.entered()[0]
    control.hold()  # the requests sent now stay in the engine (and its queue) until after the DELETE
    threads = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: control.entered()[0] > entered, "a batch of 'doomed' reaching the engine")
        delete_sent = time.monotonic()
        deleted = client.delete("/adapters/doomed")
        delete_answered = time.monotonic()
    finally:
        control.release()
    wait_until(
        lambda: any(sent > delete_answered for sent, *_ in list(records)), "a request after the DELETE"
    )
    stop.set()
    for thread in threads:
        thread.join()

    assert deleted.status_code == 204 and deleted.content == b""
    assert {status for _, _, status, _ in records} <= {200, 404}
    for sent, _received, status, body in records:
        if status == 200:
            assert body["adapter_version"] == info["version"]
            rows = torch.tensor([list(r["scores"].values()) for r in body["results"]])
            torch.testing.assert_close(rows, expected, atol=ATOL, rtol=0)
        else:
            assert body["error_type"] == "not_found"
        if sent > delete_answered:
            assert status == 404
    in_flight = [r for r in records if r[0] < delete_sent and r[1] > delete_answered]
    assert any(status == 200 for _, _, status, _ in in_flight), "no request was in flight during the DELETE"
    assert client.get("/adapters/doomed").status_code == 404
    assert client.delete("/adapters/doomed").status_code == 404


def test_concurrent_puts_of_one_id(client, store_dir, tmp_path, factory, reference):
    folders = [factory.save(tmp_path / str(i), seed=400 + i) for i in range(8)]
    barrier = threading.Barrier(len(folders))

    def put(folder: Path) -> httpx.Response:
        with httpx.Client(base_url=client.base_url, timeout=60, headers=client.headers) as own:
            barrier.wait()
            return upload(own, "contended", folder)

    with ThreadPoolExecutor(len(folders)) as pool:
        responses = list(pool.map(put, folders))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 7 + [201]
    by_version = {r.json()["version"]: folder for r, folder in zip(responses, folders, strict=True)}
    assert len(by_version) == 8
    final = client.get("/adapters/contended").json()["version"]
    assert final in by_version
    version, logits = raw_logits(client, "contended", TEXTS)
    assert version == final
    torch.testing.assert_close(logits, reference.logits(by_version[final], TEXTS), atol=ATOL, rtol=0)
    folder = store_dir / "adapters" / "contended"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json", final])
    assert list((store_dir / "tmp").iterdir()) == []
