"""What one forward pass knows about its rows' adapters, computed once on the host and passed to every layer.

The engine already holds the slot of every row on the host. `LoraBatch.build` turns that list into:

- segments: runs of consecutive rows on one slot `(first row, end row, slot)` (the engine orders a group's
  rows by slot, so each adapter is one segment);
- the batch's distinct slots, each row's position among them, and the rows grouped by slot (padded to the
  largest group), which the heads and DeBERTa's shared position projections run over;
- per LoRA layer, the largest rank that any row's adapter has there: a layer no row's adapter targets
  runs its frozen matmul alone;
- the index tensors on the device, from one host-to-device copy for the whole pass (task subsets included).

Nothing in the forward pass reads a device tensor back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(eq=False)
class LoraBatch:
    slots: list[int]  # slot of each row (host)
    rank: int  # largest rank among the rows' adapters; 0: no row has a delta
    segments: list[tuple[int, int, int]]  # (first row, end row, slot): runs of equal slots
    distinct: list[int]  # the distinct slots, in order of first appearance
    layer_rank: list[int] | None  # per `SlotLinear.layer_id`: largest rank of the rows' adapters there
    group_len: int  # rows of the most frequent slot: the grouped layout's rows per slot
    fused: bool = False  # run the LoRA deltas with the fused CUDA kernels (`loraplex.engine.lora_triton`)
    # On the device, filled by `_place`:
    idx: torch.Tensor | None = None  # [B] slot of each row
    distinct_idx: torch.Tensor | None = None  # [U] the distinct slots
    inverse: torch.Tensor | None = None  # [B] row -> its slot's position in `distinct`
    grouped: torch.Tensor | None = None  # [U * group_len] rows grouped by slot (a group's last row repeated)
    ungroup: torch.Tensor | None = None  # [B] row -> its position in the grouped layout
    segment_bounds: torch.Tensor | None = None  # [S + 1] first row of each segment, then B
    segment_slots: torch.Tensor | None = None  # [S] slot of each segment
    positions: torch.Tensor | None = None  # [B] of a task's sub-batch: its rows' positions in the pass
    # task -> (its row positions [n] on the device, or None for all rows; the LoraBatch of those rows)
    tasks: dict[str, tuple[torch.Tensor | None, LoraBatch]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def longest_segment(self) -> int:
        return max(end - start for start, end, _ in self.segments)

    def rank_of(self, linear) -> int:
        """The largest rank of the rows' adapters in `linear` (a SlotLinear); the batch's where unknown."""
        layer = getattr(linear, "layer_id", None)
        if layer is None or self.layer_rank is None:
            return self.rank
        return self.layer_rank[layer]

    @classmethod
    def build(
        cls,
        slots: Sequence[int],
        slot_rank: Sequence[int],  # rank of each slot's adapter
        device: torch.device | str = "cpu",
        rank_table: np.ndarray | None = None,  # [slots, layers]: each slot's largest rank in each layer
        tasks: dict[str, list[int]] | None = None,  # task -> its row positions; None: all rows one task
        fused: bool = False,
    ) -> LoraBatch:
        """The batch of rows on `slots`, its index tensors on `device` (one copy), with a sub-batch per task
        when `tasks` holds more than one."""
        slots = [int(s) for s in slots]
        main = cls._host(slots, slot_rank, rank_table, fused)
        parts: list[tuple[LoraBatch, list[int] | None]] = [(main, None)]
        if tasks and len(tasks) > 1:
            for task, positions in tasks.items():
                sub = cls._host([slots[p] for p in positions], slot_rank, rank_table, fused)
                parts.append((sub, list(positions)))
                main.tasks[task] = (None, sub)  # positions placed below
        elif tasks:
            (task,) = tasks
            main.tasks[task] = (None, main)
        _place(parts, device)
        for (task, _), (sub, _) in zip(main.tasks.items(), parts[1:], strict=False):
            main.tasks[task] = (sub.positions, sub)
        return main

    @classmethod
    def _host(cls, slots: list[int], slot_rank, rank_table, fused: bool) -> LoraBatch:
        segments, start = [], 0
        for row in range(1, len(slots) + 1):
            if row == len(slots) or slots[row] != slots[start]:
                segments.append((start, row, slots[start]))
                start = row
        distinct = list(dict.fromkeys(slots))
        rank = max((slot_rank[s] for s in distinct), default=0)
        layer_rank = None
        if rank_table is not None:
            layer_rank = rank_table[distinct].max(axis=0).tolist() if distinct else []
        counts: dict[int, int] = {}
        for s in slots:
            counts[s] = counts.get(s, 0) + 1
        return cls(
            slots=slots,
            rank=int(rank),
            segments=segments,
            distinct=distinct,
            layer_rank=layer_rank,
            group_len=max(counts.values(), default=0),
            fused=fused,
        )


def _place(parts: list[tuple[LoraBatch, list[int] | None]], device) -> None:
    """Every part's index tensors, laid end to end in one host tensor and copied to `device` once."""
    pieces: list[list[int]] = []
    for batch, positions in parts:
        position = {s: u for u, s in enumerate(batch.distinct)}
        inverse = [position[s] for s in batch.slots]
        members: list[list[int]] = [[] for _ in batch.distinct]
        ungroup = [0] * batch.rows
        for row, u in enumerate(inverse):
            ungroup[row] = u * batch.group_len + len(members[u])
            members[u].append(row)
        grouped = [m[min(k, len(m) - 1)] for m in members for k in range(batch.group_len)]
        bounds = [start for start, _, _ in batch.segments] + [batch.rows]
        fields = [
            batch.slots,
            batch.distinct,
            inverse,
            grouped,
            ungroup,
            bounds,
            [slot for *_, slot in batch.segments],
            positions or [],
        ]
        pieces.append(fields)
    flat = [v for fields in pieces for piece in fields for v in piece]
    host = torch.tensor(flat, dtype=torch.long)
    placed = host.to(device, non_blocking=True) if torch.device(device).type != "cpu" else host
    offset = 0
    for (batch, positions), fields in zip(parts, pieces, strict=True):
        views = []
        for piece in fields:
            views.append(placed[offset : offset + len(piece)])
            offset += len(piece)
        (
            batch.idx,
            batch.distinct_idx,
            batch.inverse,
            batch.grouped,
            batch.ungroup,
            batch.segment_bounds,
            batch.segment_slots,
            batch.positions,
        ) = views
        if positions is None:
            batch.positions = None
