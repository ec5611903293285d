"""The Registry without HTTP: slot LRU, host cache, staleness across processes' views, races with puts."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from loraplex.adapters.errors import NotFoundError
from loraplex.adapters.registry import Registry
from loraplex.adapters.store import AdapterRecord, DirectoryStore
from loraplex.engine.core import Engine
from tests.lifecycle_support import TEXTS, AdapterFactory, PeftReference


@pytest.fixture(scope="module")
def engine():
    return Engine(num_slots=2, max_rank=16, max_labels=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    factory = AdapterFactory()
    return [factory.save(root / str(i), seed=600 + i) for i in range(4)]


def run(coro):
    return asyncio.run(coro)


def classify(engine, registry: Registry, handles) -> list[torch.Tensor]:
    ids = engine.tokenize(TEXTS)
    rows = [i for i in ids for _ in handles]
    slots = registry.slots_for([h for _ in ids for h in handles])
    return engine.classify(rows, slots)


def test_slots_lru_never_evicts_what_the_batch_needs(engine, folders, tmp_path):
    registry = Registry(DirectoryStore(tmp_path), engine)

    async def handles():
        for i, folder in enumerate(folders[:3]):
            await registry.import_dir(f"a{i}", folder)
        return [await registry.get(f"a{i}") for i in range(3)]

    a, b, c = run(handles())
    first = registry.slots_for([a, b, a])
    assert first[0] == first[2] != first[1]
    assert (registry.hits, registry.misses, registry.evictions) == (0, 2, 0)
    assert registry.slots_for([b]) == [first[1]]  # a is now the least recently used
    assert registry.slots_for([c, b]) == [first[0], first[1]]  # c takes a's slot, not b's
    assert (registry.hits, registry.misses, registry.evictions) == (2, 3, 1)
    assert registry.is_resident("a2", c.version) and not registry.is_resident("a0", a.version)
    assert registry.resident == 2
    with pytest.raises(ValueError):
        registry.slots_for([a, b, c])
    # Whatever was evicted, each row still gets its own adapter's output.
    reference = PeftReference()
    for handle, folder in ((a, folders[0]), (b, folders[1]), (c, folders[2])):
        out = torch.stack(classify(engine, registry, [handle]))
        torch.testing.assert_close(out, reference.logits(folder, TEXTS), atol=1e-5, rtol=0)


def test_replaced_version_is_evicted_first_and_in_flight_handles_keep_working(engine, folders, tmp_path):
    registry = Registry(DirectoryStore(tmp_path), engine)

    async def setup():
        await registry.import_dir("x", folders[0])
        await registry.import_dir("y", folders[1])
        return await registry.get("x"), await registry.get("y")

    old_x, y = run(setup())
    registry.slots_for([y])
    registry.slots_for([old_x])  # x is the most recently used ...
    run(registry.import_dir("x", folders[2]))  # ... but replaced now
    new_x = run(registry.get("x"))
    assert new_x.version != old_x.version
    slot_of_old = registry.slots_for([old_x])[0]
    assert registry.slots_for([new_x]) == [slot_of_old]  # the retired version made room, y stayed
    assert registry.is_resident("y", y.version)

    run(registry.delete("x"))
    with pytest.raises(NotFoundError):
        run(registry.get("x"))
    # A request that resolved the old handle before the delete still computes with it.
    out = torch.stack(classify(engine, registry, [old_x]))
    torch.testing.assert_close(out, PeftReference().logits(folders[0], TEXTS), atol=1e-5, rtol=0)


def test_cold_gets_share_one_store_load_and_host_cache_is_bounded(engine, folders, tmp_path):
    store = DirectoryStore(tmp_path)
    writer = Registry(store, engine)
    for i, folder in enumerate(folders[:3]):
        run(writer.import_dir(f"c{i}", folder))
    reader = Registry(store, engine, max_host_cache=2)

    async def many_gets():
        handles = await asyncio.gather(*[reader.get("c0") for _ in range(10)])
        assert len({id(h) for h in handles}) == 1
        await reader.get("c1")
        await reader.get("c2")  # pushes c0 out of the host cache
        await reader.get("c0")

    run(many_gets())
    assert reader.store_loads == 4
    assert reader.host_evictions == 2 and reader.host_cached == 2


class GatedStore(DirectoryStore):
    """A directory store whose next manifest read, once armed, stalls after reading until released.

    It also keeps replaced versions readable, as an object store with unique version folders may.
    """

    def __init__(self, root: Path):
        super().__init__(root)
        self.armed = False
        self.stalled = threading.Event()
        self.release = threading.Event()

    def get(self, adapter_id: str) -> AdapterRecord | None:
        record = super().get(adapter_id)
        if self.armed:
            self.armed = False
            self.stalled.set()
            self.release.wait(10)
        return record

    def _drop_unreferenced_versions(self, adapter_id: str, keep: str | None) -> None:
        pass


def test_a_slow_store_read_never_undoes_a_newer_put(engine, folders, tmp_path):
    store = GatedStore(tmp_path)
    registry = Registry(store, engine, staleness_s=0.0)  # every get checks the manifest (in the background)

    async def main():
        first, _ = await registry.import_dir("r", folders[0])
        store.armed = True
        # Served from memory at once; the manifest check reads `first` from the store, then stalls.
        assert (await registry.get("r")).version == first.version
        assert await asyncio.to_thread(store.stalled.wait, 10)
        second, _ = await registry.import_dir("r", folders[1])  # the PUT answers while the read stalls
        store.release.set()
        while ("manifest", "r") in registry._inflight:  # the stalled check ends, and is discarded
            await asyncio.sleep(0.01)
        registry.staleness_s = 60.0  # from here on only what the registry holds counts, not the store
        assert (await registry.get("r")).version == second.version != first.version

    run(main())


async def eventually(call, done, within: float):
    """`await call()` until `done(result)`; fails after `within` s."""
    deadline = time.monotonic() + within
    while not done(result := await call()):
        assert time.monotonic() < deadline, f"still {result} after the staleness bound"
        await asyncio.sleep(0.01)
    return result


def test_other_processes_changes_are_seen_after_the_staleness_bound(engine, folders, tmp_path):
    writer = Registry(DirectoryStore(tmp_path), engine)
    reader = Registry(DirectoryStore(tmp_path), engine, staleness_s=0.3)

    async def main():
        reader.start()  # re-reads the manifests of what it holds every staleness_s / 2
        try:
            v1, _ = await writer.import_dir("s", folders[0])
            assert (await reader.get("s")).version == v1.version
            # Past the bound, the change shows within the time of a few manifest reads on this machine
            # (measured now, so that this holds on a fast or a slow machine alike).
            started = time.monotonic()
            for _ in range(3):
                await asyncio.to_thread(reader.store.get, "s")
            margin = max(0.5, 20 * (time.monotonic() - started) / 3)
            v2, _ = await writer.import_dir("s", folders[1])
            await asyncio.sleep(reader.staleness_s)
            await eventually(lambda: reader.get("s"), lambda handle: handle.version == v2.version, margin)
            await writer.delete("s")
            await asyncio.sleep(reader.staleness_s)
            with pytest.raises(NotFoundError):
                await eventually(lambda: reader.get("s"), lambda handle: False, margin)
        finally:
            await reader.close()

    run(main())
