"""Fused multi-LoRA kernels for CUDA, in Triton: one shrink and one expand launch per LoRA layer.

    y = frozen_linear(x)                                           # [N, out], N = B * T tokens
    add_lora(y, x, lora_A, lora_B, part_rank, batch, rank)         # y += each row's own delta, in place

For every segment of the batch (rows that run consecutively on one slot, `LoraBatch.segments`) and every
part of the layer (query, key and value are parts of one layer):

    shrink:  h[t, p, :r] = x[t] @ lora_A[s, p, :r].T             r = part_rank[s, p], the adapter's own rank
    expand:  y[t, part p's outputs] += h[t, p, :r] @ lora_B[s, part p's outputs, p, :r].T

`lora_A` and `lora_B` are read in place from the slot tensors, by the segment's slot: no per-row copies,
and the expand reads only part p's block of `lora_B` (never the zero blocks of the other parts). A part
whose adapter has no LoRA there (rank 0) is skipped by its programs. Sums are in float32; `h` is kept in
float32 and rounded to the weights' dtype for the expand, as the unfused op does.

The grids are sized on the host from the batch's metadata (number of segments, longest segment), so a
launch never waits for the device. Each program covers BLOCK_M tokens of one segment; programs past the
end of a shorter segment return at once.

Off unless LORAPLEX_TRITON_LORA=1 on a CUDA device (`loraplex.engine.core.fused_lora_enabled`). The tests
run these kernels in Triton's interpreter on the CPU against a per-row loop (tests/test_lora_triton.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from loraplex.engine.lora_batch import LoraBatch

BLOCK_M = 32  # tokens per program
BLOCK_K = 64  # input features per step of the shrink
BLOCK_N = 64  # outputs per program of the expand


@triton.jit
def _shrink_kernel(
    x_ptr,  # [N, in]
    a_ptr,  # [slots, parts, r_max, in]
    h_ptr,  # [N, parts, BLOCK_R] float32
    rank_ptr,  # [slots, parts] int32
    bounds_ptr,  # [S + 1] first row of each segment, then the number of rows
    seg_slot_ptr,  # [S]
    tokens_per_row,
    in_features,
    stride_xn,
    stride_xk,
    stride_as,
    stride_ap,
    stride_ar,
    stride_ak,
    stride_hn,
    stride_hp,
    stride_hr,
    stride_rs,
    stride_rp,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    seg = tl.program_id(1)
    part = tl.program_id(2)
    start = tl.load(bounds_ptr + seg).to(tl.int64) * tokens_per_row
    end = tl.load(bounds_ptr + seg + 1).to(tl.int64) * tokens_per_row
    first = start + block * BLOCK_M
    if first >= end:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rs + part * stride_rp)
    if rank == 0:
        return
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows_ok = offs_m[:, None] < end
    ranks_ok = offs_r[:, None] < rank
    a_base = a_ptr + slot * stride_as + part * stride_ap
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        cols = k0 + offs_k
        cols_ok = cols[None, :] < in_features
        xb = tl.load(
            x_ptr + offs_m[:, None] * stride_xn + cols[None, :] * stride_xk, mask=rows_ok & cols_ok, other=0.0
        )
        ab = tl.load(
            a_base + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
            mask=ranks_ok & cols_ok,
            other=0.0,
        )
        if UPCAST:
            xb, ab = xb.to(tl.float32), ab.to(tl.float32)
        acc += tl.dot(xb, tl.trans(ab), input_precision=PRECISION)
    h = h_ptr + offs_m[:, None] * stride_hn + part * stride_hp + offs_r[None, :] * stride_hr
    tl.store(h, acc, mask=rows_ok)


@triton.jit
def _expand_kernel(
    h_ptr,  # [N, parts, BLOCK_R] float32
    b_ptr,  # [slots, parts * part_out, parts, r_max]
    y_ptr,  # [N, parts * part_out], updated in place
    rank_ptr,  # [slots, parts] int32
    bounds_ptr,
    seg_slot_ptr,
    tokens_per_row,
    part_out,
    parts,
    stride_hn,
    stride_hp,
    stride_hr,
    stride_bs,
    stride_bo,
    stride_bp,
    stride_br,
    stride_yn,
    stride_yo,
    stride_rs,
    stride_rp,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    block = tl.program_id(0)
    seg = tl.program_id(1) // parts
    part = tl.program_id(1) % parts
    block_n = tl.program_id(2)
    start = tl.load(bounds_ptr + seg).to(tl.int64) * tokens_per_row
    end = tl.load(bounds_ptr + seg + 1).to(tl.int64) * tokens_per_row
    first = start + block * BLOCK_M
    if first >= end:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rs + part * stride_rp)
    if rank == 0:
        return
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows_ok = offs_m[:, None] < end
    outs_ok = offs_n < part_out
    ranks_ok = offs_r[None, :] < rank
    hb = tl.load(
        h_ptr + offs_m[:, None] * stride_hn + part * stride_hp + offs_r[None, :] * stride_hr,
        mask=rows_ok & ranks_ok,
        other=0.0,
    )
    outputs = part * part_out + offs_n  # this part's block of the layer's outputs
    bb = tl.load(
        b_ptr
        + slot * stride_bs
        + outputs[:, None] * stride_bo
        + part * stride_bp
        + offs_r[None, :] * stride_br,
        mask=outs_ok[:, None] & ranks_ok,
        other=0.0,
    )
    hb = hb.to(bb.dtype)
    if UPCAST:
        hb, bb = hb.to(tl.float32), bb.to(tl.float32)
    delta = tl.dot(hb, tl.trans(bb), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] float32
    y = y_ptr + offs_m[:, None] * stride_yn + outputs[None, :] * stride_yo
    mask = rows_ok & outs_ok[None, :]
    current = tl.load(y, mask=mask, other=0.0)
    tl.store(y, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


def rank_block(rank: int) -> int:
    """The rank dimension of the kernels' tiles: a power of two, at least 16 (the smallest `tl.dot`)."""
    return max(16, triton.next_power_of_2(rank))


def add_lora(
    y: torch.Tensor,  # [B, T, out], the frozen output; the deltas are added in place
    x: torch.Tensor,  # [B, T, in]
    lora_A: torch.Tensor,  # [slots, parts, r_max, in]
    lora_B: torch.Tensor,  # [slots, out, parts, r_max], part p feeding only its own outputs
    part_rank: torch.Tensor,  # [slots, parts] int32 on the device: each slot's rank in each part
    batch: LoraBatch,  # segments and their index tensors, on the device
    rank: int,  # the largest rank of the batch's adapters in this layer (>= 1)
) -> torch.Tensor:
    """`y[t] += sum_p x[t] @ lora_A[s, p, :r].T @ lora_B[s, p's outputs, p, :r].T` for every token t of
    every segment, s its slot and r = part_rank[s, p]; two launches."""
    rows, tokens, in_features = x.shape
    parts = lora_A.shape[1]
    out_features = lora_B.shape[1]
    part_out = out_features // parts
    flat_x = x.reshape(rows * tokens, in_features)
    flat_y = y.view(rows * tokens, out_features)
    block_r = rank_block(rank)
    h = torch.empty(rows * tokens, parts, block_r, device=x.device, dtype=torch.float32)
    # float32: exact float32 products, as torch's matmul gives by default; 16-bit inputs: the default.
    precision = "ieee" if x.dtype == torch.float32 else None
    # Triton's interpreter multiplies 16-bit floats as their bit patterns; there the operands go to float32
    # first, which gives the same products (a 16-bit float times another is exact in float32).
    upcast = os.environ.get("TRITON_INTERPRET") == "1"
    blocks_m = triton.cdiv(batch.longest_segment * tokens, BLOCK_M)
    segments = len(batch.segments)
    _shrink_kernel[(blocks_m, segments, parts)](
        flat_x,
        lora_A,
        h,
        part_rank,
        batch.segment_bounds,
        batch.segment_slots,
        tokens,
        in_features,
        *flat_x.stride(),
        *lora_A.stride(),
        *h.stride(),
        *part_rank.stride(),
        BLOCK_M=BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=BLOCK_K,
        PRECISION=precision,
        UPCAST=upcast,
    )
    _expand_kernel[(blocks_m, segments * parts, triton.cdiv(part_out, BLOCK_N))](
        h,
        lora_B,
        flat_y,
        part_rank,
        batch.segment_bounds,
        batch.segment_slots,
        tokens,
        part_out,
        parts,
        *h.stride(),
        *lora_B.stride(),
        *flat_y.stride(),
        *part_rank.stride(),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_R=block_r,
        PRECISION=precision,
        UPCAST=upcast,
    )
    return y
