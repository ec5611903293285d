"""The multi-LoRA op: each row of a batch adds the low-rank delta of its own slot, in one gathered matmul.

Slot tensors are preallocated and indexed by `idx` (one slot per row). Scaling is folded into `lora_B`
when a slot is written, and zero padding up to the rank of the batch is exact, so the op needs neither
a scale nor a loop over adapters. Layers that read the same input (query, key, value) are `parts` of
one op: one shrink matmul of width parts * rank and one expand whose `lora_B` is block diagonal.

On the CPU the frozen matmul is oneDNN's over a weight prepacked once (`pack_weight`), and the expand
adds the delta in place into its output. Elsewhere bias + delta seeds the accumulator of `addmm`, so
the wide output is written once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def lora_linear(
    x: torch.Tensor,  # [B, T, in]
    weight: torch.Tensor | None,  # [out, in], frozen; may be None when `packed` is given
    bias: torch.Tensor,  # [out]
    lora_A: torch.Tensor,  # [slots, parts, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, parts, r_max], scaling folded in; part p feeds only its outputs
    idx: torch.Tensor,  # [B] int64, slot of each row
    rank: int,  # largest rank among the slots in idx; 0: no row has a delta
    packed: torch.Tensor | None = None,  # `weight` prepacked by `pack_weight`
) -> torch.Tensor:
    """Returns `y: [B, T, out]` with, for every row i and slot s = idx[i],

    y[i] = x[i] @ weight.T + bias + sum_p x[i] @ lora_A[s, p, :rank].T @ lora_B[s, :, p, :rank].T
    """
    batch, tokens, in_features = x.shape
    out_features = lora_B.shape[1]
    flat = x.reshape(-1, in_features)  # [B * T, in]
    if rank == 0:
        return frozen_linear(flat, weight, bias, packed).view(batch, tokens, out_features)
    a = lora_A[:, :, :rank].index_select(0, idx).flatten(1, 2)  # [B, parts * rank, in]
    b = lora_B[:, :, :, :rank].index_select(0, idx).flatten(2, 3)  # [B, out, parts * rank]
    h = torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)  # [B, T, parts * rank]
    if packed is not None:
        y = frozen_linear(flat, weight, bias, packed).view(batch, tokens, out_features)
        return y.baddbmm_(h, b.transpose(1, 2))  # the expand adds the delta in place
    y = torch.baddbmm(bias, h, b.transpose(1, 2))  # [B, T, out]: bias + delta
    y.view(-1, out_features).addmm_(flat, weight.t())
    return y


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor, packed: torch.Tensor | None
) -> torch.Tensor:
    """`x [N, in] @ weight.T + bias`, by oneDNN over the prepacked weight when there is one."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """`weight` reordered for oneDNN's CPU matmul, or None where that matmul is not available.

    Only fp32 CPU weights are packed. The packed matmul is checked once against `F.linear` here, so a
    build whose oneDNN misbehaves falls back to the plain path instead of serving wrong numbers.
    """
    on_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
    if not on_cpu or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        got = frozen_linear(x, None, bias, packed)
    except (RuntimeError, AttributeError) as exc:  # a build without these ops
        log.info("oneDNN matmul unavailable (%s); using the plain CPU matmul", exc)
        return None
    if not torch.allclose(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4):
        log.warning("oneDNN matmul disagrees with the plain matmul; using the plain CPU matmul")
        return None
    return packed
