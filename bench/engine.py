"""Engine throughput on one 64-row batch of real tweets: bare model vs loraplex vs PEFT.

    python bench/engine.py --model minilm --json bench/out/engine-minilm.json
    python bench/engine.py --model bert-base        # also modernbert-base, deberta-v3-base
    python bench/engine.py --dtype int8             # the engine in bfloat16 or int8 (PEFT stays float32)
    python bench/engine.py --device cuda --dtype float16   # all variants on the GPU in that precision
    python bench/engine.py --ks 64 --engine-only   # the bare model and the engine only (no PEFT): quick

(a) the bare Hugging Face model, no LoRA; (b) the loraplex engine with K distinct rank-8 adapters on every
linear layer (or on `--targets`, e.g. `query,value`); (c) PEFT's mixed-batch inference
(`adapter_names=`); (d) PEFT with `set_adapter` per sub-batch (on the CPU only: on CUDA it is launch-bound,
K sub-batches of a few rows each, and at K = 64 it would take most of the run). All in one process on the
same batch, timed in interleaved rounds; figures are medians of sequences per second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# The repository, not bench/, first on the path, so that `bench` and `tests` import as packages.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import ALL_LINEAR, SHAPES, interleaved_medians, model_dir, tweets  # noqa: E402


def peft_model_with_adapters(path: str, k: int, num_labels: int = 3, targets: list[str] | None = None):
    """PEFT's model with `k` random rank-8 adapters on `targets` (default: every linear layer)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from loraplex.engine.models import family_for, head_modules

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
    family = family_for(base.config.model_type)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=8,
        lora_alpha=16,
        target_modules=targets or ALL_LINEAR[base.config.model_type],
        modules_to_save=head_modules(family, base.config),
        init_lora_weights=False,
    )
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", config)
    return model.eval()


def load_peft_adapters(engine, peft, k: int, max_rank: int = 8) -> None:
    """PEFT's adapters a0..a{k-1} into the engine's slots 0..k-1."""
    from peft import get_peft_model_state_dict

    from loraplex.adapters.peft import parse_adapter

    for i in range(k):
        state = get_peft_model_state_dict(peft, adapter_name=f"a{i}")
        config = peft.peft_config[f"a{i}"].to_dict()
        engine.load_slot(i, parse_adapter(config, state, engine.base, max_rank=max_rank))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm", choices=["minilm", *SHAPES])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--ks", default="1,8,64")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "int8"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the bare model and PEFT run there too)")
    parser.add_argument(
        "--targets", default=None, help="comma list of modules the adapters target (default: every linear)"
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="time the bare model and the engine only, not PEFT (c, d): a quick engine comparison",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from peft.tuners.lora.model import _adapter_names_pre_forward_hook
    from transformers import AutoModelForSequenceClassification

    from loraplex.engine.core import Engine, length_groups

    path = model_dir(args.model)
    ks = [int(k) for k in args.ks.split(",")]
    texts = tweets(args.rows)
    engine = Engine(path, device=args.device, dtype=args.dtype, num_slots=max(ks), max_rank=8)
    device = engine.device
    # The bare model and PEFT in their best precision on this device: the engine's, except int8.
    peer_dtype = getattr(torch, args.dtype) if args.dtype in ("float16", "bfloat16") else torch.float32
    ids = engine.tokenize(texts)
    batch = engine.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    tokens = int(batch["attention_mask"].sum())
    print(
        f"model={args.model} dtype={args.dtype} rows={args.rows} padded_len={batch['input_ids'].shape[1]} "
        f"tokens={tokens} threads={torch.get_num_threads()}"
    )
    lengths = sorted((len(row) for row in ids), reverse=True)
    sizes = length_groups(lengths, engine.group_tokens, engine.group_cost_tokens)
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    engine_tokens = sum(size * lengths[start] for size, start in zip(sizes, starts, strict=True))
    print(f"engine: groups of {sizes} rows, {engine_tokens} tokens with padding, matmul={engine.matmul}")

    targets = args.targets.split(",") if args.targets else None
    peft = peft_model_with_adapters(path, max(ks), targets=targets)
    load_peft_adapters(engine, peft, max(ks))

    bare = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    bare.to(device, peer_dtype)
    peft.to(device, peer_dtype)
    batch = {key: value.to(device) for key, value in batch.items()}
    fns = {
        "a: bare model": lambda: bare(**batch),
        "engine, no adapter": lambda: engine.classify(ids, [engine.empty_slot] * args.rows),
    }
    for k in ks:
        slots = [i % k for i in range(args.rows)]
        names = [f"a{s}" for s in slots]
        fns[f"b: engine K={k}"] = lambda slots=slots: engine.classify(ids, slots)
        if args.engine_only:
            continue
        fns[f"c: peft mixed K={k}"] = lambda names=names: peft(**batch, adapter_names=names)
        if device.type == "cuda":
            continue

        def per_adapter(k=k, slots=slots):
            for a in range(k):
                rows = [i for i, s in enumerate(slots) if s == a]
                peft.set_adapter(f"a{a}")
                peft(**{key: v[rows] for key, v in batch.items()})

        fns[f"d: peft set_adapter K={k}"] = per_adapter
    if device.type == "cuda":  # time the work, not its launch: each call ends when the GPU is done
        fns = {name: lambda fn=fn: (fn(), torch.cuda.synchronize()) for name, fn in fns.items()}
    failed = {}  # PEFT's mixed batch cannot run some families (see the README); they are left out
    with torch.inference_mode():
        for name, fn in list(fns.items()):
            try:
                fn()
            except (TypeError, ValueError, RuntimeError) as e:
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                del fns[name]
                # A mixed batch that raises leaves PEFT's per-call adapter_names hooks on its LoRA layers,
                # which would then fail every later call; take them off.
                for module in peft.modules():
                    for key, hook in list(module._forward_pre_hooks.items()):
                        if getattr(hook, "func", None) is _adapter_names_pre_forward_hook:
                            del module._forward_pre_hooks[key]
        seconds = interleaved_medians(fns, args.reps)
    results = {name: args.rows / s for name, s in seconds.items()}
    for name, value in results.items():
        print(f"  {name:<28} {value:8.1f} seq/s")
    for name, reason in failed.items():
        print(f"  {name:<28}   failed: {reason}")
    if device.type == "cuda":
        print(f"  {'d: peft set_adapter':<28}   not run on cuda")

    def ratio(a: str, b: str) -> float | None:
        return results[a] / results[b] if a in results and b in results else None

    def show(x: float | None, width: int) -> str:
        return f"{x:>{width}.2f}" if x is not None else f"{'-':>{width}}"

    print(f"\n{'K':>4} {'engine/bare':>12} {'engine/peft-mixed':>18} {'engine/peft-set':>16}")
    ratios = {}
    for k in ks:
        e = f"b: engine K={k}"
        row = {
            "engine_over_bare": ratio(e, "a: bare model"),
            "engine_over_peft_mixed": ratio(e, f"c: peft mixed K={k}"),
            "engine_over_peft_set_adapter": ratio(e, f"d: peft set_adapter K={k}"),
        }
        ratios[k] = row
        print(
            f"{k:>4} {show(row['engine_over_bare'], 12)} {show(row['engine_over_peft_mixed'], 18)} "
            f"{show(row['engine_over_peft_set_adapter'], 16)}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "dtype": args.dtype,
                    "device": str(device),
                    "rows": args.rows,
                    "tokens": tokens,
                    "targets": targets or "all linear",
                    "engine_groups": sizes,
                    "engine_padded_tokens": engine_tokens,
                    "seq_per_s": results,
                    "ratios": ratios,
                    "failed": failed,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
