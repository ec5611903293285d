"""The multi-LoRA op alone: the frozen matmul, then its deltas gathered per row or by segments.

    python bench/lora_ops.py                      # MiniLM and bert-base linears, 13 rows of 40 tokens
    python bench/lora_ops.py --rows 4 --tokens 250
    python bench/lora_ops.py --ks 13 --dtype bfloat16   # every tensor in bfloat16, as --dtype bfloat16 serves

One group of rows as the engine runs it (rows ordered by slot), rank 8, each linear of an encoder layer;
for K adapters spread over the rows, the extra time of each delta path over the frozen matmul alone
(medians of interleaved rounds). `loraplex.engine.lora.SEGMENT_MIN_TOKENS` is set from these figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import interleaved_medians  # noqa: E402

# (hidden, intermediate) of all-MiniLM-L6-v2 and of bert-base
SHAPES = {"minilm": (384, 1536), "bert-base": (768, 3072)}


def time_linear(inp: int, out: int, parts: int, args, g: torch.Generator):
    """Per K: seconds of the frozen matmul, and each delta path's extra time as a share of it."""
    from loraplex.engine.lora import add_segment_deltas, gathered_lora_linear, pack_weight, slot_segments

    x = torch.randn(args.rows, args.tokens, inp, generator=g)  # [B, T, in]
    weight, bias = torch.randn(parts * out, inp, generator=g), torch.randn(parts * out, generator=g)
    slots = args.rows + 1
    lora_A = torch.randn(slots, parts, args.rank, inp, generator=g) * 0.01  # [slots, parts, r, in]
    lora_B = torch.zeros(slots, parts * out, parts, args.rank)  # block diagonal, as SlotLinear's
    for p in range(parts):
        lora_B[:, p * out : (p + 1) * out, p] = torch.randn(slots, out, args.rank, generator=g)
    dtype = getattr(torch, args.dtype)
    x, weight, bias, lora_A, lora_B = (t.to(dtype) for t in (x, weight, bias, lora_A, lora_B))
    packed = pack_weight(weight, bias)
    flat = x.reshape(-1, inp)

    def frozen():
        return packed(flat) if packed else torch.nn.functional.linear(flat, weight, bias)

    results = []
    for k in (int(k) for k in args.ks.split(",")):
        idx = torch.sort(torch.arange(args.rows) % k).values  # rows ordered by slot, as the engine's
        segments = slot_segments(idx.tolist())

        def gathered(idx=idx):
            return gathered_lora_linear(x, weight, bias, lora_A, lora_B, idx, args.rank, packed)

        def by_segments(segments=segments):
            y = frozen().view(args.rows, args.tokens, -1)
            return add_segment_deltas(y, x, lora_A, lora_B, segments, args.rank)

        paths = {"frozen": frozen, "gathered": gathered, "segments": by_segments}
        fns = {n: lambda fn=fn: [fn() for _ in range(args.calls)] for n, fn in paths.items()}
        with torch.inference_mode():
            seconds = interleaved_medians(fns, args.reps)
        base = seconds["frozen"]
        extra = {n: (seconds[n] - base) / base for n in ("gathered", "segments")}
        results.append((k, base / args.calls, extra))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=13)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--ks", default="1,2,4,13")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    from loraplex.engine.core import keep_freed_memory

    keep_freed_memory()  # as the engine runs

    print(
        f"rows={args.rows} tokens={args.tokens} rank={args.rank} dtype={args.dtype} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'shape':<10} {'linear':<14} {'K':>3} {'frozen us':>10} {'gathered':>9} {'segments':>9}")
    g = torch.Generator().manual_seed(0)
    for name, (hidden, inter) in SHAPES.items():
        for label, (inp, out, parts) in {
            "q/k/v": (hidden, hidden, 3),
            "attn out": (hidden, hidden, 1),
            "ffn in": (hidden, inter, 1),
            "ffn out": (inter, hidden, 1),
        }.items():
            for k, base, extra in time_linear(inp, out, parts, args, g):
                print(
                    f"{name:<10} {label:<14} {k:>3} {base * 1e6:>10.0f} "
                    f"{extra['gathered']:>+9.0%} {extra['segments']:>+9.0%}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
