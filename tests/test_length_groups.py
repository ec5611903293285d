"""Rows sorted by length are split into the runs of least padded cost, each within the token budget."""

from __future__ import annotations

import itertools
import random

import pytest

from loraplex.engine.core import length_groups


def cost(lengths: list[int], sizes: list[int], group_cost: int) -> int:
    total, start = 0, 0
    for size in sizes:
        total += size * lengths[start] + group_cost
        start += size
    return total


def within_budget(lengths: list[int], sizes: list[int], max_tokens: int) -> bool:
    start = 0
    for size in sizes:
        if size > 1 and size * lengths[start] > max_tokens:
            return False
        start += size
    return True


def all_splits(n: int):
    for cuts in itertools.product([False, True], repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        yield sizes + [size]


@pytest.mark.parametrize("seed", range(30))
def test_split_is_the_cheapest_within_budget(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    lengths = sorted((rng.randint(2, 60) for _ in range(n)), reverse=True)
    max_tokens, group_cost = rng.choice([40, 100, 300]), rng.choice([0, 16, 64, 500])
    sizes = length_groups(lengths, max_tokens, group_cost)
    assert sum(sizes) == n and all(size >= 1 for size in sizes)
    assert within_budget(lengths, sizes, max_tokens)
    best = min(cost(lengths, s, group_cost) for s in all_splits(n) if within_budget(lengths, s, max_tokens))
    assert cost(lengths, sizes, group_cost) == best


def test_budget_and_cost_shape_the_split():
    lengths = [50, 48, 47, 10, 9, 9, 8, 8]
    assert length_groups(lengths, None, 0) == [8]  # no budget: one padded pass
    assert length_groups(lengths, 10_000, 64) == [3, 5]  # the long rows and the short rows apart
    free = length_groups(lengths, 10_000, 0)  # groups cost nothing: no padding at all
    assert cost(lengths, free, 0) == sum(lengths)
    assert length_groups([600, 5], 100, 64) == [1, 1]  # a row longer than the budget runs alone
    assert length_groups([], 1024, 64) == []
