"""The store and the engine thread stay off the event loop's path.

A request whose adapter is in host memory never waits for the store: not while the store is slow (a
read held for as long as the test likes), not while it is down. The event loop never waits for the
engine thread either: while a slot write is held on the worker, residency answers and uploads go on.
Each test holds the slow side until the fast side has answered, so no timing is assumed.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from loraplex.adapters.errors import NotFoundError, PayloadTooLargeError, UnavailableError
from loraplex.adapters.registry import Registry
from loraplex.adapters.store import AdapterRecord, DirectoryStore
from loraplex.engine.core import Engine
from tests.lifecycle_support import AdapterFactory

HOLD_S = 60  # how long a held side waits at most; the tests release it long before


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    factory = AdapterFactory()
    return [factory.save(root / str(i), seed=700 + i) for i in range(3)]


class HeldStore(DirectoryStore):
    """A directory store whose manifest reads, once `hold` is set, wait until `release` (or fail: `down`)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.hold = False
        self.down = False
        self.reads_waiting = threading.Semaphore(0)
        self.release = threading.Event()

    def get(self, adapter_id: str) -> AdapterRecord | None:
        if self.down:
            raise UnavailableError("The adapter store is unreachable.", retry_after=5)
        if self.hold:
            self.reads_waiting.release()
            self.release.wait(HOLD_S)
        return super().get(adapter_id)


class HeldEngine(Engine):
    """The real engine; once `hold` is set, a slot write waits on the worker thread until `release`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hold = False
        self.writing = threading.Event()
        self.release = threading.Event()

    def load_slot(self, slot, adapter):
        if self.hold:
            self.writing.set()
            self.release.wait(HOLD_S)
        super().load_slot(slot, adapter)


@pytest.fixture(scope="module")
def engine():
    return HeldEngine(num_slots=2, max_rank=16, max_labels=8)


def test_a_slow_store_never_delays_a_cached_adapter(engine, folders, tmp_path):
    store = HeldStore(tmp_path)
    registry = Registry(store, engine, staleness_s=0.0)  # every get is due for a manifest check

    async def main():
        first, _ = await registry.import_dir("cached", folders[0])
        await registry.import_dir("other", folders[1])
        registry.start()
        store.hold = True
        # The background checks are stuck in the store; every get of a cached adapter still answers.
        assert await asyncio.to_thread(store.reads_waiting.acquire, True, HOLD_S)
        for _ in range(20):
            handle = await asyncio.wait_for(registry.get("cached"), HOLD_S)
            assert handle.version == first.version
        assert (await registry.get("other")).adapter_id == "other"
        assert not store.release.is_set()  # the store never answered meanwhile
        store.release.set()
        await registry.close()

    asyncio.run(main())


def test_a_store_outage_keeps_cached_adapters_serving_and_fails_only_uncached_ones(engine, folders, tmp_path):
    store = HeldStore(tmp_path)
    writer = Registry(DirectoryStore(tmp_path), engine)
    registry = Registry(store, engine, staleness_s=0.0)

    async def main():
        cached, _ = await registry.import_dir("cached", folders[0])
        await writer.import_dir("elsewhere", folders[1])  # in the store, never read by `registry`
        store.down = True
        for _ in range(5):
            assert (await registry.get("cached")).version == cached.version
            await asyncio.sleep(0)  # let the background checks fail
        with pytest.raises(UnavailableError):
            await registry.get("elsewhere")
        store.down = False
        assert (await registry.get("elsewhere")).adapter_id == "elsewhere"

    asyncio.run(main())


def test_the_event_loop_never_waits_for_a_slot_write(engine, folders, tmp_path):
    registry = Registry(DirectoryStore(tmp_path), engine)

    async def main():
        a, _ = await registry.import_dir("a", folders[0])
        handle = await registry.get("a")
        engine.hold = True
        engine.release.clear()
        writing = asyncio.create_task(asyncio.to_thread(registry.slots_for, [handle]))
        assert await asyncio.to_thread(engine.writing.wait, HOLD_S)
        # The worker is inside a slot write; the event loop's side of the registry goes on.
        assert not registry.is_resident("a", a.version) and registry.resident == 0
        replaced, _ = await registry.import_dir("a", folders[2])  # retires the version being written
        assert replaced.version != a.version
        assert not writing.done()
        engine.hold = False
        engine.release.set()
        assert await writing == [0]
        # The slot holds the retired version; the resident count is of live versions only.
        assert registry.is_resident("a", a.version) and registry.resident == 0
        # The retirement reached the worker: the replaced version's slot is the first one given up.
        new = await registry.get("a")
        other = await registry.get("a")
        assert new is other
        await asyncio.to_thread(registry.slots_for, [new])
        b, _ = await registry.import_dir("b", folders[1])
        await asyncio.to_thread(registry.slots_for, [await registry.get("b")])
        assert not registry.is_resident("a", a.version)
        assert registry.is_resident("a", replaced.version) and registry.is_resident("b", b.version)
        assert registry.resident == 2

    asyncio.run(main())


def test_a_host_cache_smaller_than_the_slots_is_refused(engine, tmp_path):
    with pytest.raises(ValueError, match=r"max_host_cache \(1\) must be at least the number of engine slots"):
        Registry(DirectoryStore(tmp_path), engine, max_host_cache=1)


def test_the_id_maps_hold_only_ids_that_are_known_or_busy(engine, folders, tmp_path):
    """Writes and reads of many ids, most deleted or never there: the per-id locks and write generations
    are forgotten once an id is gone and idle, so they do not grow with every id ever written or asked."""
    registry = Registry(DirectoryStore(tmp_path), engine)

    async def main():
        for i in range(30):
            await registry.import_dir(f"gone-{i}", folders[i % len(folders)])
            await registry.delete(f"gone-{i}")
            with pytest.raises(NotFoundError):
                await registry.get(f"never-{i}")
        await registry.import_dir("kept", folders[0])
        assert set(registry._id_locks) == set()
        assert set(registry._generation) <= {"kept"}
        # A write still makes an older manifest read of the same id stale: a read started before a delete
        # does not bring the deleted version back.
        store_get = registry.store.get
        started, go_on = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def held_get(adapter_id):
            record = store_get(adapter_id)
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(go_on.wait(), loop).result(HOLD_S)
            return record

        registry.store.get = held_get
        registry._known.clear()  # the next get reads the manifest
        reading = asyncio.ensure_future(registry.get("kept"))
        await started.wait()
        registry.store.get = store_get
        await registry.delete("kept")
        go_on.set()
        with pytest.raises(NotFoundError):
            await reading  # the read came back after the delete: discarded, so not found
        assert set(registry._id_locks) == set() and set(registry._generation) == set()

    asyncio.run(main())


def test_uploads_and_preloads_are_bounded_by_the_model_size_limit(engine, folders, tmp_path):
    size = (folders[0] / "adapter_model.safetensors").stat().st_size
    registry = Registry(DirectoryStore(tmp_path), engine, max_model_bytes=size - 1)
    config = (folders[0] / "adapter_config.json").read_bytes()
    model = (folders[0] / "adapter_model.safetensors").read_bytes()

    async def main():
        with pytest.raises(PayloadTooLargeError, match=f"over the limit of {size - 1} bytes"):
            await registry.import_dir("big", folders[0])
        with pytest.raises(PayloadTooLargeError, match=f"over the limit of {size - 1} bytes"):
            await registry.put("big", config, model)
        assert registry.store.get("big") is None
        registry.max_model_bytes = size
        assert (await registry.import_dir("big", folders[0]))[1] is True

    asyncio.run(main())


class ChurningStore(DirectoryStore):
    """A store whose every version is replaced between reading its manifest and reading its files."""

    def read(self, adapter_id: str, version: str):
        raise NotFoundError(f"Adapter {adapter_id!r} version {version} is no longer stored.")


def test_an_adapter_that_keeps_changing_in_the_store_is_unavailable_for_now_not_missing(
    engine, folders, tmp_path
):
    """A transient state: 503 with Retry-After (try again), not 404 (which says there is no such adapter)."""
    registry = Registry(ChurningStore(tmp_path), engine)

    async def main():
        await Registry(DirectoryStore(tmp_path), engine).import_dir("churn", folders[0])
        with pytest.raises(UnavailableError) as caught:
            await registry.get("churn")
        assert "keeps changing in the store" in caught.value.message and caught.value.retry_after > 0

    asyncio.run(main())
