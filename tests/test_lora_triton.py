"""The fused multi-LoRA kernels (`loraplex.engine.lora_triton`) equal a slow per-row loop.

On the CPU they run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 for the session
(Triton reads it once, when it is first imported, whichever test imports it), and this module also loads
its own copy of the kernels with it set, so that it holds when run alone with the variable cleared. With
LORAPLEX_TEST_DEVICE=cuda the same tests run the compiled kernels on the GPU. Skipped where Triton is not
installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from loraplex.engine import lora as lora_module
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch
from tests.device_support import DEVICE

INTERPRET = torch.device(DEVICE).type == "cpu"


class _Interpreter:
    """TRITON_INTERPRET=1 while inside, the previous value after."""

    def __enter__(self):
        self.saved = os.environ.get("TRITON_INTERPRET")
        if INTERPRET:
            os.environ["TRITON_INTERPRET"] = "1"

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self.saved


def _load():
    """The kernels module: on the CPU a private copy, its kernels defined for the interpreter."""
    with _Interpreter():
        pytest.importorskip("triton", reason="Triton is not installed: the fused LoRA kernels are not tested")
        if not INTERPRET:
            return importlib.import_module("loraplex.engine.lora_triton")
        spec = importlib.util.find_spec("loraplex.engine.lora_triton")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


kernels = _load()


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    with _Interpreter():
        yield


SLOTS, IN, PART_OUT, ROWS, TOKENS = 8, 40, 24, 6, 3
R_MAX = 64


def popularity(kind: str, g: torch.Generator) -> list[int]:
    """Slots of the batch's rows, ordered by slot as the engine orders a group."""
    if kind == "distinct":
        slots = torch.randperm(SLOTS, generator=g)[:ROWS]
    elif kind == "uniform":
        slots = torch.randint(0, SLOTS, (ROWS,), generator=g)
    elif kind == "zipf":
        weights = 1.0 / torch.arange(1, SLOTS + 1, dtype=torch.float64)
        slots = torch.multinomial(weights, ROWS, replacement=True, generator=g)
    else:  # identical
        slots = torch.full((ROWS,), 5)
    return sorted(slots.tolist())


def adapters(parts: int, ranks: list[int], dtype, g: torch.Generator):
    """Slot tensors with slot s at rank ranks[s] on each part (part 1 left out for odd slots when there are
    three: an adapter on query and value only). Everything the kernels must not read is NaN: A and B past
    each slot's rank, and the blocks of B that feed another part's outputs."""
    nan = float("nan")
    lora_A = torch.full((SLOTS, parts, R_MAX, IN), nan)
    lora_B = torch.full((SLOTS, parts * PART_OUT, parts, R_MAX), nan)
    part_rank = torch.zeros(SLOTS, parts, dtype=torch.int32)
    for s, r in enumerate(ranks):
        for p in range(parts):
            if parts == 3 and p == 1 and s % 2:
                continue
            lora_A[s, p, :r] = torch.randn(r, IN, generator=g) / IN**0.5
            lora_B[s, p * PART_OUT : (p + 1) * PART_OUT, p, :r] = (
                torch.randn(PART_OUT, r, generator=g) / r**0.5
            )
            part_rank[s, p] = r
    return lora_A.to(dtype), lora_B.to(dtype), part_rank


def reference(y, x, lora_A, lora_B, part_rank, slots):
    """The slow loop, in float64: every row, every part, at its slot's own rank in that part."""
    out = y.double().clone()
    for i, s in enumerate(slots):
        for p in range(lora_A.shape[1]):
            r = int(part_rank[s, p])
            if r:
                a, b = lora_A[s, p, :r].double(), lora_B[s, p * PART_OUT : (p + 1) * PART_OUT, p, :r].double()
                out[i, :, p * PART_OUT : (p + 1) * PART_OUT] += x[i].double() @ a.T @ b.T
    return out


RANKS = {
    "rank-1": [1] * SLOTS,
    "rank-64": [64] * SLOTS,
    "mixed": [1, 64, 8, 2, 33, 16, 5, 48],  # every adapter at its own rank, 1..64
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("ranks", list(RANKS))
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_equal_the_loop(kind, ranks, parts, dtype):
    g = torch.Generator().manual_seed(len(kind) * 100 + parts * 10 + len(ranks))
    slots = popularity(kind, g)
    lora_A, lora_B, part_rank = adapters(parts, RANKS[ranks], dtype, g)
    x = torch.randn(ROWS, TOKENS, IN, generator=g).to(dtype)
    y = torch.randn(ROWS, TOKENS, parts * PART_OUT, generator=g).to(dtype)  # the frozen output
    want = reference(y, x, lora_A, lora_B, part_rank, slots)
    layer_rank = max(RANKS[ranks][s] for s in slots)
    batch = LoraBatch.build(slots, RANKS[ranks], DEVICE)
    on = [t.to(DEVICE) for t in (y.clone(), x, lora_A, lora_B, part_rank)]
    got = kernels.add_lora(*on, batch, layer_rank).cpu()
    assert got.dtype == dtype and not got.isnan().any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert (want - y.double()).abs().max() > 10 * tol  # the deltas are really there


def test_the_pooler_reads_one_token_a_row():
    """A strided input (the first token of each row) and rows not grouped by slot: segments repeat."""
    g = torch.Generator().manual_seed(3)
    slots = [2, 2, 0, 2, 7, 0]
    lora_A, lora_B, part_rank = adapters(1, RANKS["mixed"], torch.float32, g)
    x = torch.randn(ROWS, TOKENS, IN, generator=g)[:, :1]
    y = torch.zeros(ROWS, 1, PART_OUT)
    batch = LoraBatch.build(slots, RANKS["mixed"], DEVICE)
    on = [t.to(DEVICE) for t in (y.clone(), x, lora_A, lora_B, part_rank)]
    got = kernels.add_lora(*on, batch, 48).cpu()
    torch.testing.assert_close(
        got.double(), reference(y, x, lora_A, lora_B, part_rank, slots), atol=1e-4, rtol=1e-4
    )


def test_a_slot_linear_fused_equals_its_unfused_op(monkeypatch):
    """Through SlotLinear: the fused path (as on CUDA with LORAPLEX_TRITON_LORA=1) and torch's ops agree,
    with adapters of different ranks, one of them not on the key part."""
    import loraplex.engine

    monkeypatch.setitem(sys.modules, "loraplex.engine.lora_triton", kernels)
    monkeypatch.setattr(loraplex.engine, "lora_triton", kernels, raising=False)
    g = torch.Generator().manual_seed(11)
    linears = [torch.nn.Linear(IN, PART_OUT) for _ in range(3)]
    layer = SlotLinear(linears, SLOTS, R_MAX, torch.float32).to(DEVICE)
    slot_rank = [0] * SLOTS
    for slot, r in ((0, 4), (3, 16), (6, 1)):
        for p in range(3):
            if slot == 3 and p == 1:
                continue
            a, b = torch.randn(r, IN, generator=g), torch.randn(PART_OUT, r, generator=g)
            layer.write(slot, p, a.to(DEVICE), b.to(DEVICE))
        slot_rank[slot] = r
    x = torch.randn(ROWS, TOKENS, IN, generator=g).to(DEVICE)
    slots = [0, 0, 3, 3, 6, 7]  # slot 7: no adapter
    with torch.inference_mode():
        fused = layer(x, LoraBatch.build(slots, slot_rank, DEVICE, fused=True))
        plain = layer(x, LoraBatch.build(slots, slot_rank, DEVICE))
        frozen = lora_module.frozen_linear(x.reshape(-1, IN), layer.weight, layer.bias, None).view_as(plain)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    assert (fused[:5] - frozen[:5]).abs().amax() > 1e-2 and torch.equal(fused[5], frozen[5])
