"""Multi-LoRA ops: each row of a batch adds the low-rank delta of its own slot, in one gathered matmul.

Slot tensors are preallocated and indexed by `idx` (one slot per row). Scaling is folded into `lora_B`
when a slot is written, and zero padding up to the rank of the batch is exact, so the ops below need
neither a scale nor a loop over adapters. On the CPU the deltas are bound by memory traffic, not
FLOPs, so each op touches the wide output once: the delta is the starting value of the base matmul's
accumulator (`lora_linear`) or is accumulated in place into strided views (`add_lora_qkv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,  # [B, T, in]
    weight: torch.Tensor,  # [out, in], frozen
    bias: torch.Tensor,  # [out]
    lora_A: torch.Tensor,  # [slots, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, r_max], scaling folded in
    idx: torch.Tensor,  # [B] int64, slot of each row
    rank: int,  # largest rank among the slots in idx; 0: no row has a delta
) -> torch.Tensor:
    """`y[i] = x[i] @ weight.T + bias + x[i] @ lora_A[idx[i], :rank].T @ lora_B[idx[i], :, :rank].T`."""
    if rank == 0:
        return F.linear(x, weight, bias)
    a = lora_A[:, :rank].index_select(0, idx)  # [B, rank, in]
    b = lora_B[:, :, :rank].index_select(0, idx)  # [B, out, rank]
    h = torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)  # [B, T, rank]
    y = torch.baddbmm(bias, h, b.transpose(1, 2))  # [B, T, out]: bias + delta
    y.view(-1, weight.shape[0]).addmm_(x.reshape(-1, weight.shape[1]), weight.t())
    return y


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
    a = lora_A[:, :, :rank].index_select(0, idx).flatten(1, 2)  # [B, 3 * rank, in]
    h = torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)  # [B, T, 3 * rank]
    b = lora_B[:, :, :, :rank].index_select(0, idx)  # [B, 3, out, rank]
    for j in range(3):  # q, k, v: three matmuls, not a loop over adapters
        y[:, :, j].baddbmm_(h[:, :, j * rank : (j + 1) * rank], b[:, j].transpose(1, 2))
    return y
