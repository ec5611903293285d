"""The engine in float32, bfloat16 and int8 on the CPU: throughput at K = 64 and the demo adapters' accuracy.

    python bench/precision.py --json bench/out/precision.json
    python bench/precision.py --models minilm --reps 3 --held-out 1000     # quicker

Throughput: one batch of `--rows` real tweets, each row for adapter `i % 64` (rank-8 LoRA on every linear
layer, as bench/engine.py), the three engines timed in interleaved rounds in one process; medians of
sequences per second and each precision's ratio to float32. Accuracy: both demo adapters
(adapters/demo/*) on the first `--held-out` of the 5,000 held-out tweets (the split of
bench/demo_baseline.py), every tweet for both adapters in mixed batches of 64 rows; accuracy per
precision and the share of answers equal to float32's. Targets (issue): bfloat16 or int8 >= 2.5x float32,
accuracy within 0.3 points of float32 and argmax agreement >= 99%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # the repository, not bench/, so that `bench` and `adapters` import as packages

from bench.common import interleaved_medians, model_dir, tweets  # noqa: E402
from bench.demo_baseline import TASKS, task_split  # noqa: E402
from bench.engine import peft_model_with_adapters  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8")
K = 64


def throughput(model: str, dtypes: list[str], rows: int, reps: int) -> dict[str, float]:
    """Sequences per second of each precision's engine on one `rows`-row batch with K adapters."""
    from peft import get_peft_model_state_dict

    from loraplex.adapters.peft import parse_adapter
    from loraplex.engine.core import Engine

    path = model_dir(model)
    peft = peft_model_with_adapters(path, K)
    names = [f"a{i}" for i in range(K)]
    states = [(peft.peft_config[n].to_dict(), get_peft_model_state_dict(peft, adapter_name=n)) for n in names]
    del peft
    texts = tweets(rows)
    slots = [i % K for i in range(rows)]
    fns = {}
    for dtype in dtypes:
        engine = Engine(path, device="cpu", dtype=dtype, num_slots=K, max_rank=8)
        for i, (config, state) in enumerate(states):
            engine.load_slot(i, parse_adapter(config, state, engine.base, max_rank=8))
        ids = engine.tokenize(texts)
        print(f"  {model} {dtype}: frozen matmuls {engine.matmul}", flush=True)
        fns[dtype] = lambda engine=engine, ids=ids: engine.classify(ids, slots)
    with torch.inference_mode():
        seconds = interleaved_medians(fns, reps)
    return {dtype: rows / s for dtype, s in seconds.items()}


def demo_accuracy(dtypes: list[str], held_out: int) -> dict[str, dict]:
    """Per demo adapter: accuracy of each precision and its argmax agreement with float32."""
    from safetensors.torch import load_file

    from loraplex.adapters.peft import parse_adapter
    from loraplex.engine.core import Engine

    tasks = {}
    for task, labels in TASKS.items():
        _, rows = task_split(labels)
        texts, gold = rows.texts[:held_out], rows.labels[:held_out]
        tasks[task] = (texts, [labels.index(g) for g in gold])
    report: dict[str, dict] = {task: {} for task in TASKS}
    predictions: dict[str, dict[str, list[int]]] = {task: {} for task in TASKS}
    for dtype in dtypes:
        engine = Engine(device="cpu", dtype=dtype, num_slots=len(TASKS), max_rank=8)
        jobs = []  # (slot, tweet, token ids)
        for slot, task in enumerate(TASKS):
            folder = REPO / "adapters" / "demo" / task
            config = json.loads((folder / "adapter_config.json").read_text())
            labels = json.loads((folder / "labels.json").read_text())
            tensors = load_file(folder / "adapter_model.safetensors")
            engine.load_slot(slot, parse_adapter(config, tensors, engine.base, labels=labels, max_rank=8))
            jobs += [(slot, t, ids) for t, ids in enumerate(engine.tokenize(tasks[task][0]))]
        jobs = jobs[::2] + jobs[1::2]  # both adapters in every batch
        pred = {slot: [0] * len(tasks[task][0]) for slot, task in enumerate(TASKS)}
        for start in range(0, len(jobs), 64):
            chunk = jobs[start : start + 64]
            logits = engine.classify([ids for *_, ids in chunk], [slot for slot, *_ in chunk])
            for (slot, t, _), row in zip(chunk, logits, strict=True):
                pred[slot][t] = int(row.argmax())
        for slot, task in enumerate(TASKS):
            predictions[task][dtype] = pred[slot]
            gold = tasks[task][1]
            hits = sum(p == g for p, g in zip(pred[slot], gold, strict=True))
            report[task][dtype] = {"accuracy": hits / len(gold)}
        print(f"  demo {dtype}: {len(jobs)} rows scored", flush=True)
    for task in TASKS:
        reference = predictions[task].get("float32")
        for dtype in dtypes:
            if reference is not None:
                same = sum(a == b for a, b in zip(predictions[task][dtype], reference, strict=True))
                report[task][dtype]["agreement_with_float32"] = same / len(reference)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,bert-base", help="comma list: minilm, bert-base, ...")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--held-out", type=int, default=5000, help="tweets per demo adapter, <= 5000")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    print(f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}", flush=True)

    speed = {}
    for model in filter(None, args.models.split(",")):
        speed[model] = throughput(model, dtypes, args.rows, args.reps)
    print(f"\nThroughput, K={K}, {args.rows} rows, seq/s (x float32):")
    for model, figures in speed.items():
        cells = [f"{d} {v:.1f} ({v / figures.get('float32', v):.2f}x)" for d, v in figures.items()]
        print(f"  {model:<10} " + "  ".join(cells))

    accuracy = demo_accuracy(dtypes, args.held_out) if args.held_out else {}
    if accuracy:
        print(f"\nDemo adapters, {args.held_out} held-out tweets each:")
    for task, figures in accuracy.items():
        for dtype, f in figures.items():
            agree = f.get("agreement_with_float32")
            line = f"  {task:<16} {dtype:<9} accuracy {100 * f['accuracy']:.2f}%"
            print(line + ("" if agree is None else f"  agreement with float32 {100 * agree:.2f}%"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seq_per_s": speed, "demo": accuracy, "rows": args.rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
