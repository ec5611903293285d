"""The multi-LoRA op, gathered or by segments, equals a slow per-row loop, whatever the adapter popularity."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine import lora
from loraplex.engine.lora import add_segment_deltas, by_segments, lora_linear, pack_weight, slot_segments
from loraplex.engine.lora_batch import LoraBatch

SLOTS, R_MAX, IN, OUT, BATCH, TOKENS = 16, 16, 24, 40, 12, 5


def popularity(kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "distinct":
        return torch.randperm(SLOTS, generator=generator)[:BATCH]
    if kind == "uniform":
        return torch.randint(0, SLOTS, (BATCH,), generator=generator)
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, SLOTS + 1, dtype=torch.float64)
        return torch.multinomial(weights, BATCH, replacement=True, generator=generator)
    return torch.full((BATCH,), 3)  # identical


def reference(x, weight, bias, lora_A, lora_B, idx, rank):
    """The slow loop: y[i] = x[i] @ W.T + b + sum_p x[i] @ A[s, p, :r].T @ B[s, :, p, :r].T, s = idx[i]."""
    y = x @ weight.T + bias
    for i, s in enumerate(idx.tolist()):
        for p in range(lora_A.shape[1]):
            y[i] += x[i] @ lora_A[s, p, :rank].T @ lora_B[s, :, p, :rank].T
    return y


def block_diagonal_B(parts: int, dtype, g) -> torch.Tensor:
    """`[SLOTS, parts * OUT, parts, R_MAX]` where part p only feeds outputs p * OUT .. (p + 1) * OUT."""
    lora_B = torch.zeros(SLOTS, parts * OUT, parts, R_MAX, dtype=dtype)
    for p in range(parts):
        lora_B[:, p * OUT : (p + 1) * OUT, p] = torch.randn(SLOTS, OUT, R_MAX, generator=g, dtype=dtype)
    return lora_B


@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_linear_equals_loop(kind, rank, parts, dtype):
    g = torch.Generator().manual_seed(rank * 10 + parts)
    idx = popularity(kind, g)
    x = torch.randn(BATCH, TOKENS, IN, generator=g, dtype=dtype)
    weight = torch.randn(parts * OUT, IN, generator=g, dtype=dtype)
    bias = torch.randn(parts * OUT, generator=g, dtype=dtype)
    lora_A = torch.randn(SLOTS, parts, R_MAX, IN, generator=g, dtype=dtype)
    lora_B = block_diagonal_B(parts, dtype, g)
    expected = reference(x, weight, bias, lora_A, lora_B, idx, rank)
    got = lora_linear(x, weight, bias, lora_A, lora_B, idx, rank)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(got, expected, atol=tol, rtol=tol)
    assert not torch.allclose(got, x @ weight.T + bias, atol=1e-3)  # the delta is really there
    # A strided input (the pooler reads only the first token of each row) gives the same rows.
    got_first = lora_linear(x[:, :1], weight, bias, lora_A, lora_B, idx, rank)
    assert torch.allclose(got_first, expected[:, :1], atol=tol, rtol=tol)
    packed = pack_weight(weight, bias)
    if dtype == torch.float32:  # the CPU's prepacked matmul with the delta as a fused add
        assert packed is not None or not torch.backends.mkldnn.is_available()
    else:
        assert packed is None  # only fp32 is packed
    if packed is not None:
        for rows in (x, x[:, :1]):
            got = lora_linear(rows, None, bias, lora_A, lora_B, idx, rank, packed)
            assert torch.allclose(got, expected[:, : rows.shape[1]], atol=tol, rtol=tol)


def test_rank_zero_is_the_base_linear():
    x, weight, bias = torch.randn(2, 3, IN), torch.randn(OUT, IN), torch.randn(OUT)
    lora_A, lora_B = torch.randn(4, 1, 2, IN), torch.randn(4, OUT, 1, 2)
    base = torch.nn.functional.linear(x, weight, bias)
    out = lora_linear(x, weight, bias, lora_A, lora_B, torch.tensor([0, 1]), 0)
    assert torch.equal(out, base)
    packed = pack_weight(weight, bias)
    if packed is not None:
        out = lora_linear(x, None, bias, lora_A, lora_B, torch.tensor([0, 1]), 0, packed)
        assert torch.allclose(out, base, atol=1e-5)


def test_zero_padding_beyond_rank_is_exact():
    """A rank-2 adapter in a rank-16 slot gives the same as the rank-2 matmul alone."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, TOKENS, IN, generator=g, dtype=torch.float64)
    a = torch.randn(2, IN, generator=g, dtype=torch.float64)
    b = torch.randn(OUT, 2, generator=g, dtype=torch.float64)
    lora_A = torch.zeros(1, 1, R_MAX, IN, dtype=torch.float64)
    lora_B = torch.zeros(1, OUT, 1, R_MAX, dtype=torch.float64)
    lora_A[0, 0, :2], lora_B[0, :, 0, :2] = a, b
    zero_w, zero_b = torch.zeros(OUT, IN, dtype=torch.float64), torch.zeros(OUT, dtype=torch.float64)
    got = lora_linear(x, zero_w, zero_b, lora_A, lora_B, torch.tensor([0]), R_MAX)
    assert torch.allclose(got[0], x[0] @ a.T @ b.T, atol=1e-12)


@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("path", ["segments", "gathered"])
def test_both_paths_equal_the_loop_on_rows_ordered_by_slot(kind, rank, parts, path, monkeypatch):
    """As the engine runs a group: rows ordered by slot; each path forced in turn through lora_linear."""
    monkeypatch.setattr(lora, "SEGMENT_MIN_TOKENS", 0 if path == "segments" else 10**9)
    g = torch.Generator().manual_seed(rank * 10 + parts + 1)
    idx = popularity(kind, g).sort().values
    x = torch.randn(BATCH, TOKENS, IN, generator=g, dtype=torch.float64)
    weight = torch.randn(parts * OUT, IN, generator=g, dtype=torch.float64)
    bias = torch.randn(parts * OUT, generator=g, dtype=torch.float64)
    lora_A = torch.randn(SLOTS, parts, R_MAX, IN, generator=g, dtype=torch.float64)
    lora_B = block_diagonal_B(parts, torch.float64, g)
    expected = reference(x, weight, bias, lora_A, lora_B, idx, rank)
    assert by_segments(slot_segments(idx.tolist()), TOKENS) == (path == "segments")
    got = lora_linear(x, weight, bias, lora_A, lora_B, idx, rank)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-10)
    got_first = lora_linear(x[:, :1], weight, bias, lora_A, lora_B, idx, rank)  # strided, as the pooler
    assert torch.allclose(got_first, expected[:, :1], atol=1e-10, rtol=1e-10)
    packed = pack_weight(weight.float(), bias.float())
    if packed is not None:
        got = lora_linear(x.float(), None, bias.float(), lora_A.float(), lora_B.float(), idx, rank, packed)
        assert torch.allclose(got, expected.float(), atol=1e-3, rtol=1e-4)


def test_segments_are_the_runs_of_equal_slots():
    assert slot_segments([2, 2, 5, 0, 0, 0]) == [(0, 2, 2), (2, 3, 5), (3, 6, 0)]
    assert slot_segments([7]) == [(0, 1, 7)]


def test_segments_are_chosen_only_when_they_are_long():
    """One adapter over a group of 13 rows of 40 tokens: segments; 13 adapters over them: gathered."""
    one = slot_segments([0] * 13)
    many = slot_segments(list(range(13)))
    assert by_segments(one, 40) and not by_segments(many, 40)
    assert not by_segments(one, 1)  # the pooler's one token per row
    assert not by_segments(None, 40)  # no segments: the gathered op


def test_a_segment_adds_to_its_own_rows_only():
    y = torch.zeros(3, 2, 4, dtype=torch.float64)
    x = torch.ones(3, 2, 5, dtype=torch.float64)
    lora_A = torch.ones(2, 1, 1, 5, dtype=torch.float64)
    lora_B = torch.ones(2, 4, 1, 1, dtype=torch.float64)
    add_segment_deltas(y, x, lora_A, lora_B, [(1, 2, 0)], 1)
    assert torch.equal(y[1], torch.full((2, 4), 5.0, dtype=torch.float64))
    assert not y[0].any() and not y[2].any()


def _slot_linear(parts: int) -> lora.SlotLinear:
    g = torch.Generator().manual_seed(parts)
    linears = [torch.nn.Linear(IN, OUT) for _ in range(parts)]
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(torch.randn(OUT, IN, generator=g))
            linear.bias.copy_(torch.randn(OUT, generator=g))
    return lora.SlotLinear(linears, SLOTS, R_MAX, torch.float32)


@pytest.mark.parametrize("path", ["segments", "gathered"])
def test_a_layer_that_no_row_targets_runs_its_frozen_matmul_alone(path, monkeypatch):
    """Slot 1's adapter has LoRA elsewhere in the model but not here: with a batch rank of 8, its rows
    still get the frozen matmul alone here; slot 0's rows get their LoRA, on the parts it targets."""
    monkeypatch.setattr(lora, "SEGMENT_MIN_TOKENS", 0 if path == "segments" else 10**9)
    layer = _slot_linear(parts=3)
    g = torch.Generator().manual_seed(7)
    a = [torch.randn(8, IN, generator=g) for _ in range(3)]
    b = [torch.randn(OUT, 8, generator=g) for _ in range(3)]
    layer.write(0, 0, a[0], b[0])  # query and value, as PEFT's default targets; not key
    layer.write(0, 2, a[2], b[2])
    assert layer.part_rank[:2] == [[8, 0, 8], [0, 0, 0]]
    x = torch.randn(4, TOKENS, IN, generator=g)
    frozen = x @ layer.weight.T + layer.bias

    def forbidden(*args, **kwargs):
        raise AssertionError("a LoRA op ran for rows without LoRA on this layer")

    with monkeypatch.context() as patch:
        patch.setattr(lora, "gathered_lora_linear", forbidden)
        patch.setattr(lora, "add_segment_deltas", forbidden)
        got = layer(x, LoraBatch.build([1, 1, 1, 1], [8] * SLOTS))
    assert torch.allclose(got, frozen, atol=1e-5)
    got = layer(x, LoraBatch.build([0, 0, 1, 1], [8] * SLOTS))
    want = frozen.clone()
    want[:2, :, :OUT] += x[:2] @ a[0].T @ b[0].T
    want[:2, :, 2 * OUT :] += x[:2] @ a[2].T @ b[2].T
    assert torch.allclose(got, want, atol=1e-4)
    layer.write(0, 0, None, None)  # cleared: the slot's rank follows
    layer.write(0, 2, None, None)
    assert layer.part_rank[0] == [0, 0, 0]
