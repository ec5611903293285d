"""How the batcher picks the next batch from its queue (limits, fairness, length grouping) and cancels."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from loraplex.adapters.errors import OverloadedError, UnavailableError
from loraplex.adapters.registry import AdapterHandle
from loraplex.engine.batcher import Batcher, EngineThread, Entry, Job, take_batch
from loraplex.metrics import Metrics


def queue(*rows: tuple[str, int]) -> list[Entry]:
    """Entries oldest first, one per (adapter_id, token count)."""
    entries = []
    for i, (adapter_id, length) in enumerate(rows):
        handle = AdapterHandle(adapter_id, "v1", ("a", "b"), weights=None)
        job = Job(handle, future=None, enqueued_at=float(i), logits=[None], remaining=1)
        entries.append(Entry(job, 0, list(range(length))))
    return entries


def lengths(batch: list[Entry]) -> list[int]:
    return [len(entry.token_ids) for entry in batch]


def pick(entries, tokens=10_000, rows=64, adapters=16) -> list[Entry]:
    return take_batch(entries, max_batch_tokens=tokens, max_batch_size=rows, max_adapters=adapters)


def test_everything_fits_in_one_batch():
    entries = queue(("a", 10), ("b", 20), ("a", 15))
    assert pick(entries) == entries[:1] + [entries[2], entries[1]]  # oldest first, then nearest in length


def test_row_cap():
    entries = queue(*[("a", 8)] * 10)
    assert pick(entries, rows=4) == entries[:4]  # equal lengths: the oldest go first


def test_token_budget_counts_padded_length_times_rows():
    entries = queue(("a", 10), ("a", 40), ("a", 10), ("a", 10))
    batch = pick(entries, tokens=40)
    assert lengths(batch) == [10, 10, 10]  # 40 x 4 rows would be 160 tokens
    assert max(lengths(batch)) * len(batch) <= 40


def test_an_input_longer_than_the_budget_still_runs_alone():
    entries = queue(("a", 512), ("a", 10))
    assert pick(entries, tokens=256) == entries[:1]


def test_oldest_entry_always_goes_first_even_if_long():
    entries = queue(("a", 300), *[("a", 10)] * 20)
    batch = pick(entries, tokens=1000)
    assert batch[0] is entries[0]
    assert len(batch) == 3  # 300 x 3 = 900 within the budget; a fourth row would make it 1200


def test_similar_lengths_are_grouped_to_cut_padding():
    entries = queue(("a", 10), ("a", 300), ("a", 12), ("a", 290), ("a", 9), ("a", 11))
    first = pick(entries, tokens=100)
    assert sorted(lengths(first)) == [9, 10, 11, 12]
    rest = [e for e in entries if e not in first]
    assert lengths(pick(rest, tokens=600)) == [300, 290]


def test_never_more_distinct_adapters_than_slots():
    entries = queue(("a", 5), ("b", 5), ("c", 5), ("a", 5), ("d", 5), ("b", 5))
    batch = pick(entries, adapters=2)
    assert [e.job.handle.adapter_id for e in batch] == ["a", "b", "a", "b"]


def test_versions_of_one_adapter_count_as_distinct():
    entries = queue(("a", 5), ("a", 5))
    entries[1].job.handle = AdapterHandle("a", "v2", ("a", "b"), weights=None)
    assert pick(entries, adapters=1) == entries[:1]


# ---- the live queue: cancels, depth, and what reaches the engine ----


class GatedEngine:
    """Stands in for the engine in the batcher's worker: records each batch, holds it until released."""

    num_slots = 4

    def __init__(self):
        self.batches: list[list[list[int]]] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()
        self.built_on = threading.get_ident()
        self.threads: set[int] = set()  # the threads that ran its batches

    def classify(self, token_ids, slots):
        self.threads.add(threading.get_ident())
        self.batches.append(token_ids)
        self.entered.release()
        assert self.gate.wait(30)
        return [torch.zeros(2) for _ in token_ids]


class OneSlotRegistry:
    def slots_for(self, handles):
        return [0] * len(handles)


def run_batcher(scenario, *, max_batch_size=2, max_queued=100_000):
    """Run `scenario(batcher, engine)` on an event loop with a started batcher; returns its result."""
    engine = GatedEngine()
    metrics = Metrics()

    async def main():
        batcher = Batcher(
            engine, OneSlotRegistry(), metrics, max_batch_tokens=10_000, max_batch_size=max_batch_size,
            max_wait_s=0, max_queued=max_queued,
        )  # fmt: skip
        batcher.start()
        try:
            return await scenario(batcher, engine, metrics)
        finally:
            engine.gate.set()
            await batcher.stop()

    return asyncio.run(main())


HANDLE = AdapterHandle("a", "v1", ("x", "y"), weights=None)


def dropped(metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("loraplex_dropped_inputs_total", {"reason": reason}) or 0.0


def test_cancelled_rows_never_reach_the_engine_and_depth_counts_live_rows():
    async def scenario(batcher, engine, metrics):
        first = batcher.submit([[1], [1]], HANDLE)  # the engine holds this batch
        assert await asyncio.to_thread(engine.entered.acquire, True, 30)
        jobs = [batcher.submit([[100 + i]] * 3, HANDLE) for i in range(10)]
        assert batcher.depth == 30
        for job in jobs[::2]:
            batcher.cancel(job, "disconnect")
        assert batcher.depth == 15
        assert dropped(metrics, "disconnect") == 15
        batcher.cancel(jobs[1], "timeout")
        batcher.cancel(jobs[1], "timeout")  # twice: counted once
        assert batcher.depth == 12 and dropped(metrics, "timeout") == 3
        engine.gate.set()
        await asyncio.wait_for(asyncio.gather(first.future, *(j.future for j in jobs[3::2])), 30)
        assert batcher.depth == 0
        ran = [row[0] for batch in engine.batches[1:] for row in batch]
        assert ran == [100 + i for i in (3, 5, 7, 9) for _ in range(3)]  # the live rows, oldest first
        for job in jobs[3::2]:
            assert len(job.logits) == 3 and all(row is not None for row in job.logits)

    run_batcher(scenario)


def test_a_cancel_does_not_walk_the_queue_and_skipped_rows_do_not_pile_up():
    async def scenario(batcher, engine, metrics):
        batcher.submit([[1], [1]], HANDLE)
        assert await asyncio.to_thread(engine.entered.acquire, True, 30)
        jobs = [batcher.submit([[7]], HANDLE) for _ in range(20_000)]
        queue = batcher._queue
        batcher.cancel(jobs[10_000], "disconnect")  # in the middle: closed, not searched for
        assert batcher._queue is queue and len(queue) == 20_000 and batcher.depth == 19_999
        for job in jobs[:15_000]:
            batcher.cancel(job, "disconnect")
        assert batcher.depth == 5_000
        assert len(batcher._queue) <= 2 * batcher.depth + 8  # skipped entries went away as they piled up
        for job in jobs[15_000:]:
            batcher.cancel(job, "timeout")
        assert batcher.depth == 0 and len(batcher._queue) == 0
        assert dropped(metrics, "disconnect") + dropped(metrics, "timeout") == 20_000
        # Admission counts live rows only: the queue takes a full load again.
        batcher._max_queued = 100
        assert batcher.submit([[3]] * 100, HANDLE).remaining == 100

    run_batcher(scenario)


def test_a_full_queue_with_cancelled_rows_admits_again():
    async def scenario(batcher, engine, metrics):
        batcher.submit([[1], [1]], HANDLE)
        assert await asyncio.to_thread(engine.entered.acquire, True, 30)
        job = batcher.submit([[5]] * 8, HANDLE)
        with pytest.raises(OverloadedError):
            batcher.submit([[5]], HANDLE)
        batcher.cancel(job, "disconnect")
        again = batcher.submit([[6]] * 8, HANDLE)
        engine.gate.set()
        await asyncio.wait_for(again.future, 30)
        assert [row[0] for batch in engine.batches[1:] for row in batch] == [6] * 8

    run_batcher(scenario, max_queued=8)


def test_stop_fails_only_the_rows_still_live():
    async def scenario(batcher, engine, metrics):
        batcher.submit([[1], [1]], HANDLE)
        assert await asyncio.to_thread(engine.entered.acquire, True, 30)
        kept, gone = batcher.submit([[2]] * 3, HANDLE), batcher.submit([[3]] * 4, HANDLE)
        batcher.cancel(gone, "disconnect")
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0)  # stop() drops the queue before it waits for the held batch
        assert dropped(metrics, "shutdown") == 3 and batcher.depth == 0
        with pytest.raises(UnavailableError):
            kept.future.result()
        engine.gate.set()
        await stopping

    run_batcher(scenario)


def test_the_batcher_runs_the_engine_on_the_thread_it_is_given():
    """As the app does: the engine built on an EngineThread, then the batcher's worker on the same one."""
    thread = EngineThread()
    engine = thread.submit(GatedEngine).result(timeout=30)
    engine.gate.set()

    async def main():
        batcher = Batcher(
            engine, OneSlotRegistry(), Metrics(), max_batch_tokens=10_000, max_batch_size=2,
            max_wait_s=0, max_queued=100, thread=thread,
        )  # fmt: skip
        batcher.start()
        try:
            await batcher.submit([[1, 2]], HANDLE).future
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert engine.threads == {engine.built_on}


def test_engine_thread_runs_tasks_in_order_and_hands_back_errors():
    thread = EngineThread()
    seen = []
    first = thread.submit(seen.append, 1)
    failing = thread.submit(int, "not a number")
    last = thread.submit(threading.get_ident)
    assert first.result(timeout=30) is None and seen == [1]
    with pytest.raises(ValueError):
        failing.result(timeout=30)
    ident = last.result(timeout=30)
    assert ident != threading.get_ident()
    assert asyncio.run(thread.run(threading.get_ident)) == ident  # one thread for every task
    thread.close()
    assert thread.submit(int, "1").done() is False  # nothing runs after close
