"""Serving throughput and latency: N closed-loop clients against a live `loraplex serve` with K adapters.

    python bench/serving.py --json bench/out/serving.json   # 64 rank-8 all-linear adapters; 64, 32 clients
    python bench/serving.py --device cuda --dtype bfloat16 --clients 256,64 --workers 4   # a GPU server
    python bench/serving.py --adapters 4 --clients 4,2 --seconds 3 --warmup 1 --engine-reps 3  # quick check

Each client sends one real tweet per request, for an adapter drawn uniformly from the K, and sends the next
request as soon as the answer arrives. Per load level: requests/s over `--seconds` (after `--warmup`), p50,
p95 and p99 latency, the mean batch the server formed (from its /metrics), and, over the measuring window,
the CPU the server's whole process tree used per request and the CPU the load generator (this process)
used, in cores. In the same run, before the server starts: engine-only throughput on the same texts and
adapters, in this process on a worker thread (as the server runs it), in batches of `--max-batch-size`
rows in corpus order, each row for the next adapter. The server/engine ratio is what HTTP, queueing and
batching cost or save. Clients speak HTTP/1.1 over asyncio streams to keep their own CPU use small; they
share the machine's cores with the server. `--workers N` is passed to `loraplex serve` (its HTTP worker
processes) only when given.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository, not bench/, first on the path, so that `bench` and `tests` import as packages.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

from bench.common import CpuWindow, closed_loop, median_seconds, tweets  # noqa: E402
from tests.live_server import LiveServer  # noqa: E402
from tests.serving_support import metrics, sample  # noqa: E402

ALL_LINEAR = ["query", "key", "value", "dense"]


def make_adapters(root: Path, k: int, rank: int) -> list[Path]:
    from tests.lifecycle_support import AdapterFactory

    factory = AdapterFactory(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR)
    return [factory.save(root / f"a{i}", seed=i) for i in range(k)]


def engine_only(
    folders: list[Path], texts: list[str], rows: int, rank: int, reps: int, device: str | None, dtype: str
) -> float:
    """Rows per second of the engine alone on `rows`-row batches, each row for a different adapter (no
    `folders`: every row on the base model, no adapter)."""
    import torch
    from safetensors.torch import load_file

    from loraplex.adapters.peft import parse_adapter
    from loraplex.engine.core import Engine

    engine = Engine(device=device, dtype=dtype, num_slots=max(1, len(folders)), max_rank=rank)
    for slot, folder in enumerate(folders):
        config = json.loads((folder / "adapter_config.json").read_text())
        labels = json.loads((folder / "labels.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        engine.load_slot(slot, parse_adapter(config, tensors, engine.base, labels=labels, max_rank=rank))
    ids = engine.tokenize(texts)
    batches = [
        (
            [ids[(start + i) % len(ids)] for i in range(rows)],
            [(start + i) % len(folders) if folders else engine.empty_slot for i in range(rows)],
        )
        for start in range(0, len(ids), rows)
    ]
    position = 0

    def one_batch() -> None:
        nonlocal position
        engine.classify(*batches[position % len(batches)])
        position += 1

    def measure() -> None:
        with torch.inference_mode():
            result.append(median_seconds(one_batch, reps))

    # On a worker thread, as the server's batcher runs it: torch's intra-op threading behaves differently
    # on the main thread (on a busy 2-core machine, several times slower).
    result: list[float] = []
    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    return rows / result[0]


def batch_stats(url: str) -> tuple[float, float]:
    """Rows and batches the server has run so far."""
    samples = metrics(url)
    return sample(samples, "loraplex_batch_size_sum"), sample(samples, "loraplex_batch_size_count")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=64, help="K distinct adapters")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", default="64,32", help="load levels: concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring window per load level")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each window")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--texts", type=int, default=512, help="distinct tweets to draw from")
    parser.add_argument("--engine-reps", type=int, default=9)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", help="the server's --dtype")
    parser.add_argument(
        "--workers", type=int, default=None, help="the server's --workers (default: not passed)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]

    root = Path(tempfile.mkdtemp(prefix="loraplex-bench-http-"))
    folders = make_adapters(root / "adapters", args.adapters, args.rank)
    texts = tweets(args.texts)
    engine_rows_per_s = engine_only(
        folders, texts, args.max_batch_size, args.rank, args.engine_reps, args.device, args.dtype
    )
    print(f"adapters={args.adapters} rank={args.rank} all-linear, texts={len(texts)} tweets")
    print(f"engine only: {engine_rows_per_s:.1f} rows/s in batches of {args.max_batch_size}", flush=True)

    preload = [arg for i, folder in enumerate(folders) for arg in ("--preload", f"a{i}={folder}")]
    server = LiveServer(
        "--adapter-store", str(root / "store"), "--max-resident", str(args.adapters),
        "--max-rank", str(args.rank), "--max-batch-size", str(args.max_batch_size),
        "--max-wait-ms", str(args.max_wait_ms), "--max-queued", str(max(1024, 4 * max(levels))),
        "--log-level", "warning", "--dtype", args.dtype, *preload,
        *(("--device", args.device) if args.device else ()),
        *(("--workers", str(args.workers)) if args.workers is not None else ()),
    )  # fmt: skip
    results = []
    with server:
        names = [f"a{i}" for i in range(args.adapters)]
        for clients in levels:
            rows_before, batches_before = batch_stats(server.url)
            window = CpuWindow(server.proc.pid)
            latencies, failures = asyncio.run(
                closed_loop(server.port, clients, names, texts, args.warmup, args.seconds, window=window)
            )
            rows_after, batches_after = batch_stats(server.url)
            if len(latencies) < 2:
                raise SystemExit(f"{len(latencies)} requests finished in the window; give more --seconds")
            percentiles = statistics.quantiles(latencies, n=100)
            level = {
                "clients": clients,
                "requests": len(latencies),
                "failures": failures,
                "requests_per_s": len(latencies) / args.seconds,
                "p50_ms": 1000 * statistics.median(latencies),
                "p95_ms": 1000 * percentiles[94],
                "p99_ms": 1000 * percentiles[98],
                "mean_batch_rows": (rows_after - rows_before) / max(batches_after - batches_before, 1),
                "server_cpu_us_per_request": 1e6 * window.server_cpu_s / len(latencies),
                "server_cores": window.server_cores,
                "load_generator_cores": window.load_generator_cores,
            }
            level["vs_engine_only"] = level["requests_per_s"] / engine_rows_per_s
            level["p99_over_p50"] = level["p99_ms"] / level["p50_ms"]
            results.append(level)
            print(
                f"clients={clients:<4} {level['requests_per_s']:7.1f} req/s  p50 {level['p50_ms']:7.1f} ms  "
                f"p95 {level['p95_ms']:7.1f} ms  p99 {level['p99_ms']:7.1f} ms  "
                f"batch {level['mean_batch_rows']:5.1f} rows  x{level['vs_engine_only']:.2f} of engine-only  "
                f"server {level['server_cpu_us_per_request']:.0f} us CPU/req "
                f"({level['server_cores']:.2f} cores)  "
                f"load generator {level['load_generator_cores']:.2f} cores  failures {failures}",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "adapters": args.adapters,
            "rank": args.rank,
            "target_modules": ALL_LINEAR,
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "device": args.device,
            "dtype": args.dtype,
            "workers": args.workers,
            "seconds": args.seconds,
            "engine_only_rows_per_s": engine_rows_per_s,
            "levels": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(level["failures"] for level in results) else 0


if __name__ == "__main__":
    sys.exit(main())
