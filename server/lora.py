"""The multi-LoRA op: each row of a batch adds the low-rank delta of its own slot, in one gathered matmul.

Slot tensors are preallocated and indexed by `idx` (one slot per row). Scaling is folded into `lora_B`
when a slot is written, and zero padding up to the rank of the batch is exact, so the op needs neither
a scale nor a loop over adapters. Layers that read the same input (query, key, value) are `parts` of
one op: one shrink matmul of width parts * rank and one expand whose `lora_B` is block diagonal.

On the CPU the deltas are bound by memory traffic rather than FLOPs, so the op writes the wide output
once: bias + delta is the starting value of the frozen matmul's accumulator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,  # [B, T, in]
    weight: torch.Tensor,  # [out, in], frozen
    bias: torch.Tensor,  # [out]
    lora_A: torch.Tensor,  # [slots, parts, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, parts, r_max], scaling folded in; part p feeds only its outputs
    idx: torch.Tensor,  # [B] int64, slot of each row
    rank: int,  # largest rank among the slots in idx; 0: no row has a delta
) -> torch.Tensor:
    """Returns `y: [B, T, out]` with, for every row i and slot s = idx[i],

    y[i] = x[i] @ weight.T + bias + sum_p x[i] @ lora_A[s, p, :rank].T @ lora_B[s, :, p, :rank].T
    """
    if rank == 0:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    a = lora_A[:, :, :rank].index_select(0, idx).flatten(1, 2)  # [B, parts * rank, in]
    b = lora_B[:, :, :, :rank].index_select(0, idx).flatten(2, 3)  # [B, out, parts * rank]
    h = torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)  # [B, T, parts * rank]
    y = torch.baddbmm(bias, h, b.transpose(1, 2))  # [B, T, out]: bias + delta
    y.view(-1, out_features).addmm_(x.reshape(-1, in_features), weight.t())
    return y
