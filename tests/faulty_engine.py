"""A real engine that fails for one adapter's rows, and the `loraplex serve` that runs it.

`LORAPLEX_TEST_FAULT=KIND:RANK` makes every batch that holds a row of an adapter of LoRA rank RANK
fail, whatever else the batch holds; rows of other adapters are computed by the real engine (the
paced one of tests/paced_engine.py, so that a test can hold batches and make them mixed). KIND:

    runtime   classify raises a RuntimeError (a bug or a broken adapter)
    oom       classify raises torch.OutOfMemoryError (the server's fault, not the adapter's)
    load      writing that adapter into a slot raises a RuntimeError
    lora      the LoRA op raises whenever it applies an adapter (a server bug; RANK is ignored)
    head      an adapter's head raises (a server bug; RANK is ignored)

With `LORAPLEX_TEST_FAULT_ARMED=PATH` the fault starts only once PATH exists, so that adapters can run
first (and be known good) and fail later.

    LiveServer(..., module="tests.faulty_engine", env={FAULT_ENV: "runtime:16"})
"""

from __future__ import annotations

import os
import sys

import torch

from tests.paced_engine import _engine_class

FAULT_ENV = "LORAPLEX_TEST_FAULT"
ARMED_ENV = "LORAPLEX_TEST_FAULT_ARMED"
KINDS = ("runtime", "oom", "load", "lora", "head")


def _armed() -> bool:
    path = os.environ.get(ARMED_ENV)
    return path is None or os.path.exists(path)


def _fault() -> tuple[str, int]:
    kind, _, rank = os.environ.get(FAULT_ENV, "").partition(":")
    if kind not in KINDS or not rank.isdigit():
        raise ValueError(f"{FAULT_ENV} must be KIND:RANK with KIND one of {KINDS}")
    return kind, int(rank)


def _faulty_class():
    paced = _engine_class()

    class FaultyEngine(paced):
        """The paced real engine, failing as `LORAPLEX_TEST_FAULT` says."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kind, self.rank = _fault()
            if self.kind == "lora":
                _break_the_lora_op(self)
            if self.kind == "head":
                _break_the_heads(self)

        def load_slot(self, slot, adapter):
            if self.kind == "load" and adapter.rank == self.rank and _armed():
                raise RuntimeError("slot write failed")
            super().load_slot(slot, adapter)

        def classify(self, token_ids, slots):
            if not self.warming and _armed():
                ranks = {self.slot_rank[s] for s in slots}
                if self.kind == "runtime" and self.rank in ranks:
                    raise RuntimeError("index out of range in self")
                if self.kind == "oom" and self.rank in ranks:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().classify(token_ids, slots)

    return FaultyEngine


def _break_the_lora_op(engine) -> None:
    """The LoRA op, as every layer calls it, raising whenever it applies an adapter (rank > 0)."""
    from loraplex.engine import lora

    op = lora.lora_linear

    def broken(x, weight, bias, lora_A, lora_B, idx, rank, *args, **kwargs):
        if rank and not engine.warming and _armed():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return op(x, weight, bias, lora_A, lora_B, idx, rank, *args, **kwargs)

    lora.lora_linear = broken


def _break_the_heads(engine) -> None:
    """Every head's computation raising for an adapter's slot (the empty slot still runs)."""
    from loraplex.engine.heads import SlotHead

    forward = SlotHead.forward

    def broken(self, x, batch):
        if any(slot != engine.empty_slot for slot in batch.distinct) and not engine.warming and _armed():
            raise IndexError("index 7 is out of bounds for dimension 0 with size 3")
        return forward(self, x, batch)

    SlotHead.forward = broken


def main(argv: list[str]) -> int:
    """`python -m tests.faulty_engine serve ARGS`: `loraplex serve ARGS` with the faulty engine."""
    if argv[:1] != ["serve"]:
        print("usage: python -m tests.faulty_engine serve [ARGS]", file=sys.stderr)
        return 2
    from loraplex.serve import main as serve

    return serve(argv[1:], engine_factory=_faulty_class())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
