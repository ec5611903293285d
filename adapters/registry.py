"""The registry: which version of each adapter is current, and where its weights are.

Three tiers, fastest first:
  device slots   engine slots 0..num_slots-1, LRU among the slots the running batch does not need
  host cache     validated AdapterWeights in CPU memory, LRU up to `max_host_cache` adapters
  store          the AdapterStore; read (and checked again) off the event loop on a host-cache miss

Event-loop side: `get`, `put`, `delete`, `info`, `list`. Worker-thread side: `slots_for`, the only method
that writes engine slots, called by the batcher's single worker between forward passes, so a slot is never
written while a forward pass reads it.

Consistency: a handle names one (adapter_id, version) and holds that version's weights, so a request keeps
the version it resolved even if the adapter is replaced or deleted while it waits. After `put`/`delete`
returns, `get` on this process sees the new state. Changes made by other processes sharing the store are
seen within `staleness_s` (plus the time the store takes to answer).

The store stays off the hot path: a request whose version is in host memory never waits for the store.
Manifests of cached adapters are re-read in the background (`start`: every staleness_s / 2, on threads
of their own), and a stale one is refreshed in the background while the known version serves. While the
store is down, slow or holds a damaged manifest, the version in memory keeps serving. Only a version not
in memory is read on the request path. The event loop never waits for the engine thread: resident
slots are published as an immutable set, and retirements reach the worker through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import (
    DamagedAdapterError,
    InvalidAdapterError,
    LoraplexError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from loraplex.adapters.peft import AdapterWeights
from loraplex.adapters.store import (
    ADAPTER_ID_RE,
    CONFIG_NAME,
    MODEL_NAME,
    AdapterRecord,
    AdapterStore,
    check_adapter_id,
)
from loraplex.adapters.upload import parse_labels
from loraplex.adapters.validate import load_stored, validate_upload

log = logging.getLogger("loraplex.registry")

Key = tuple[str, str]  # (adapter_id, version)
LoadListener = Callable[[str, float], None]  # (tier: "slot" | "store", seconds)
REFRESH_THREADS = 4  # background manifest reads at once; a slow store holds these, never a request
MIN_REFRESH_INTERVAL_S = 0.1


@dataclass(frozen=True, eq=False)
class AdapterHandle:
    """One version of one adapter, ready to run; immutable, compared by identity."""

    adapter_id: str
    version: str
    labels: tuple[str, ...]
    weights: AdapterWeights

    @property
    def key(self) -> Key:
        return (self.adapter_id, self.version)

    @property
    def task(self) -> str:
        return self.weights.task

    @property
    def problem_type(self) -> str | None:
        return self.weights.problem_type


@dataclass(frozen=True)
class _Known:
    record: AdapterRecord
    checked_at: float  # time.monotonic() when the store last confirmed this record (or we wrote it)


class Registry:
    """Current versions, host cache and device slots of all adapters of one server process."""

    def __init__(
        self,
        store: AdapterStore,
        engine: Any,
        *,
        max_host_cache: int = 256,
        staleness_s: float = 2.0,
        max_rank: int | None = None,
        max_labels: int | None = None,
        max_model_bytes: int | None = None,
    ):
        self.store = store
        self.max_model_bytes = max_model_bytes  # uploads and preloads: the largest adapter_model.safetensors
        self.engine = engine
        self.base = engine.base
        self.num_slots: int = engine.num_slots
        self.max_rank: int = max_rank if max_rank is not None else engine.max_rank
        self.max_labels: int = max_labels if max_labels is not None else engine.max_labels
        if max_host_cache < self.num_slots:
            raise ValueError(
                f"max_host_cache ({max_host_cache}) must be at least the number of engine slots "
                f"({self.num_slots}): a resident adapter dropped from host memory is read from the store "
                "again on every request."
            )
        self.max_host_cache = max_host_cache
        self.staleness_s = staleness_s
        # Event-loop state.
        self._known: dict[str, _Known] = {}
        self._host: OrderedDict[Key, AdapterHandle] = OrderedDict()
        self._generation: dict[str, int] = {}  # bumped by put/delete so that older store reads are discarded
        self._inflight: dict[Hashable, asyncio.Task] = {}
        # Per id while a write or a manifest read of it runs, then pruned: [lock, users] and the id's
        # write generation (bumped by put/delete so that older store reads are discarded).
        self._id_locks: dict[str, list] = {}
        self._reading: dict[str, int] = {}  # manifest reads in flight per id
        self._refresh_pool = ThreadPoolExecutor(REFRESH_THREADS, thread_name_prefix="loraplex-refresh")
        self._refresher: asyncio.Task | None = None
        # Slot state: the worker thread's alone. The event loop reads `_resident_keys` (replaced whole,
        # never changed in place) and sends retirements through `_retirements` (deque: thread-safe ends).
        self._slots: list[Key | None] = [None] * self.num_slots
        self._slot_of: dict[Key, int] = {}
        self._lru: OrderedDict[Key, None] = OrderedDict()  # resident keys, least recently used first
        self._retired: set[Key] = set()  # resident keys that were replaced or deleted: evicted first
        self._resident_keys: frozenset[Key] = frozenset()
        self._retirements: deque[tuple[str, str | None]] = deque()  # (adapter_id, version kept)
        # Counters for metrics.
        self.hits = 0  # distinct adapters of a batch already in a slot
        self.misses = 0  # ... that had to be written into a slot
        self.evictions = 0  # slot writes that displaced another adapter
        self.store_loads = 0  # host-cache misses read from the store
        self.host_evictions = 0
        self.damaged_weights = 0  # stored versions whose weights could not be served
        self.load_listeners: list[LoadListener] = []

    @property
    def damaged(self) -> int:
        """Damaged or foreign store entries met: manifests and labels files (the store's count), weights."""
        return self.store.damaged + self.damaged_weights

    def start(self) -> None:
        """On the event loop: start re-reading cached adapters' manifests in the background."""
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_cached())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        self._refresh_pool.shutdown(wait=False, cancel_futures=True)

    # --- event-loop side ---------------------------------------------------------------------------

    def get_cached(self, adapter_id: str) -> AdapterHandle | None:
        """`get` without waiting: the current version when it is in host memory, else None (then `get`)."""
        known = self._known.get(adapter_id) if isinstance(adapter_id, str) else None
        if known is None:
            _check_known_id(adapter_id)  # a known id was checked when it became known
            return None
        handle = self._host.get((adapter_id, known.record.version))
        if handle is not None:
            if self._age(known) >= self.staleness_s:
                self._refresh_soon(adapter_id)
            self._host.move_to_end(handle.key)
        return handle

    async def get(self, adapter_id: str) -> AdapterHandle:
        """The current version of `adapter_id`, weights in host memory; NotFoundError if there is none.

        A version in host memory is returned at once, even when its manifest is due for a check (that
        check runs in the background); otherwise the manifest and the weights are read from the store.
        """
        for _ in range(4):
            handle = self.get_cached(adapter_id)
            if handle is not None:
                return handle
            known = self._known.get(adapter_id)
            if known is None or self._age(known) >= self.staleness_s:
                await self._once(("manifest", adapter_id), lambda: self._refresh(adapter_id))
                known = self._known.get(adapter_id)
                if known is None:
                    raise NotFoundError(f"There is no adapter named {adapter_id!r}.")
            handle = self._host.get((adapter_id, known.record.version))
            if handle is not None:
                self._host.move_to_end(handle.key)
                return handle
            try:
                return await self._once(
                    ("load", adapter_id, known.record.version), lambda rec=known.record: self._load(rec)
                )
            except NotFoundError:
                # The version was replaced or deleted by another process since we read the manifest.
                if self._known.get(adapter_id) is known:
                    del self._known[adapter_id]
        raise UnavailableError(
            f"Adapter {adapter_id!r} keeps changing in the store; retry after the time in Retry-After.",
            retry_after=1,
        )

    async def put(
        self,
        adapter_id: str,
        config: bytes,
        model: bytes,
        labels: list[str] | None = None,
        *,
        model_filename: str | None = None,
    ) -> tuple[AdapterRecord, bool]:
        """Validate and store a new version, then make it current here. Returns (record, created)."""
        record, created, _ = await self.put_noting(
            adapter_id, config, model, labels, model_filename=model_filename
        )
        return record, created

    async def put_noting(
        self,
        adapter_id: str,
        config: bytes,
        model: bytes,
        labels: list[str] | None = None,
        *,
        model_filename: str | None = None,
    ) -> tuple[AdapterRecord, bool, list[str]]:
        """`put`, and the warnings of an adapter that was accepted but may not be what its owner meant
        (trained on another base, labels never named): (record, created, warnings), each warning logged."""
        check_adapter_id(adapter_id)
        validated = await asyncio.to_thread(
            validate_upload,
            adapter_id,
            config,
            model,
            labels,
            self.base,
            max_rank=self.max_rank,
            max_labels=self.max_labels,
            max_model_bytes=self.max_model_bytes,
            model_filename=model_filename,
        )
        async with self._id_lock(adapter_id):
            record, created = await asyncio.to_thread(self.store.put, validated.record, validated.files)
            self._bump(adapter_id)
            previous = self._known.get(adapter_id)
            self._known[adapter_id] = _Known(record, time.monotonic())
            key = (adapter_id, record.version)
            if key not in self._host:
                self._remember(AdapterHandle(adapter_id, record.version, record.labels, validated.weights))
            if previous is not None and previous.record.version != record.version:
                self._retire(adapter_id, keep=record.version)
        log.info("adapter %s %s version %s", adapter_id, "created as" if created else "now", record.version)
        for warning in validated.warnings:
            log.warning("adapter %s: %s", adapter_id, warning)
        return record, created, list(validated.warnings)

    async def delete(self, adapter_id: str) -> None:
        """Remove `adapter_id` from the store; in-flight requests finish, new ones get NotFoundError."""
        _check_known_id(adapter_id)
        async with self._id_lock(adapter_id):
            existed = await asyncio.to_thread(self.store.delete, adapter_id)
            self._bump(adapter_id)
            self._known.pop(adapter_id, None)
            self._retire(adapter_id, keep=None)
        self._prune(adapter_id)
        if not existed:
            raise NotFoundError(f"There is no adapter named {adapter_id!r}.")
        log.info("adapter %s deleted", adapter_id)

    async def info(self, adapter_id: str) -> AdapterRecord:
        """The store's current record of `adapter_id` (never a cached one); NotFoundError if none."""
        _check_known_id(adapter_id)
        record = await asyncio.to_thread(self.store.get, adapter_id)
        if record is None:
            raise NotFoundError(f"There is no adapter named {adapter_id!r}.")
        return record

    async def list(self) -> list[AdapterRecord]:
        return await asyncio.to_thread(self.store.list)

    async def import_dir(self, adapter_id: str, path: str | Path) -> tuple[AdapterRecord, bool]:
        """Put a PEFT adapter directory (adapter_config.json, adapter_model.safetensors, labels.json)."""
        folder = Path(path)
        missing = [n for n in (CONFIG_NAME, MODEL_NAME) if not (folder / n).is_file()]
        if missing:
            raise InvalidAdapterError(
                f"{folder} has no {missing[0]}; point at a PEFT save_pretrained folder."
            )
        if (
            self.max_model_bytes is not None
            and (size := (folder / MODEL_NAME).stat().st_size) > self.max_model_bytes
        ):
            raise PayloadTooLargeError(
                f"{folder / MODEL_NAME} is {size} bytes, over the limit of {self.max_model_bytes} bytes "
                "(--max-upload-bytes)."
            )
        labels_path = folder / "labels.json"
        labels = parse_labels(labels_path.read_bytes()) if labels_path.is_file() else None
        return await self.put(
            adapter_id, (folder / CONFIG_NAME).read_bytes(), (folder / MODEL_NAME).read_bytes(), labels
        )

    def is_resident(self, adapter_id: str, version: str) -> bool:
        """Whether this version sits in a device slot right now."""
        return (adapter_id, version) in self._resident_keys

    @property
    def resident(self) -> int:
        """Slots holding an adapter's current version; a deleted or replaced version's slot is not counted."""
        known = self._known
        return sum(1 for a, v in self._resident_keys if a in known and known[a].record.version == v)

    @property
    def host_cached(self) -> int:
        return len(self._host)

    # --- worker-thread side ------------------------------------------------------------------------

    def slots_for(self, handles: list[AdapterHandle]) -> list[int]:
        """Make every distinct handle resident and return the slot of each; evicts LRU slots not needed here.

        Runs on the engine's worker thread between forward passes. `handles` must name at most
        `num_slots` distinct (adapter_id, version) pairs (the batcher splits larger batches).
        """
        distinct: dict[Key, AdapterHandle] = {}
        for handle in handles:
            distinct.setdefault(handle.key, handle)
        if len(distinct) > self.num_slots:
            raise ValueError(f"{len(distinct)} distinct adapters in one batch, only {self.num_slots} slots")
        while self._retirements:
            adapter_id, keep = self._retirements.popleft()
            self._retired.update(k for k in self._slot_of if k[0] == adapter_id and k[1] != keep)
            self._retired.discard((adapter_id, keep))  # re-uploaded content: current again
        try:
            for key, handle in distinct.items():
                if key in self._slot_of:
                    self.hits += 1
                    self._lru.move_to_end(key)
                    continue
                self.misses += 1
                slot = self._victim(distinct)
                started = time.perf_counter()
                self.engine.load_slot(slot, handle.weights)  # raises: the slot stays empty, never handed out
                self._slots[slot] = key
                self._slot_of[key] = slot
                self._lru[key] = None
                self._notify("slot", time.perf_counter() - started)
        finally:
            self._resident_keys = frozenset(self._slot_of)
        return [self._slot_of[handle.key] for handle in handles]

    def _victim(self, needed: dict[Key, AdapterHandle]) -> int:
        """A slot to write: an empty one, else a retired adapter's, else the least recently used one."""
        for slot, key in enumerate(self._slots):
            if key is None:
                return slot
        candidates = [k for k in self._lru if k in self._retired and k not in needed]
        candidates += [k for k in self._lru if k not in needed]
        key = candidates[0]
        slot = self._slot_of.pop(key)
        del self._lru[key]
        self._retired.discard(key)
        self._slots[slot] = None
        self.evictions += 1
        return slot

    # --- helpers -----------------------------------------------------------------------------------

    def _age(self, known: _Known) -> float:
        return time.monotonic() - known.checked_at

    def _refresh_soon(self, adapter_id: str) -> None:
        """Check `adapter_id`'s manifest in the background; the version in memory serves meanwhile."""
        if ("manifest", adapter_id) not in self._inflight:
            asyncio.ensure_future(
                self._once(("manifest", adapter_id), lambda: self._refresh_cached_one(adapter_id))
            )

    async def _refresh_cached_one(self, adapter_id: str) -> None:
        try:
            await self._refresh(adapter_id, self._refresh_pool)
        except LoraplexError as exc:  # store down or manifest damaged: what is in memory keeps serving
            known = self._known.get(adapter_id)
            if known is not None:
                self._known[adapter_id] = _Known(known.record, time.monotonic())  # ask again later
            log.warning("kept adapter %s in memory: %s", adapter_id, exc.message)

    async def _refresh_cached(self) -> None:
        """Forever: re-read the manifests of host-cached adapters before they are stale."""
        interval = max(self.staleness_s / 2, MIN_REFRESH_INTERVAL_S)
        while True:
            await asyncio.sleep(interval)
            for adapter_id, known in list(self._known.items()):
                if self._age(known) >= interval and (adapter_id, known.record.version) in self._host:
                    self._refresh_soon(adapter_id)

    async def _refresh(self, adapter_id: str, pool: ThreadPoolExecutor | None = None) -> None:
        self._reading[adapter_id] = self._reading.get(adapter_id, 0) + 1
        try:
            await self._read_manifest(adapter_id, pool)
        finally:
            self._reading[adapter_id] -= 1
            if not self._reading[adapter_id]:
                del self._reading[adapter_id]
            self._prune(adapter_id)

    async def _read_manifest(self, adapter_id: str, pool: ThreadPoolExecutor | None) -> None:
        generation = self._generation.get(adapter_id, 0)
        started = time.monotonic()
        record = await asyncio.get_running_loop().run_in_executor(pool, self.store.get, adapter_id)
        if self._generation.get(adapter_id, 0) != generation:
            return  # a put/delete of this process answered meanwhile; its state is newer than this read
        previous = self._known.get(adapter_id)
        if record is None:
            self._known.pop(adapter_id, None)
            self._retire(adapter_id, keep=None)
            return
        self._known[adapter_id] = _Known(record, started)
        if previous is not None and previous.record.version != record.version:
            self._retire(adapter_id, keep=record.version)

    async def _load(self, record: AdapterRecord) -> AdapterHandle:
        started = time.perf_counter()
        weights = await asyncio.to_thread(self._read_weights, record)
        self.store_loads += 1
        self._notify("store", time.perf_counter() - started)
        handle = AdapterHandle(record.adapter_id, record.version, record.labels, weights)
        self._remember(handle)
        return handle

    def _read_weights(self, record: AdapterRecord) -> AdapterWeights:
        files = self.store.read(record.adapter_id, record.version)
        if files.version() != record.version:  # bit rot, or a writer that changed files in place
            raise self.store.damaged_error(
                record.adapter_id, f"its files do not hash to their version {record.version}"
            )
        try:
            return load_stored(files, self.base, max_rank=self.max_rank, max_labels=self.max_labels)
        except LoraplexError as exc:  # what an upload would get as 4xx: damaged, foreign or beyond limits
            self.damaged_weights += 1
            log.warning(
                "adapter %r version %s is skipped: %s", record.adapter_id, record.version, exc.message
            )
            raise DamagedAdapterError(
                f"Adapter {record.adapter_id!r} version {record.version} in the store cannot be served by "
                f"this server: {exc.message}"
            ) from None

    def _remember(self, handle: AdapterHandle) -> None:
        self._host[handle.key] = handle
        self._host.move_to_end(handle.key)
        while len(self._host) > self.max_host_cache:
            self._host.popitem(last=False)
            self.host_evictions += 1

    def _retire(self, adapter_id: str, keep: str | None) -> None:
        """Forget cached versions of `adapter_id` other than `keep`; resident ones are evicted first."""
        self._retirements.append((adapter_id, keep))  # the worker applies it before its next slot write
        for key in [k for k in self._host if k[0] == adapter_id and k[1] != keep]:
            del self._host[key]

    def _bump(self, adapter_id: str) -> None:
        self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1

    @contextlib.asynccontextmanager
    async def _id_lock(self, adapter_id: str):
        """Writes of one id one at a time; the lock lives while someone holds or waits for it."""
        entry = self._id_locks.setdefault(adapter_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._id_locks[adapter_id]
                self._prune(adapter_id)

    def _prune(self, adapter_id: str) -> None:
        """Forget `adapter_id`'s write generation once nothing can compare with it: the id is not known
        here, and no write or manifest read of it runs (a read that started before a write must still
        see that write's bump)."""
        if (
            adapter_id not in self._known
            and adapter_id not in self._id_locks
            and adapter_id not in self._reading
        ):
            self._generation.pop(adapter_id, None)

    async def _once(self, key: Hashable, make: Callable[[], Awaitable[Any]]) -> Any:
        """Run `make()` once for all concurrent callers with the same key; a cancelled caller leaves it be."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self._inflight[key] = task

            def done(t: asyncio.Task, key: Hashable = key) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled():
                    t.exception()  # retrieved here so that an unawaited failure is not logged as lost

            task.add_done_callback(done)
        return await asyncio.shield(task)

    def _notify(self, tier: str, seconds: float) -> None:
        for listener in self.load_listeners:
            listener(tier, seconds)


def _check_known_id(adapter_id: str) -> None:
    """An id outside the allowlist cannot name a stored adapter: NotFoundError without touching the store."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        raise NotFoundError(f"There is no adapter named {adapter_id!r}.")
