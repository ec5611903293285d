"""DirectoryStore without HTTP: versions, replacement, deletion, crash safety, concurrent writers."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from loraplex.adapters.errors import InvalidAdapterError, NotFoundError
from loraplex.adapters.store import AdapterFiles, AdapterRecord, DirectoryStore, utc_now

REPO = Path(__file__).resolve().parent.parent


def make(adapter_id: str, payload: bytes, labels=("neg", "pos")) -> tuple[AdapterRecord, AdapterFiles]:
    files = AdapterFiles(config=b'{"r": 8}', model=payload, labels=tuple(labels))
    record = AdapterRecord(
        adapter_id=adapter_id,
        version=files.version(),
        sha256=hashlib.sha256(payload).hexdigest(),
        rank=8,
        lora_alpha=16,
        target_modules=("query", "value"),
        labels=files.labels,
        size_bytes=len(payload),
        created_at=utc_now(),
    )
    return record, files


def assert_consistent(store: DirectoryStore, adapter_id: str) -> AdapterRecord | None:
    """The manifest names a complete version whose content hashes to it, and nothing else is left over."""
    record = store.get(adapter_id)
    folder = store.root / "adapters" / adapter_id
    if record is None:
        assert not folder.exists() or os.listdir(folder) == []
        return None
    files = store.read(adapter_id, record.version)
    assert files.version() == record.version
    assert hashlib.sha256(files.model).hexdigest() == record.sha256
    assert sorted(os.listdir(folder)) == sorted(["manifest.json", record.version])
    return record


def test_put_get_read_round_trip(tmp_path):
    store = DirectoryStore(tmp_path)
    record, files = make("sentiment", b"weights-1")
    stored, created = store.put(record, files)
    assert created and stored == record
    assert store.get("sentiment") == record
    assert store.read("sentiment", record.version) == files
    assert [r.adapter_id for r in store.list()] == ["sentiment"]
    assert store.get("other") is None
    # A second store object on the same directory (another process's view) sees the same thing.
    assert DirectoryStore(tmp_path).get("sentiment") == record


def test_identical_content_keeps_version_and_created_at(tmp_path):
    store = DirectoryStore(tmp_path)
    first, files = make("a", b"same")
    store.put(first, files)
    time.sleep(1.1)
    again, _ = make("a", b"same")
    assert again.created_at != first.created_at
    stored, created = store.put(again, files)
    assert not created
    assert stored == first


def test_version_changes_with_any_part_of_the_content(tmp_path):
    base = make("a", b"w")[1]
    assert AdapterFiles(base.config + b" ", base.model, base.labels).version() != base.version()
    assert AdapterFiles(base.config, base.model + b"x", base.labels).version() != base.version()
    assert AdapterFiles(base.config, base.model, ("x", "y")).version() != base.version()


def test_replace_makes_new_version_current_and_drops_the_old_one(tmp_path):
    store = DirectoryStore(tmp_path)
    old, old_files = make("a", b"old")
    new, new_files = make("a", b"new")
    store.put(old, old_files)
    stored, created = store.put(new, new_files)
    assert not created and stored.version == new.version != old.version
    assert store.read("a", new.version) == new_files
    with pytest.raises(NotFoundError):
        store.read("a", old.version)
    assert_consistent(store, "a")


def test_delete(tmp_path):
    store = DirectoryStore(tmp_path)
    record, files = make("a", b"w")
    store.put(record, files)
    store.put(*make("b", b"w"))
    assert store.delete("a") is True
    assert store.get("a") is None
    assert [r.adapter_id for r in store.list()] == ["b"]
    with pytest.raises(NotFoundError):
        store.read("a", record.version)
    assert store.delete("a") is False
    assert not (tmp_path / "adapters" / "a").exists()


@pytest.mark.parametrize("bad", ["../escape", "A", "café", "", "a" * 65, ".hidden", "-x", "a/b", "a b"])
def test_ids_outside_the_allowlist_touch_nothing(tmp_path, bad):
    store = DirectoryStore(tmp_path / "store")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    record, files = make("ok", b"w")
    with pytest.raises(InvalidAdapterError, match="not allowed"):
        store.put(AdapterRecord(**{**record.__dict__, "adapter_id": bad}), files)
    for call in (store.get, store.delete):
        with pytest.raises(InvalidAdapterError):
            call(bad)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_list_ignores_entries_that_are_not_adapters(tmp_path):
    store = DirectoryStore(tmp_path)
    store.put(*make("a", b"w"))
    (tmp_path / "adapters" / "Not-An-Id").mkdir()
    (tmp_path / "adapters" / "half").mkdir()  # a folder without manifest: never finished
    assert [r.adapter_id for r in store.list()] == ["a"]


def test_recover_removes_leftovers_but_not_a_live_writers_files(tmp_path):
    store = DirectoryStore(tmp_path)
    record, files = make("a", b"w")
    store.put(record, files)
    orphan_version = tmp_path / "adapters" / "a" / "0123456789ab"
    orphan_version.mkdir()
    dead = tmp_path / "tmp" / "a~dead"
    dead.mkdir()
    live = tmp_path / "tmp" / "b~live"
    live.mkdir()
    lock_fd = os.open(tmp_path / "locks" / "b.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # "b" is being written right now
    try:
        DirectoryStore(tmp_path)
        assert not dead.exists() and not orphan_version.exists()
        assert live.exists()
    finally:
        os.close(lock_fd)
    DirectoryStore(tmp_path)
    assert not live.exists()
    assert_consistent(store, "a")


WRITER = textwrap.dedent(
    """
    import sys
    from tests.test_store import make
    from loraplex.adapters.store import DirectoryStore
    store = DirectoryStore(sys.argv[1])
    payloads = [bytes([i]) * (4 << 20) for i in range(1, 4)]
    print("ready", flush=True)
    i = 0
    while True:
        store.put(*make("victim", payloads[i % 3]))
        i += 1
    """
)


def test_sigkill_during_writes_leaves_old_or_new_version(tmp_path):
    store = DirectoryStore(tmp_path)
    versions = {make("victim", bytes([i]) * (4 << 20))[0].version for i in range(1, 4)}
    seen = set()
    for attempt in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.02 + 0.04 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        record = assert_consistent(DirectoryStore(tmp_path), "victim")  # recovery runs on open
        if record is not None:
            assert record.version in versions
            seen.add(record.version)
        assert os.listdir(tmp_path / "tmp") == []
    assert seen, "the writer never completed a single version"
    assert_consistent(store, "victim")


CONCURRENT = textwrap.dedent(
    """
    import sys
    from tests.test_store import make
    from loraplex.adapters.store import DirectoryStore
    store = DirectoryStore(sys.argv[1])
    worker = int(sys.argv[2])
    for i in range(5):
        store.put(*make("shared", f"{worker}-{i}".encode() * 50000))
    """
)


def test_concurrent_writers_in_several_processes_never_corrupt(tmp_path):
    store = DirectoryStore(tmp_path)
    written = {make("shared", f"{w}-{i}".encode() * 50000)[0].version for w in range(4) for i in range(5)}
    problems: list[str] = []
    stop = threading.Event()

    def read_continuously() -> None:
        while not stop.is_set():
            record = store.get("shared")
            if record is None:
                continue
            try:
                files = store.read("shared", record.version)
            except NotFoundError:
                continue  # replaced between the two reads: a reader re-resolves
            if files.version() != record.version:
                problems.append(f"manifest {record.version} but content {files.version()}")

    reader = threading.Thread(target=read_continuously)
    reader.start()
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path), str(w)], cwd=REPO)
        for w in range(4)
    ]
    try:
        assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    finally:
        stop.set()
        reader.join()
    assert problems == []
    final = assert_consistent(store, "shared")
    assert final is not None and final.version in written
    assert os.listdir(tmp_path / "tmp") == []
