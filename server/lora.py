"""Multi-LoRA ops: each row of a batch adds the low-rank delta of its own slot, in one gathered matmul.

Slot tensors are preallocated and indexed by `idx` (one slot per row). Scaling is folded into `lora_B`
when a slot is written, and zero padding up to the rank of the batch is exact, so the ops below need
neither a scale nor a per-adapter loop.
"""

from __future__ import annotations

import torch


def add_lora(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    lora_A: torch.Tensor,  # [slots, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, r_max], scaling folded in
    idx: torch.Tensor,  # [B] int64, slot of each row
    rank: int,  # largest rank among the slots in idx; 0 means no row has a delta here
) -> torch.Tensor:
    """`y[i] += x[i] @ lora_A[idx[i], :rank].T @ lora_B[idx[i], :, :rank].T` for every row i."""
    if rank == 0:
        return y
    a = lora_A[:, :rank].index_select(0, idx)  # [B, rank, in]
    b = lora_B[:, :, :rank].index_select(0, idx)  # [B, out, rank]
    h = torch.bmm(x, a.transpose(1, 2))  # [B, T, rank]
    return y.baddbmm_(h, b.transpose(1, 2))


def add_lora_qkv(
    y: torch.Tensor,  # [B, T, 3, out], the fused q/k/v projection, updated in place
    x: torch.Tensor,  # [B, T, in]
    lora_A: torch.Tensor,  # [slots, 3, r_max, in]
    lora_B: torch.Tensor,  # [slots, 3, out, r_max], scaling folded in
    idx: torch.Tensor,  # [B] int64
    rank: int,
) -> torch.Tensor:
    """`y[i, :, j] += x[i] @ lora_A[idx[i], j, :rank].T @ lora_B[idx[i], j, :, :rank].T` for j in q, k, v.

    q, k and v read the same input, so their three shrinks run as one matmul of width 3 * rank.
    """
    if rank == 0:
        return y
    batch, tokens, _ = x.shape
    a = lora_A[:, :, :rank].index_select(0, idx).flatten(1, 2)  # [B, 3 * rank, in]
    h = torch.bmm(x, a.transpose(1, 2))  # [B, T, 3 * rank]
    h = h.view(batch, tokens, 3, rank).transpose(1, 2).reshape(batch * 3, tokens, rank)  # [B * 3, T, rank]
    b = lora_B[:, :, :, :rank].index_select(0, idx).flatten(0, 1)  # [B * 3, out, rank]
    delta = torch.bmm(h, b.transpose(1, 2))  # [B * 3, T, out]
    y += delta.view(batch, 3, tokens, -1).transpose(1, 2)
    return y
