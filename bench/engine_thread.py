"""The engine alone on its thread, and again once another live thread has run torch's parallel work.

    python bench/engine_thread.py                     # bfloat16, MiniLM, K = 64
    python bench/engine_thread.py --dtype float32

The engine is built and timed on one thread (one batch of 64 real tweets, each row for adapter `i % 64`,
rank-8 LoRA on every linear layer), then a second thread runs the same engine once and stays alive, and
the first thread is timed again. loraplex builds, warms up and runs its engine on one thread
(`loraplex.engine.batcher.EngineThread`) so that no other thread of the server needs to run the engine's work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import model_dir, tweets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)

    from peft import get_peft_model_state_dict

    from bench.engine import peft_model_with_adapters
    from loraplex.adapters.peft import parse_adapter
    from loraplex.engine.batcher import EngineThread
    from loraplex.engine.core import Engine

    path = model_dir(args.model)
    peft = peft_model_with_adapters(path, 64)
    names = [f"a{i}" for i in range(64)]
    adapters = [
        (peft.peft_config[n].to_dict(), get_peft_model_state_dict(peft, adapter_name=n)) for n in names
    ]

    def build() -> Engine:
        engine = Engine(path, device="cpu", dtype=args.dtype, num_slots=64, max_rank=8)
        for i, (config, state) in enumerate(adapters):
            engine.load_slot(i, parse_adapter(config, state, engine.base, max_rank=8))
        return engine

    owner, other = EngineThread("owner"), EngineThread("other")
    engine = owner.submit(build).result()
    ids = engine.tokenize(tweets(64))
    slots = [i % 64 for i in range(64)]

    def seq_per_s() -> float:
        with torch.inference_mode():
            for _ in range(2):
                engine.classify(ids, slots)
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                engine.classify(ids, slots)
                times.append(time.perf_counter() - start)
        return len(ids) / statistics.median(times)

    alone = owner.submit(seq_per_s).result()
    other.submit(seq_per_s).result()  # another thread runs torch's parallel work, and stays alive
    after = owner.submit(seq_per_s).result()
    print(f"model={args.model} dtype={args.dtype} torch threads={torch.get_num_threads()}")
    print(f"  the engine's thread alone           {alone:7.1f} seq/s")
    print(f"  the same, another thread alive      {after:7.1f} seq/s ({after / alone:.2f}x)")
    owner.close()
    other.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
