"""The dynamic batcher: one queue for every client and adapter, one worker thread that runs the engine.

Each input of a request is its own queue entry. The worker forms a batch by taking the oldest entry and
adding the entries closest to it in length (less padding) while the batch stays within
`max_batch_tokens` (padded length x rows), `max_batch_size` rows and `engine.num_slots` distinct
adapters. Only when the worker was idle and the batch is not yet full does it wait up to `max_wait_s`
for more entries. Results go back to each request's future; a request's rows may span several batches.

    job = batcher.submit(token_ids, handle)   # OverloadedError when the queue is full
    await job.future                          # job.logits[i]: the logits of input i
    batcher.cancel(job, "disconnect")         # drops what is still queued (timeouts, gone clients)

A batch that fails is run again split by adapter, so that only the requests of the adapter at fault
fail (`blame`: 409 naming it, or 503 with Retry-After when the server is at fault, e.g. out of memory);
the other adapters' requests get their answers. An adapter is blamed only when the same rows run with a
known-good adapter of its task (the last one whose rows ran): then the LoRA op and that task's head work
and the difference is the adapter. When no such adapter exists, or it fails too, the server is at fault.

The engine is built, warmed up and run on one thread, its `EngineThread`, so that no other thread of the
server runs the engine's parallel work: here, once a second thread that had run it stayed alive, the
engine's own thread ran slower (bench/engine_thread.py).

A cancel costs O(1), whatever the queue's length: it closes the job, whose queued entries are then
skipped (and discarded) when the worker next takes a batch; `depth` counts only the live ones. When
more than half of the queue is skipped entries, the queue is rebuilt once without them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.adapters.errors import ConflictError, LoraplexError, OverloadedError, UnavailableError
from loraplex.metrics import Metrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a request that failed through the server's fault is told to wait


class EngineThread:
    """One daemon thread that runs what it is given, in order: building the engine, warming it up, then the
    batcher's worker loop. A daemon, like the worker always was: a batch still running at exit does not
    hold the process."""

    def __init__(self, name: str = "loraplex-engine"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, fn, args, kwargs))
        return future

    async def run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` on this thread, awaited."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def close(self) -> None:
        """End the thread once the tasks already given are done."""
        self._tasks.put(None)

    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args, kwargs = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)


@dataclass(eq=False)
class Job:
    """One request: its inputs' rows and, once `future` is done, their logits in input order."""

    handle: object  # loraplex.adapters.registry.AdapterHandle: the version every row of this job uses
    future: asyncio.Future
    enqueued_at: float
    logits: list[torch.Tensor | None]  # [num_labels] per input, filled in by the worker
    # Worker-thread bookkeeping; the event loop reads it only after `future` is done.
    remaining: int
    queued: int = 0  # entries still waiting in the queue (under the batcher's lock)
    started_at: float | None = None  # start of the first batch that ran one of its rows
    finished_at: float | None = None
    closed: bool = False  # cancelled or failed: queued rows are gone, late results are ignored

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or self.enqueued_at) - self.enqueued_at

    @property
    def inference_seconds(self) -> float:
        return (self.finished_at or self.enqueued_at) - (self.started_at or self.enqueued_at)


@dataclass(eq=False)
class Entry:
    job: Job
    index: int  # position of this input in its request
    token_ids: list[int]
    taken: bool = False  # in a batch; an entry taken or of a closed job is skipped in the queue

    @property
    def live(self) -> bool:
        return not self.taken and not self.job.closed


class Batcher:
    def __init__(
        self,
        engine,
        registry,
        metrics: Metrics,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_s: float,
        max_queued: int,
        thread: EngineThread | None = None,  # the thread that built the engine; None: a new one
    ):
        self._engine = engine
        self._registry = registry
        self._metrics = metrics
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queued = max_queued
        # Length grouping looks this far past the oldest entry, so no entry waits behind many batches.
        self._scan = 4 * max_batch_size
        self._cond = threading.Condition()
        self._queue: deque[Entry] = deque()  # oldest first; entries that are no longer live are skipped
        self._depth = 0  # live entries in the queue
        self._stopping = False
        self.shutdown_dropped = 0  # queued inputs that a shutdown dropped (the drain's own count)
        self._rows_per_s = 0.0  # moving average of engine throughput, for Retry-After
        # The last adapters whose rows ran (at most one per slot, most recent last), to tell an adapter's
        # fault from ours; their tasks are looked at only when a batch fails.
        self._known_good: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = thread or EngineThread()
        self._worker: concurrent.futures.Future | None = None  # the worker loop, once started

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._thread.submit(self._run)

    async def stop(self, timeout: float = 30.0) -> int:
        """Finish the running batch, fail whatever is still queued, and join the worker. Returns the
        inputs that a shutdown dropped (cancelled by draining workers, or still queued now)."""
        with self._cond:
            self._stopping = True
            dropped = [entry for entry in self._queue if entry.live]
            self._queue = deque()
            self._depth = 0
            for entry in dropped:
                entry.job.queued = 0
            self._cond.notify_all()
        jobs = {entry.job for entry in dropped}
        if dropped:
            self._metrics.dropped.labels("shutdown").inc(len(dropped))
            self.shutdown_dropped += len(dropped)
        for job in jobs:
            job.closed = True
            _fail(job, UnavailableError("The server is shutting down; retry on another replica.", 1))
        if self._worker is not None:
            await asyncio.to_thread(concurrent.futures.wait, [self._worker], timeout)
        self._thread.close()
        return self.shutdown_dropped

    def submit(self, token_ids: list[list[int]], handle) -> Job:
        """Queue one entry per input, all or none; raises OverloadedError past `max_queued`."""
        assert self._loop is not None, "start() first"
        n = len(token_ids)
        job = Job(handle, self._loop.create_future(), time.monotonic(), [None] * n, remaining=n)
        entries = [Entry(job, i, ids) for i, ids in enumerate(token_ids)]
        with self._cond:
            if self._stopping:
                raise UnavailableError("The server is shutting down; retry on another replica.", 1)
            if self._depth + len(entries) > self._max_queued:
                raise OverloadedError(
                    f"The server is overloaded: {self._depth} inputs are queued and the limit is "
                    f"{self._max_queued}. Retry after the time in Retry-After.",
                    self._retry_after(),
                )
            self._queue.extend(entries)
            self._depth += n
            job.queued = n
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """On the event loop: drop the job's queued rows; rows already in a running batch are ignored."""
        dropped = self._drop(job)
        job.future.cancel()
        if dropped:
            self._metrics.dropped.labels(reason).inc(dropped)
            if reason == "shutdown":
                self.shutdown_dropped += dropped

    def _drop(self, job: Job) -> int:
        """Close the job: its queued entries are no longer live (skipped later, not searched for now)."""
        with self._cond:
            job.closed = True
            dropped, job.queued = job.queued, 0
            self._depth -= dropped
            self._prune()
        return dropped

    def _prune(self) -> None:
        """With the lock held: discard skipped entries at the head; rebuild once they are the majority."""
        queue = self._queue
        while queue and not queue[0].live:
            queue.popleft()
        if len(queue) > 2 * self._depth + self._scan:
            self._queue = deque(entry for entry in queue if entry.live)

    def _retry_after(self) -> int:
        if self._rows_per_s <= 0:
            return 1
        return max(1, min(60, math.ceil(self._depth / self._rows_per_s)))

    # ---- worker thread ----

    def _run(self) -> None:
        idle = True
        while True:
            with self._cond:
                while not self._depth:
                    if self._stopping:
                        return
                    idle = True
                    self._cond.wait()
                if idle:
                    self._wait_for_more()
                batch = self._take_batch() if self._depth else []  # all cancelled while waiting
                idle = False
            if batch:
                self._execute(batch)

    def _wait_for_more(self) -> None:
        """With the lock held: give a batch that an idle engine would start half-empty a moment to fill."""
        deadline = time.monotonic() + self._max_wait_s
        while self._depth and not self._stopping and not self._full():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _full(self) -> bool:
        if self._depth >= self._max_batch_size:
            return True
        longest = max(len(entry.token_ids) for entry in self._queue if entry.live)
        return longest * self._depth >= self._max_batch_tokens

    def _take_batch(self) -> list[Entry]:
        """With the lock held: remove and return the next batch."""
        window = []  # the oldest `_scan` live entries
        for entry in self._queue:
            if entry.live:
                window.append(entry)
                if len(window) == self._scan:
                    break
        batch = take_batch(
            window,
            max_batch_tokens=self._max_batch_tokens,
            max_batch_size=self._max_batch_size,
            max_adapters=self._engine.num_slots,
        )
        for entry in batch:
            entry.taken = True
            entry.job.queued -= 1
        self._depth -= len(batch)
        self._prune()
        return batch

    def _execute(self, batch: list[Entry]) -> None:
        """Run one batch; if it fails, run each adapter's rows on their own so that only the cause fails."""
        try:
            self._run_rows(batch)
            return
        except Exception as exc:  # one bad batch fails at most its own requests, never the worker
            failure = exc
        groups: dict[tuple[str, str], list[Entry]] = {}
        for entry in batch:
            groups.setdefault(entry.job.handle.key, []).append(entry)
        failed: list[tuple[list[Entry], Exception]] = []
        if len(groups) == 1:
            failed.append((batch, failure))
        else:
            for group in groups.values():
                try:
                    self._run_rows(group)
                except Exception as exc:
                    failed.append((group, exc))
        shape = batch_shape(batch)
        for group, exc in failed:
            handle = group[0].job.handle
            adapter_at_fault = self._works_with_a_known_good_adapter(handle, group[0].token_ids)
            self._fail_batch(group, blame(exc, handle, adapter_at_fault, shape))

    def _run_rows(self, batch: list[Entry]) -> None:
        start = time.monotonic()
        slots = self._registry.slots_for([entry.job.handle for entry in batch])
        logits = self._engine.classify([entry.token_ids for entry in batch], slots)
        end = time.monotonic()
        self._observe(batch, start, end)
        good = self._known_good
        for handle in {entry.job.handle.key: entry.job.handle for entry in batch}.values():
            good[handle.key] = handle
            good.move_to_end(handle.key)
        while len(good) > self._engine.num_slots:
            good.popitem(last=False)
        done = []
        for entry, row in zip(batch, logits, strict=True):
            job = entry.job
            if job.started_at is None:
                job.started_at = start
            job.logits[entry.index] = row
            job.remaining -= 1
            if job.remaining == 0 and not job.closed:
                job.finished_at = end
                done.append(job)
        if done:
            self._loop.call_soon_threadsafe(_finish, done)

    def _works_with_a_known_good_adapter(self, handle, token_ids: list[int]) -> bool:
        """Whether one of `handle`'s failed rows runs with another adapter of its task that has run: the
        LoRA op and the task's head work, so `handle`'s adapter is what fails. False when there is no such
        adapter (nothing to compare with: the server takes the blame) or when it fails too."""
        if handle.adapter_id is None:
            return False
        task = (handle.task, handle.problem_type)
        good = next(
            (
                g
                for g in reversed(self._known_good.values())
                if g.key != handle.key and (g.task, g.problem_type) == task
            ),
            None,
        )
        if good is None:
            return False
        try:
            self._engine.classify([token_ids], self._registry.slots_for([good]))
        except Exception:
            return False
        return True

    def _observe(self, batch: list[Entry], start: float, end: float) -> None:
        m = self._metrics
        rows = len(batch)
        m.inference_seconds.observe(end - start)
        m.batch_size.observe(rows)
        m.batch_tokens.observe(rows * max(len(entry.token_ids) for entry in batch))
        m.batch_adapters.observe(len({(e.job.handle.adapter_id, e.job.handle.version) for e in batch}))
        for entry in batch:
            m.queue_seconds.observe(start - entry.job.enqueued_at)
        rate = rows / max(end - start, 1e-6)
        self._rows_per_s = rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate

    def _fail_batch(self, batch: list[Entry], exc: Exception) -> None:
        jobs = list({id(entry.job): entry.job for entry in batch}.values())
        dropped = sum(self._drop(job) for job in jobs)
        if dropped:
            self._metrics.dropped.labels("error").inc(dropped)
        self._loop.call_soon_threadsafe(_fail_all, jobs, exc)


def take_batch(
    queue: list[Entry], *, max_batch_tokens: int, max_batch_size: int, max_adapters: int
) -> list[Entry]:
    """The oldest entry plus the entries nearest its length that keep the batch within every limit.

    Limits: rows <= max_batch_size, longest * rows <= max_batch_tokens (an entry longer than the
    budget still runs, alone), distinct (adapter_id, version) <= max_adapters. `queue` is oldest first.
    """
    head_len = len(queue[0].token_ids)
    batch: list[Entry] = []
    adapters: set[tuple[str, str]] = set()
    longest = 0
    for entry in sorted(queue, key=lambda e: abs(len(e.token_ids) - head_len)):  # stable: oldest first
        if len(batch) == max_batch_size:
            break
        key = (entry.job.handle.adapter_id, entry.job.handle.version)
        if key not in adapters and len(adapters) == max_adapters:
            continue
        padded = max(longest, len(entry.token_ids))
        if batch and padded * (len(batch) + 1) > max_batch_tokens:
            continue
        batch.append(entry)
        adapters.add(key)
        longest = padded
    return batch


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error, or the RuntimeError that some backends raise instead."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def batch_shape(batch: list[Entry]) -> str:
    """A failed batch in a log line: rows, padded length, and rows per adapter version."""
    rows: dict[str, int] = {}
    for entry in batch:
        handle = entry.job.handle
        name = f"{handle.adapter_id or '(base model)'}@{handle.version}"
        rows[name] = rows.get(name, 0) + 1
    longest = max(len(entry.token_ids) for entry in batch)
    return f"{len(batch)} rows x {longest} tokens, rows per adapter {rows}"


def blame(exc: Exception, handle, adapter_at_fault: bool, shape: str = "") -> LoraplexError:
    """The error that the requests of `handle`'s failed rows get: never an untyped one (a 500).

    Typed errors pass through; out of memory and any failure not shown to be the adapter's are the
    server's (503 with Retry-After, logged with the batch's shape); a failure of rows that run with a
    known-good adapter of the same task is that adapter's (409 naming it).
    """
    if isinstance(exc, LoraplexError):
        return exc
    if is_out_of_memory(exc):
        log.error("out of memory running adapter %s version %s: %s", handle.adapter_id, handle.version, exc)
        return UnavailableError(
            f"The server ran out of memory computing adapter {handle.adapter_id!r}; retry after the time "
            "in Retry-After, or send fewer or shorter inputs.",
            RETRY_AFTER_S,
        )
    if not adapter_at_fault:
        log.error(
            "server fault: rows of adapter %s version %s failed and no known-good adapter of task %s runs "
            "them either; batch: %s", handle.adapter_id, handle.version, handle.task, shape, exc_info=exc,
        )  # fmt: skip
        return UnavailableError(
            f"The server could not compute this request for adapter {handle.adapter_id!r} "
            f"({type(exc).__name__}); the fault is the server's. Retry after the time in Retry-After or on "
            "another replica.",
            RETRY_AFTER_S,
        )
    log.error(
        "adapter fault: rows of adapter %s version %s failed while a known-good adapter of task %s runs "
        "them; batch: %s", handle.adapter_id, handle.version, handle.task, shape, exc_info=exc,
    )  # fmt: skip
    return ConflictError(
        f"Adapter {handle.adapter_id!r} (version {handle.version}) fails in this server's engine "
        f"({type(exc).__name__}); other adapters are unaffected. Upload a corrected version of it."
    )


def _finish(jobs: list[Job]) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_result(None)


def _fail(job: Job, exc: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def _fail_all(jobs: list[Job], exc: Exception) -> None:
    for job in jobs:
        _fail(job, exc)
