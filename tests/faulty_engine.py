"""A real engine that fails for one adapter's rows, and the `loraplex serve` that runs it.

`LORAPLEX_TEST_FAULT=KIND:RANK` makes every batch that holds a row of an adapter of LoRA rank RANK
fail, whatever else the batch holds; rows of other adapters are computed by the real engine (the
paced one of tests/paced_engine.py, so that a test can hold batches and make them mixed). KIND:

    runtime   classify raises a RuntimeError (a bug or a broken adapter)
    oom       classify raises torch.OutOfMemoryError (the server's fault, not the adapter's)
    load      writing that adapter into a slot raises a RuntimeError

    LiveServer(..., module="tests.faulty_engine", env={FAULT_ENV: "runtime:16"})
"""

from __future__ import annotations

import os
import sys

import torch

from tests.paced_engine import _engine_class

FAULT_ENV = "LORAPLEX_TEST_FAULT"
KINDS = ("runtime", "oom", "load")


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

        def load_slot(self, slot, adapter):
            if self.kind == "load" and adapter.rank == self.rank:
                raise RuntimeError("slot write failed")
            super().load_slot(slot, adapter)

        def classify(self, token_ids, slots):
            if not self.warming:
                ranks = {self.slot_rank[s] for s in slots}
                if self.kind == "runtime" and self.rank in ranks:
                    raise RuntimeError("index out of range in self")
                if self.kind == "oom" and self.rank in ranks:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().classify(token_ids, slots)

    return FaultyEngine


def main(argv: list[str]) -> int:
    """`python -m tests.faulty_engine serve ARGS`: `loraplex serve ARGS` with the faulty engine."""
    if argv[:1] != ["serve"]:
        print("usage: python -m tests.faulty_engine serve [ARGS]", file=sys.stderr)
        return 2
    from loraplex.serve import main as serve

    return serve(argv[1:], engine_factory=_faulty_class())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
