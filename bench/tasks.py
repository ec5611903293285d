"""A mixed-task load through one server against the same load as classification only, back to back.

    python bench/tasks.py --json bench/out/tasks.json             # 64 adapters, 64 clients, 20 s each
    python bench/tasks.py --adapters 8 --clients 8 --seconds 4 --warmup 1   # quick check

Two live servers, one after the other, each with K rank-8 adapters (LoRA on query, key, value and every
dense layer; a head each) and the same closed-loop clients as bench/serving.py (one tweet per request, the
next request as soon as the answer comes):

- mixed: half the adapters sequence classification, a fifth token classification, a fifth extractive QA,
  a tenth embeddings; each request picks its task with those weights (50% /classify, 20% /tokens, 20%
  /answer with the tweet as context, 10% /embed), then an adapter of that task;
- classification only: K sequence-classification adapters, every request /classify.

Per server: requests/s, p50 and p99 latency. The ratio mixed / classification-only is what serving the
other tasks in the same batches costs. `--workers N` is passed to `loraplex serve` only when given.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # `bench` and `tests` import as packages

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from bench.common import closed_loop, tweets  # noqa: E402
from tests.live_server import LiveServer  # noqa: E402
from tests.task_support import save_task_adapter  # noqa: E402

TARGETS = ("query", "key", "value", "dense")
# task: (share of the adapters and of the requests, route)
MIX = {
    "SEQ_CLS": (0.5, b"/classify"),
    "TOKEN_CLS": (0.2, b"/tokens"),
    "QUESTION_ANS": (0.2, b"/answer"),
    "FEATURE_EXTRACTION": (0.1, b"/embed"),
}
QUESTION = "What is this about?"


def adapters_for(root: Path, k: int, rank: int, mixed: bool) -> dict[str, tuple[str, Path]]:
    """name -> (task, folder): K adapters, split as MIX says (at least one per task) or all SEQ_CLS."""
    counts = {task: max(1, round(share * k)) for task, (share, _) in MIX.items()} if mixed else {}
    counts["SEQ_CLS"] = k - sum(n for task, n in counts.items() if task != "SEQ_CLS")
    out = {}
    for task, n in counts.items():
        for i in range(n):
            name = f"{task.lower()}-{i}"
            labels = {"TOKEN_CLS": 5, "QUESTION_ANS": 2}.get(task, 3)
            folder = save_task_adapter(
                root / name, task, num_labels=labels, seed=len(out), r=rank, target_modules=TARGETS
            )
            out[name] = (task, folder)
    return out


def request_maker(adapters: dict[str, tuple[str, Path]], texts: list[str]):
    by_task = {task: [n for n, (t, _) in adapters.items() if t == task] for task in MIX}
    tasks = [task for task in MIX if by_task[task]]
    weights = [MIX[task][0] for task in tasks]

    def request(rng) -> tuple[bytes, dict]:
        task = rng.choices(tasks, weights)[0]
        adapter, text = rng.choice(by_task[task]), rng.choice(texts)
        if task == "QUESTION_ANS":
            return MIX[task][1], {"adapter_id": adapter, "inputs": {"question": QUESTION, "context": text}}
        return MIX[task][1], {"adapter_id": adapter, "inputs": text}

    return request


def measure(root: Path, adapters, texts, args) -> dict:
    preload = [arg for name, (_, folder) in adapters.items() for arg in ("--preload", f"{name}={folder}")]
    server = LiveServer(
        "--adapter-store", str(root), "--max-resident", str(len(adapters)), "--max-rank", str(args.rank),
        "--max-queued", str(max(1024, 4 * args.clients)), "--log-level", "warning", *preload,
        *(("--workers", str(args.workers)) if args.workers is not None else ()),
    )  # fmt: skip
    with server:
        latencies, failures = asyncio.run(
            closed_loop(
                server.port,
                args.clients,
                [],
                texts,
                args.warmup,
                args.seconds,
                request_maker(adapters, texts),
            )
        )
    if len(latencies) < 2:
        raise SystemExit(f"{len(latencies)} requests finished in the window; give more --seconds")
    return {
        "requests_per_s": len(latencies) / args.seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98],
        "failures": failures,
    }


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
    parser.add_argument(
        "--workers", type=int, default=None, help="the servers' --workers (default: not passed)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="loraplex-bench-tasks-"))
    texts = tweets(args.texts)
    print(
        f"adapters={args.adapters} rank={args.rank} clients={args.clients} seconds={args.seconds}", flush=True
    )
    results = {}
    for name, mixed in (("mixed tasks", True), ("classification only", False)):
        adapters = adapters_for(root / name.replace(" ", "-") / "adapters", args.adapters, args.rank, mixed)
        store = root / name.replace(" ", "-") / "store"
        results[name] = r = measure(store, adapters, texts, args)
        counts = {task: sum(t == task for t, _ in adapters.values()) for task in MIX}
        print(
            f"  {name:<20} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p99 {r['p99_ms']:7.1f} ms  failures {r['failures']}  adapters {counts}",
            flush=True,
        )
    ratio = results["mixed tasks"]["requests_per_s"] / results["classification only"]["requests_per_s"]
    print(f"  mixed / classification only: {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=2))
    return 1 if any(r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
