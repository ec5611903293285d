"""How much of the device's matmul peak the engine reaches on one large batch, with no adapter and with K.

    python bench/peak.py --device cuda --dtype bfloat16 --model bert-base     # a 16k-token batch, K = 0, 64
    python bench/peak.py --model minilm --tokens 4096                          # the CPU: a smaller batch

One batch of `--tokens` tokens: `--tokens / --length` rows of real tweets run together until each row is
exactly `--length` tokens long, so no row is padded and the count of tokens is the count computed. Timed
in interleaved rounds (medians): the bare Hugging Face encoder, and the engine with no adapter and with K
distinct rank-8 adapters on every linear layer (rows spread evenly over the K adapters).

The FLOPs of a pass are counted, not measured: the frozen matmuls (2 x the encoder's matrix weights per
token), attention (4 x rows x length^2 x hidden per layer) and, at K > 0, each LoRA layer's shrink and
expand at rank 8. A figure is those FLOPs over the pass's median time, given as a fraction of:

- the measured peak: the median of a large square matmul in the same dtype on the same device, timed in
  the same rounds as the passes (what this device and this torch build reach on the easiest matmul);
- the listed peak (dense, no sparsity) where the device is one of LISTED_PEAKS; "-" elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# The repository, not bench/, first on the path, so that `bench` and `tests` import as packages.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import interleaved_medians, model_dir, tweets  # noqa: E402

RANK = 8
# Dense (no sparsity) tensor-core peaks in TFLOP/s by dtype, from the makers' data sheets, for the GPUs
# this benchmark has been or may be run on; matched against torch.cuda.get_device_name.
LISTED_PEAKS = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},  # float32: TF32 tensor cores
    "H100 80GB HBM3": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},  # SXM
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
}


def listed_peak(device: torch.device, dtype: str) -> float | None:
    """The data sheet's dense peak for this GPU in FLOP/s, or None (the CPU, or a GPU not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in LISTED_PEAKS.items():
        if key in name:
            return peaks.get(dtype, 0) * 1e12 or None
    return None


def square_matmul(device: torch.device, dtype: torch.dtype):
    """A large square matmul in `dtype` on `device`, and its FLOPs: what the device reaches at its easiest."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: synced(device, lambda: a @ b)), 2 * n**3


def synced(device: torch.device, fn):
    """Call `fn` and, on CUDA, wait for the device, so that a time covers the work and not its launch."""
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def rows_of_length(tokenizer, rows: int, length: int) -> list[list[int]]:
    """`rows` rows of exactly `length` token ids ([CLS] ... [SEP]): tweets run together, then cut."""
    words = [i for text in tweets(4 * rows) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = length - 2
    if len(words) < rows * body:
        words = words * (rows * body // len(words) + 1)
    return [[cls, *words[r * body : (r + 1) * body], sep] for r in range(rows)]


def pass_flops(engine, rows: int, length: int, rank: int) -> float:
    """FLOPs of one pass of a BERT-shaped encoder: the layers' frozen matmuls and attention on every token,
    the pooler on each row's first, and at `rank` > 0 the LoRA shrink and expand of every linear."""
    from loraplex.engine.lora import SlotLinear

    flops = 4 * rows * length**2 * engine.base.hidden_size * engine.base.num_layers  # QK^T and AV
    for name, module in engine.model.encoder.named_modules():
        if isinstance(module, SlotLinear):
            tokens = rows if name == "pooler" else rows * length
            flops += 2 * module.parts * module.part_out * module.in_features * tokens
            if rank:
                flops += module.parts * 2 * rank * (module.in_features + module.part_out) * tokens
    return flops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="bert-base", choices=["minilm", "bert-base"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="the engine's --dtype (auto: bfloat16 on cuda)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per row")
    parser.add_argument("--ks", default="0,64", help="adapters in the batch; 0: the engine with none")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from transformers import AutoModel

    from bench.engine import load_peft_adapters, peft_model_with_adapters
    from loraplex.engine.core import DTYPES, Engine, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ks = [int(k) for k in args.ks.split(",")]
    rows = max(1, args.tokens // args.length)
    path = model_dir(args.model)
    engine = Engine(path, device=str(device), dtype=dtype, num_slots=max(1, *ks), max_rank=RANK)
    ids = rows_of_length(engine.tokenizer, rows, args.length)
    if max(ks) > 0:
        load_peft_adapters(engine, peft_model_with_adapters(path, max(ks)), max(ks), RANK)
    bare = AutoModel.from_pretrained(path).eval().to(device, DTYPES[dtype])
    input_ids = torch.tensor(ids, device=device)

    fns = {"bare encoder": lambda: synced(device, lambda: bare(input_ids=input_ids))}
    for k in ks:  # K distinct adapters, each on a run of consecutive rows (fewer where rows < K)
        slots = [engine.empty_slot] * rows if k == 0 else [r * k // rows for r in range(rows)]
        distinct = 0 if k == 0 else len(set(slots))
        fns[f"engine K={distinct}"] = lambda slots=slots: engine.classify(
            ids, slots
        )  # answers reach the host
    matmul, matmul_flops = square_matmul(device, DTYPES[dtype])
    fns["square matmul"] = matmul  # timed in the same rounds: the machine's drift falls on both alike
    with torch.inference_mode():
        seconds = interleaved_medians(fns, args.reps)
    peak = matmul_flops / seconds.pop("square matmul")
    listed = listed_peak(device, dtype)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"model={args.model} device={name} dtype={dtype} rows={rows} length={args.length} "
        f"tokens={rows * args.length} matmul={engine.matmul}"
    )
    print(
        f"measured matmul peak {peak / 1e12:.2f} TFLOP/s"
        + (f"; listed peak {listed / 1e12:.1f} TFLOP/s" if listed else "; no listed peak for this device")
    )
    print(f"{'':<16} {'seq/s':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'of measured':>12} {'of listed':>10}")
    results = {}
    for label, s in seconds.items():
        k = int(label.split("=")[1]) if "=" in label else 0
        flops = pass_flops(engine, rows, args.length, RANK if k else 0)
        achieved = flops / s
        results[label] = {
            "seq_per_s": rows / s,
            "tokens_per_s": rows * args.length / s,
            "tflop_per_s": achieved / 1e12,
            "of_measured_peak": achieved / peak,
            "of_listed_peak": achieved / listed if listed else None,
        }
        r = results[label]
        of_listed = f"{r['of_listed_peak']:.1%}" if listed else "-"
        print(
            f"{label:<16} {r['seq_per_s']:10.1f} {r['tokens_per_s']:12.0f} {r['tflop_per_s']:9.2f} "
            f"{r['of_measured_peak']:12.1%} {of_listed:>10}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "device": name,
                    "dtype": dtype,
                    "rows": rows,
                    "length": args.length,
                    "measured_peak_tflop_per_s": peak / 1e12,
                    "listed_peak_tflop_per_s": listed / 1e12 if listed else None,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
