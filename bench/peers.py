"""loraplex against the PEFT servers a user would write, measured back to back in one run.

    python bench/peers.py --json bench/out/peers.json          # 64 rank-8 adapters, 64 clients, 3 x 20 s each
    python bench/peers.py --adapters 8 --clients 8 --seconds 5 --warmup 2 --rounds 1    # quick check

The same K adapters (rank-8 LoRA on every linear layer, a head each), the same tweets and the same
closed-loop clients (bench/serving.py: one tweet per request, a random adapter, the next request as soon as
the answer comes) against, on the same machine, all started at once and measured one at a time in
`--rounds` rounds (so that the machine's drift falls on every server alike; each ratio is the median of
the rounds' own):

- loraplex (`loraplex serve`, `--dtype` as given);
- a FastAPI server micro-batching into PEFT's mixed-adapter mode (5 ms window, <= 64 rows);
- a serial FastAPI + PEFT server (set_adapter and forward per request).

The peers are bench/peer_server.py. Per server: requests/s, p50 and p99 latency, the CPU the server's
process tree used per request, and the CPU the load generator itself used (in cores, since it shares the
machine), both over the measuring window. `--workers N` is passed to `loraplex serve` only when given.

In each round, in the same run and on the same tweets, loraplex's engine alone in 64-row batches (no HTTP, no
queue; bench/serving.py's engine-only): with the K adapters, and with no adapter at all. The second is
the most any loraplex server could answer here in that precision, so its ratio to a peer is the ceiling of
loraplex's: `--engine-reps 0` leaves these out.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `bench` and `tests` import as packages

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from bench.common import CpuWindow, closed_loop, tweets  # noqa: E402
from bench.serving import engine_only, make_adapters  # noqa: E402
from tests.live_server import LiveServer  # noqa: E402


def measure(
    server: LiveServer, clients: int, names: list[str], texts: list[str], warmup: float, seconds: float
):
    window = CpuWindow(server.proc.pid)
    latencies, failures = asyncio.run(
        closed_loop(server.port, clients, names, texts, warmup, seconds, window=window)
    )
    if len(latencies) < 2:
        raise SystemExit(f"{len(latencies)} requests finished in the window; give more --seconds")
    return {
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        "failures": failures,
        "server_cpu_us_per_request": 1e6 * window.server_cpu_s / len(latencies),
        "load_generator_cores": window.load_generator_cores,
    }


def ratios(rounds: list[dict], ours: str, theirs: str) -> list[float]:
    """Each round's ratio of `ours` to `theirs`."""
    return [r[ours]["requests_per_s"] / r[theirs]["requests_per_s"] for r in rounds]


def show(each: list[float]) -> str:
    return f"{statistics.median(each):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in each)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--dtype", default="float32", help="loraplex's --dtype")
    parser.add_argument("--peer-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--workers", type=int, default=None, help="loraplex's --workers (default: not passed)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every server once")
    parser.add_argument(
        "--engine-reps", type=int, default=5, help="batches timed for each engine-alone figure; 0: none"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="loraplex-bench-peers-"))
    folders = make_adapters(root / "adapters", args.adapters, args.rank)
    names = [f"a{i}" for i in range(args.adapters)]
    texts = tweets(args.texts)
    preload = [
        arg for name, folder in zip(names, folders, strict=True) for arg in ("--preload", f"{name}={folder}")
    ]
    servers = {
        "loraplex": LiveServer(
            "--adapter-store", str(root / "store"), "--max-resident", str(args.adapters),
            "--max-rank", str(args.rank), "--max-queued", str(max(1024, 4 * args.clients)),
            "--log-level", "warning", "--dtype", args.dtype, *preload,
            *(("--workers", str(args.workers)) if args.workers is not None else ()),
        ),
        "peft micro-batching": LiveServer(
            "--mode", "microbatch", "--dtype", args.peer_dtype, *preload, module="bench.peer_server",
            ready_timeout=600,
        ),
        "peft serial": LiveServer(
            "--mode", "serial", "--dtype", args.peer_dtype, *preload, module="bench.peer_server",
            ready_timeout=600,
        ),
    }  # fmt: skip
    print(
        f"adapters={args.adapters} rank={args.rank} clients={args.clients} seconds={args.seconds} "
        f"loraplex dtype={args.dtype} peers dtype={args.peer_dtype} cores={os.cpu_count()}",
        flush=True,
    )
    rounds: list[dict] = []
    with contextlib.ExitStack() as stack:
        for server in servers.values():  # all up at once; one is measured at a time, the others idle
            stack.enter_context(server)
        for number in range(1, args.rounds + 1):
            print(f"round {number}", flush=True)
            results: dict = {}
            for name, server in servers.items():
                results[name] = r = measure(server, args.clients, names, texts, args.warmup, args.seconds)
                print(
                    f"  {name:<30} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                    f"p99 {r['p99_ms']:7.1f} ms  failures {r['failures']}  "
                    f"server {r['server_cpu_us_per_request']:.0f} us CPU/req  "
                    f"load generator {r['load_generator_cores']:.2f} cores",
                    flush=True,
                )
            if args.engine_reps:
                alone = {
                    f"engine alone, {args.adapters} adapters": folders,
                    "engine alone, no adapter": [],
                }
                for name, folders_of in alone.items():
                    rows_per_s = engine_only(
                        folders_of, texts, 64, args.rank, args.engine_reps, None, args.dtype
                    )
                    results[name] = {"requests_per_s": rows_per_s}
                    print(f"  {name:<30} {rows_per_s:7.1f} rows/s", flush=True)
            rounds.append(results)
    # Each round's ratios (its servers measured minutes apart at most), then their median over the rounds.
    peer = "peft micro-batching"
    summary = {}
    print(f"medians of {args.rounds} rounds:")
    for name in rounds[0]:
        summary[name] = {"requests_per_s": statistics.median(r[name]["requests_per_s"] for r in rounds)}
        line = f"  {name:<30} {summary[name]['requests_per_s']:7.1f}/s"
        if name != peer:
            each = ratios(rounds, name, peer)
            summary[name]["over_micro_batching"] = statistics.median(each)
            line += f"  / {peer}: {show(each)}"
        print(line)
    each = ratios(rounds, "loraplex", "peft serial")
    summary["loraplex"]["over_serial"] = statistics.median(each)
    print(f"  loraplex / peft serial: {show(each)}")
    results = {"rounds": rounds, "medians": summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2)
        )
    return 1 if any(r.get("failures") for round_ in rounds for r in round_.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
