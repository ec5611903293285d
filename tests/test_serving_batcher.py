"""How the batcher picks the next batch from its queue: limits, fairness, length grouping."""

from __future__ import annotations

from loraplex.adapters.registry import AdapterHandle
from loraplex.batcher import Entry, Job, take_batch


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
