"""A pass's batch metadata (`LoraBatch`), built on the host from the slot list, and the heads that read it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraplex.engine.heads import Act, Dense, Norm, SlotHead
from loraplex.engine.lora_batch import LoraBatch

SLOTS = 6
RANKS = [8, 4, 0, 16, 2, 0]


def test_segments_distinct_slots_and_the_grouped_layout():
    slots = [3, 3, 1, 0, 0, 0, 1, 5]
    batch = LoraBatch.build(slots, RANKS)
    assert batch.segments == [(0, 2, 3), (2, 3, 1), (3, 6, 0), (6, 7, 1), (7, 8, 5)]
    assert batch.distinct == [3, 1, 0, 5] and batch.rank == 16 and batch.group_len == 3
    assert batch.idx.tolist() == slots
    assert batch.distinct_idx.tolist() == [3, 1, 0, 5]
    assert [batch.distinct[u] for u in batch.inverse.tolist()] == slots
    assert batch.segment_bounds.tolist() == [0, 2, 3, 6, 7, 8]
    assert batch.segment_slots.tolist() == [3, 1, 0, 1, 5]
    # Grouped: [U, group_len] rows, each group its slot's rows (a short one repeats its last row) ...
    grouped = batch.grouped.view(4, 3).tolist()
    assert grouped == [[0, 1, 1], [2, 6, 6], [3, 4, 5], [7, 7, 7]]
    # ... and `ungroup` reads every row back from there.
    assert batch.grouped[batch.ungroup].tolist() == list(range(len(slots)))


def test_layer_ranks_are_the_largest_of_the_rows_adapters_there():
    table = np.zeros((SLOTS, 3), dtype=np.int64)
    table[0] = [8, 0, 0]
    table[1] = [0, 0, 4]
    table[3] = [2, 0, 16]
    assert LoraBatch.build([0, 1], RANKS, rank_table=table).layer_rank == [8, 0, 4]
    assert LoraBatch.build([1, 1, 2], RANKS, rank_table=table).layer_rank == [0, 0, 4]
    assert LoraBatch.build([2, 5], RANKS, rank_table=table).layer_rank == [0, 0, 0]
    batch = LoraBatch.build([3, 0], RANKS, rank_table=table)
    assert batch.layer_rank == [8, 0, 16] and batch.rank == 16


def test_each_task_gets_its_rows_and_their_own_metadata():
    slots = [0, 0, 1, 3, 3, 4]
    tasks = {"SEQ_CLS": [0, 1, 5], "TOKEN_CLS": [2, 3, 4]}
    batch = LoraBatch.build(slots, RANKS, tasks=tasks)
    seq_positions, seq = batch.tasks["SEQ_CLS"]
    tok_positions, tok = batch.tasks["TOKEN_CLS"]
    assert seq_positions.tolist() == [0, 1, 5] and seq.slots == [0, 0, 4] and seq.rank == 8
    assert seq.idx.tolist() == [0, 0, 4] and seq.segments == [(0, 2, 0), (2, 3, 4)]
    assert tok_positions.tolist() == [2, 3, 4] and tok.slots == [1, 3, 3] and tok.rank == 16
    # One task: its rows are all the rows, the batch itself.
    single = LoraBatch.build(slots, RANKS, tasks={"SEQ_CLS": list(range(6))})
    assert single.tasks["SEQ_CLS"] == (None, single)


def _head(stages, hidden, labels, g):
    head = SlotHead(stages, hidden, SLOTS, labels, torch.float64)
    for buffer in head.names.values():
        getattr(head, buffer).copy_(
            torch.randn(getattr(head, buffer).shape, generator=g, dtype=torch.float64)
        )
    return head


def _loop(head: SlotHead, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The slow reference: every row through its own slot's head, one at a time."""
    rows = []
    for row, slot in zip(x, slots, strict=True):
        y = row
        for stage, act in zip(head.stages, head.acts, strict=True):
            get = lambda key, s=slot: getattr(head, head.names[key])[s]  # noqa: E731
            if isinstance(stage, Dense):
                y = F.linear(
                    y, get(f"{stage.path}.weight"), get(f"{stage.path}.bias") if stage.bias else None
                )
            elif isinstance(stage, Norm):
                bias = get(f"{stage.path}.bias") if stage.bias else None
                y = F.layer_norm(y, y.shape[-1:], get(f"{stage.path}.weight"), bias, stage.eps)
            else:
                y = act(y)
        rows.append(y)
    return torch.stack(rows)


STAGES = {
    "dense": (Dense("classifier"),),
    "roberta": (Dense("classifier.dense", 16), Act("tanh"), Dense("classifier.out_proj")),
    "modernbert": (
        Dense("head.dense", 16, bias=False),
        Act("gelu"),
        Norm("head.norm", 1e-5),
        Dense("classifier"),
    ),
}


@pytest.mark.parametrize("layout", list(STAGES))
@pytest.mark.parametrize("slots", [[2, 2, 2, 2], [0, 1, 3, 4], [4, 0, 0, 4, 1, 1, 1], [5, 1, 5, 0, 1]])
@pytest.mark.parametrize("tokens", [None, 3])
def test_the_head_equals_a_loop_over_rows(layout, slots, tokens):
    """Pooled rows and token rows, any order of slots: the grouped head equals each row's own head."""
    g = torch.Generator().manual_seed(len(slots) * 7 + (tokens or 0))
    head = _head(STAGES[layout], 16, 5, g)
    shape = (len(slots), 16) if tokens is None else (len(slots), tokens, 16)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    got = head(x, LoraBatch.build(slots, [0] * SLOTS))
    want = _loop(head, x, slots)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # Every slot's head differs, so a row read from another slot's head would show.
    assert not torch.allclose(got, _loop(head, x, [(s + 1) % SLOTS for s in slots]))


def test_only_the_layers_an_adapter_targets_run_its_lora():
    """In a whole model: a query/value adapter on one layer makes that layer's qkv the only one with a
    rank in the pass; every other linear (and every linear for the empty slot) runs its frozen matmul."""
    from loraplex.engine.core import Engine

    engine = Engine(device="cpu", num_slots=2)
    g = torch.Generator().manual_seed(0)
    linear, _ = engine.model.targets["encoder.layer.1.attention.self.query"]
    for part in (0, 2):  # query and value
        linear.write(
            1, part, torch.randn(4, linear.in_features, generator=g), torch.randn(linear.part_out, 4)
        )
    engine.slot_rank[1] = 4
    batch = engine.model.batch([1, 1, engine.empty_slot], engine.slot_rank)
    assert batch.layer_rank[linear.layer_id] == 4
    assert sum(1 for r in batch.layer_rank if r) == 1
    layers = {module for module, _ in engine.model.targets.values()}
    assert len(batch.layer_rank) == len(layers) > 1
    assert not any(engine.model.batch([engine.empty_slot, 0], engine.slot_rank).layer_rank)
    linear.write(1, 0, None, None)  # cleared parts: the table follows
    linear.write(1, 2, None, None)
    assert not any(engine.model.batch([1], engine.slot_rank).layer_rank)
