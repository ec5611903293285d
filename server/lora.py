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
from torch import nn

log = logging.getLogger(__name__)


class SlotLinear(nn.Module):
    """Frozen linear layers that read one input, fused into one matmul, plus `slots` LoRA deltas.

    `parts` linears of equal shape (query, key and value; or a single one) are concatenated along the
    output; each part's LoRA sits in its own block of a block-diagonal `lora_B`, so one gathered shrink
    and one gathered expand serve them all. Every encoder family builds its LoRA-capable linears from this.
    """

    def __init__(self, linears: list[nn.Linear], slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.parts = len(linears)
        self.part_out, self.in_features = linears[0].weight.shape
        weight = torch.cat([lin.weight.detach() for lin in linears]).to(dtype)  # [parts * out, in]
        self.weight = nn.Parameter(weight, requires_grad=False)
        if linears[0].bias is not None:
            bias = torch.cat([lin.bias.detach() for lin in linears]).to(dtype)  # [parts * out]
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.bias = None
        # [slots, parts, r_max, in] and [slots, parts * out, parts, r_max]
        self.register_buffer("lora_A", torch.zeros(slots, self.parts, r_max, self.in_features, dtype=dtype))
        self.register_buffer("lora_B", torch.zeros(slots, weight.shape[0], self.parts, r_max, dtype=dtype))

        self.packed: torch.Tensor | None = None  # the weight prepacked for the CPU matmul (`pack`)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, idx, rank, self.packed)

    def pack(self) -> bool:
        """Prepack the frozen weight for the CPU matmul (on the final device); drops the plain copy."""
        self.packed = pack_weight(self.weight, self.bias)
        if self.packed is not None:
            self.weight = None
        return self.packed is not None

    def write(self, slot: int, part: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> None:
        """Put one part's `lora_A [r, in]` and scaled `lora_B [out, r]` in `slot`; None clears the part."""
        rows = slice(part * self.part_out, (part + 1) * self.part_out)
        self.lora_A[slot, part].zero_()
        self.lora_B[slot, rows, part].zero_()
        if lora_A is not None:
            r = lora_A.shape[0]
            self.lora_A[slot, part, :r].copy_(lora_A)
            self.lora_B[slot, rows, part, :r].copy_(lora_B)


def lora_linear(
    x: torch.Tensor,  # [B, T, in]
    weight: torch.Tensor | None,  # [out, in], frozen; may be None when `packed` is given
    bias: torch.Tensor | None,  # [out]
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
    # [B, T, out]: bias + delta
    y = h @ b.transpose(1, 2) if bias is None else torch.baddbmm(bias, h, b.transpose(1, 2))
    y.view(-1, out_features).addmm_(flat, weight.t())
    return y


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """`x [N, in] @ weight.T + bias`, by oneDNN over the prepacked weight when there is one."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
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
