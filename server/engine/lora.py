"""The multi-LoRA op: each row of a batch adds the low-rank delta of its own slot, in one gathered matmul.

Slot tensors are preallocated and indexed by `idx` (one slot per row). Scaling is folded into `lora_B`
when a slot is written, and zero padding up to the rank of the batch is exact, so the op needs neither
a scale nor a loop over adapters. Layers that read the same input (query, key, value) are `parts` of
one op: one shrink matmul of width parts * rank and one expand whose `lora_B` is block diagonal.

Two ways to compute the deltas, picked per call by `by_segments`: gathered (each row's A and B copied out
of the slots, then one batched shrink and expand: best when most rows have an adapter of their own), or
by segments (rows that run consecutively on one slot share one plain shrink and expand, q/k/v as three
slices of `lora_B`: best when a few adapters each cover hundreds of tokens). The engine orders the rows
of a group by slot, so that each adapter is one segment. The segments and each layer's rank come from
the pass's `LoraBatch`, built on the host, on every device. On CUDA, with LORAPLEX_TRITON_LORA=1, the
deltas run instead as one fused shrink and one fused expand per layer (`loraplex.engine.lora_triton`).

On the CPU the frozen matmul runs over a weight prepacked once (`pack_weight`): oneDNN's in float32 or
bfloat16, or a dynamic int8 matmul (weights int8 per output channel, activations per token, per call);
the expand adds the delta, in the activations' precision, in place into its output. Elsewhere bias +
delta seeds the accumulator of `addmm`, so the wide output is written once.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.lora_batch import LoraBatch

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

        self.packed: PackedLinear | None = None  # the frozen matmul over a prepacked weight (`pack`)
        # On the host: each slot's rank in each part here (0: its adapter does not target that part).
        self.part_rank = [[0] * self.parts for _ in range(slots)]
        # The same on the device, for the fused kernels: [slots, parts] int32.
        self.register_buffer("part_rank_t", torch.zeros(slots, self.parts, dtype=torch.int32))
        # Set by MultiLoraModel: this layer's column in a table of each slot's largest rank per
        # layer, which `LoraBatch` reads once a pass.
        self.layer_id: int | None = None
        self.rank_table: np.ndarray | None = None

    def forward(self, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """`x [B, T, in]` -> `[B, T, out]`, each row with its slot's delta. The rank is this layer's own
        (`batch.rank_of`): a layer that none of the rows' adapters targets (PEFT's default targets only
        query and value) runs its frozen matmul alone."""
        rank = batch.rank_of(self)
        if self.layer_id is None and rank:  # a layer outside a model: its rows' ranks from its own table
            rank = min(rank, max(max(self.part_rank[slot]) for *_, slot in batch.segments))
        if rank and batch.fused:
            from loraplex.engine import lora_triton

            flat = x.reshape(-1, x.shape[-1])
            y = frozen_linear(flat, self.weight, self.bias, self.packed).view(*x.shape[:-1], -1)
            return lora_triton.add_lora(y, x, self.lora_A, self.lora_B, self.part_rank_t, batch, rank)
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            batch.idx,
            rank,
            self.packed,
            batch.segments,
            self.part_rank,
        )

    def pack(self, int8: bool = False) -> str:
        """Prepack the frozen weight for the CPU matmul (on the final device), in int8 if asked and it
        passes its check; drops the plain copy. Returns the matmul's kind, "plain" where none was packed."""
        self.packed = pack_weight(self.weight, self.bias, int8=int8)
        if self.packed is None:
            return "plain"
        self.weight = None
        return self.packed.kind

    def write(self, slot: int, part: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> None:
        """Put one part's `lora_A [r, in]` and scaled `lora_B [out, r]` in `slot`; None clears the part."""
        rows = slice(part * self.part_out, (part + 1) * self.part_out)
        self.lora_A[slot, part].zero_()
        self.lora_B[slot, rows, part].zero_()
        self.part_rank[slot][part] = 0
        if lora_A is not None:
            r = lora_A.shape[0]
            self.lora_A[slot, part, :r].copy_(lora_A)
            self.lora_B[slot, rows, part, :r].copy_(lora_B)
            self.part_rank[slot][part] = r
        self.part_rank_t[slot, part] = self.part_rank[slot][part]
        if self.rank_table is not None:
            self.rank_table[slot, self.layer_id] = max(self.part_rank[slot])


def lora_linear(
    x: torch.Tensor,  # [B, T, in]
    weight: torch.Tensor | None,  # [out, in], frozen; may be None when `packed` is given
    bias: torch.Tensor | None,  # [out]
    lora_A: torch.Tensor,  # [slots, parts, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, parts, r_max], scaling folded in; part p feeds only its outputs
    idx: torch.Tensor,  # [B] int64, slot of each row
    rank: int,  # largest rank among the slots in idx; 0: no row has a delta
    packed: PackedLinear | None = None,  # the frozen matmul over `weight` prepacked by `pack_weight`
    segments: list[tuple[int, int, int]] | None = None,  # the runs of equal slots (`LoraBatch.segments`)
    part_rank: list[list[int]] | None = None,  # [slot][part] rank here, if known: segments skip 0
) -> torch.Tensor:
    """Returns `y: [B, T, out]` with, for every row i and slot s = idx[i],

    y[i] = x[i] @ weight.T + bias + sum_p x[i] @ lora_A[s, p, :rank].T @ lora_B[s, :, p, :rank].T
    """
    batch, tokens, in_features = x.shape
    out_features = lora_B.shape[1]
    flat = x.reshape(-1, in_features)  # [B * T, in]
    if rank == 0:
        return frozen_linear(flat, weight, bias, packed).view(batch, tokens, out_features)
    if segments is None and idx.device.type == "cpu":  # called alone: read the index here
        segments = slot_segments(idx.tolist())
    if by_segments(segments, tokens):
        y = frozen_linear(flat, weight, bias, packed).view(batch, tokens, out_features)
        return add_segment_deltas(y, x, lora_A, lora_B, segments, rank, part_rank)
    return gathered_lora_linear(x, weight, bias, lora_A, lora_B, idx, rank, packed)


def gathered_lora_linear(
    x: torch.Tensor,  # [B, T, in]
    weight: torch.Tensor | None,  # [out, in]; None when `packed` is given
    bias: torch.Tensor | None,  # [out]
    lora_A: torch.Tensor,  # [slots, parts, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, parts, r_max]
    idx: torch.Tensor,  # [B] int64
    rank: int,  # >= 1
    packed: PackedLinear | None = None,
) -> torch.Tensor:
    """`lora_linear` with each row's A and B gathered from the slots: one batched shrink and one batched
    expand for the whole batch, whatever the number of adapters."""
    batch, tokens, in_features = x.shape
    out_features = lora_B.shape[1]
    flat = x.reshape(-1, in_features)  # [B * T, in]
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


# A segment's own shrink and expand beat the gathered ones when the segments cover this many tokens each
# on average. Measured with bench/lora_ops.py on a group of 13 rows of 40 tokens: with one adapter over
# them, the extra time of MiniLM's q/k/v LoRA over its frozen matmul falls from 73% to 22% (bert-base's:
# 17% to 11%); with two adapters the two are about even; with four or more the gathered op wins.
SEGMENT_MIN_TOKENS = 512


def slot_segments(slots: list[int]) -> list[tuple[int, int, int]]:
    """`(first row, end row, slot)` of each run of equal slots in the host list `slots` (`LoraBatch`
    builds these once a pass; the op never reads a device index back)."""
    segments, start = [], 0
    for row in range(1, len(slots) + 1):
        if row == len(slots) or slots[row] != slots[start]:
            segments.append((start, row, slots[start]))
            start = row
    return segments


def by_segments(segments: list[tuple[int, int, int]] | None, tokens: int) -> bool:
    """Whether the segments are long enough for the segment op to beat the gathered one."""
    if not segments:
        return False
    rows = segments[-1][1]
    return rows * tokens >= SEGMENT_MIN_TOKENS * len(segments)


def add_segment_deltas(
    y: torch.Tensor,  # [B, T, out], the frozen output; the deltas are added in place
    x: torch.Tensor,  # [B, T, in]
    lora_A: torch.Tensor,  # [slots, parts, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, parts, r_max]
    segments: list[tuple[int, int, int]],  # (first row, end row, slot), from `slot_segments`
    rank: int,
    part_rank: list[list[int]] | None = None,  # [slot][part]: its own rank (<= `rank`), 0: no LoRA
) -> torch.Tensor:
    """`y[a:b] += x[a:b] @ lora_A[s, p, :r].T @ lora_B[s, part p's outputs, p, :r].T` for every segment
    and part, r the slot's own rank: each adapter's A and B read once, only the non-zero blocks of
    `lora_B`, and nothing for a part its adapter does not target."""
    parts, in_features = lora_A.shape[1], x.shape[-1]
    part_out = lora_B.shape[1] // parts
    for start, end, slot in segments:
        ranks = [rank] * parts if part_rank is None else part_rank[slot]
        r = min(rank, max(ranks))
        if r == 0:
            continue
        xs = x[start:end].reshape(-1, in_features)  # [n, in]
        ys = y[start:end].view(-1, y.shape[-1])  # [n, out]
        h = xs @ lora_A[slot, :, :r].reshape(-1, in_features).t()  # [n, parts * rank]
        for p in range(parts):
            if not ranks[p]:
                continue
            outputs = slice(p * part_out, (p + 1) * part_out)
            ys[:, outputs].addmm_(h[:, p * r : (p + 1) * r], lora_B[slot, outputs, p, :r].t())
    return y


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, packed: PackedLinear | None
) -> torch.Tensor:
    """`x [N, in] @ weight.T + bias`, by the prepacked matmul when there is one."""
    if packed is not None:
        return packed(x)
    return F.linear(x, weight, bias)


class PackedLinear(Protocol):
    """`x [N, in] -> x @ W.T + b [N, out]` over a weight in a CPU backend's own layout."""

    kind: str  # "onednn" or "int8"

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class OneDnnLinear:
    """oneDNN's matmul over a weight reordered once; float32, or bfloat16 where the CPU has it."""

    kind = "onednn"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight)  # opaque oneDNN layout
        self.bias = bias  # [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class Int8Linear:
    """Dynamic int8: the weight in int8 with one scale per output row, each input row (token) quantized
    with its own scale per call, an int8 x int8 -> int32 matmul, then both scales applied.

    A scale per token rather than per call keeps one token's outliers (BERT's [CLS] and [SEP] carry
    a few very large channels) from flattening every other token's range, and makes each row's answer
    independent of the rows batched with it. The matmul is oneDNN's. On CPUs whose int8 kernels add
    pairs of products in 16 bits, full-range inputs can saturate; `levels` = 63 (7-bit inputs) avoids
    that, and `pack_weight` picks whichever of 127 and 63 measures more accurate.
    """

    kind = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, levels: int):
        self.scale = (weight.abs().amax(1) / 127).clamp_min(1e-12)  # [out]
        quantized = torch.round(weight / self.scale[:, None]).to(torch.int8)  # [out, in]
        self.weight = torch.ops.onednn.qlinear_prepack(quantized, None)  # opaque oneDNN layout
        self.zero = torch.zeros(weight.shape[0], dtype=torch.long)  # symmetric: no zero points
        self.bias = bias  # [out]
        self.levels = levels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        step = (x.abs().amax(1, keepdim=True) / self.levels).clamp_min(1e-12)  # [N, 1]
        quantized = x.div(step).round_().to(torch.int8)  # [N, in]
        # int32 sums times the weight's scales, in float32 (oneDNN applies them), then each token's step
        y = torch.ops.onednn.qlinear_pointwise(
            quantized, 1.0, 0, self.weight, self.scale, self.zero, None, 1.0, 0, torch.float32, "none", [], ""
        ).mul_(step)  # [N, out]
        return y if self.bias is None else y.add_(self.bias)


# How far a packed matmul may be from F.linear on the start-up check (norm of the difference over the
# norm of the output): float32 rounding; bfloat16's 8-bit mantissa (about 4e-3); int8's 7- or 8-bit
# inputs and weights (about 2e-2; a kernel that saturates gives more).
PACK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.int8: 5e-2}


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None, int8: bool = False) -> PackedLinear | None:
    """`weight` prepacked for a CPU matmul (int8 if asked, else oneDNN), or None: use `F.linear`.

    Float32 and bfloat16 CPU weights are packed (bfloat16 only where oneDNN has it for this CPU); `int8`
    quantizes a float32 weight. Each packed matmul is checked once against `F.linear` here, so a build
    whose kernels misbehave or are missing falls back (int8 to oneDNN float32, oneDNN to the plain
    matmul) instead of serving wrong numbers.
    """
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if int8 and weight.dtype == torch.float32:
        packed = _int8_linear(weight, bias)
        if packed is not None:
            return packed
    if not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return _checked(lambda: OneDnnLinear(weight, bias), weight, bias, PACK_TOLERANCE[weight.dtype])


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedLinear | None:
    """The more accurate of the two input ranges on this CPU, if it passes the check."""
    choices = []
    for levels in (127, 63):
        packed = _checked(lambda n=levels: Int8Linear(weight, bias, n), weight, bias, None)
        if packed is not None:
            choices.append((_error(packed, weight, bias), packed))
    if not choices:
        return None
    error, packed = min(choices, key=lambda c: c[0])
    if error > PACK_TOLERANCE[torch.int8]:
        log.warning("int8 matmul is off by %.1e of its output; using float32", error)
        return None
    return packed


def _probe(weight: torch.Tensor) -> torch.Tensor:
    return torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)


def _error(packed: PackedLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """Relative difference from `F.linear` (in float32) on a random input: |got - want| / |want|."""
    x = _probe(weight)
    want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return ((packed(x).float() - want).norm() / want.norm().clamp_min(1e-12)).item()


def _checked(make, weight: torch.Tensor, bias: torch.Tensor | None, tolerance: float | None):
    """`make()` if the build has its ops and, `tolerance` given, it agrees with `F.linear`; else None."""
    try:
        packed = make()
        error = _error(packed, weight, bias)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # a build without these ops
        log.info("prepacked CPU matmul unavailable (%s); falling back", exc)
        return None
    if tolerance is not None and not error <= tolerance:
        log.warning("%s matmul disagrees with the plain matmul (%.1e); falling back", packed.kind, error)
        return None
    return packed
