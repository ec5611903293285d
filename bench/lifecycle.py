"""Adapter lifecycle through real servers: upload-to-first-answer, cold loads, many hot adapters on few slots.

    python bench/lifecycle.py --json bench/out/lifecycle.json
    python bench/lifecycle.py --uploads 5 --adapters 16 --requests 100 --concurrency 8   # a quick check

(1) upload-to-first-answer: PUT a fresh rank-8 adapter, then POST /classify with it; time from the start of
the PUT to the classify response. (2) cold-load added latency: a request for an adapter that is in the store
but neither in a device slot nor in the host cache, minus the same request once it is resident.
(3) throughput with `--adapters` hot adapters under Zipf and uniform popularity on 8 slots vs as many slots as
adapters. Each scenario runs its own `loraplex serve` on loopback; clients run in this process, so absolute
numbers include their cost; the ratios compare runs made the same way. `--workers N` is passed to every
`loraplex serve` only when given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

# The repository, not bench/, first on the path, so that `bench` and `tests` import as packages.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import tweets  # noqa: E402
from tests.lifecycle_support import AdapterFactory  # noqa: E402
from tests.live_server import LiveServer  # noqa: E402


def files_of(folder: Path) -> tuple[dict, dict]:
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    return files, {"labels": (folder / "labels.json").read_text()}


def classify(client: httpx.Client, adapter_id: str, texts: list[str]) -> None:
    response = client.post("/classify", json={"adapter_id": adapter_id, "inputs": texts})
    response.raise_for_status()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def upload_to_first_answer(srv: LiveServer, folders: list[Path], text: str) -> dict:
    times, put_times = [], []
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        classify_warm = [text]
        for i, folder in enumerate(folders):
            files, data = files_of(folder)
            started = time.perf_counter()
            response = client.put(f"/adapters/fresh-{i}", files=files, data=data)
            response.raise_for_status()
            put_done = time.perf_counter()
            classify(client, f"fresh-{i}", classify_warm)
            times.append(time.perf_counter() - started)
            put_times.append(put_done - started)
    return {
        "n": len(times),
        "p50_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * percentile(times, 0.9),
        "put_p50_ms": 1000 * statistics.median(put_times),
    }


def cold_load(srv: LiveServer, ids: list[str], text: str) -> dict:
    """Adapters beyond the host cache and slots are cold; the second request for each is warm."""
    cold, warm = [], []
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        for adapter_id in ids:
            started = time.perf_counter()
            classify(client, adapter_id, [text])
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            classify(client, adapter_id, [text])
            warm.append(time.perf_counter() - started)
    return {
        "n": len(ids),
        "cold_p50_ms": 1000 * statistics.median(cold),
        "warm_p50_ms": 1000 * statistics.median(warm),
        "added_p50_ms": 1000 * (statistics.median(cold) - statistics.median(warm)),
    }


async def traffic(url: str, picks: list[str], texts: list[str], concurrency: int) -> float:
    """Send one request per pick with `concurrency` clients; returns requests per second."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for i, adapter_id in enumerate(picks):
        queue.put_nowait((adapter_id, texts[i % len(texts)]))

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            adapter_id, text = queue.get_nowait()
            response = await client.post("/classify", json={"adapter_id": adapter_id, "inputs": text})
            response.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        return len(picks) / (time.perf_counter() - started)


def popularity(ids: list[str], kind: str, n: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) for rank in range(len(ids))] if kind == "zipf" else None
    return random.Random(seed).choices(ids, weights=weights, k=n)


def server(store: Path, slots: int, host_cache: int, extra: list[str]) -> LiveServer:
    args = ["--adapter-store", str(store), "--max-resident", str(slots), "--max-host-cache", str(host_cache)]
    return LiveServer(*args, *extra, ready_timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=30, help="fresh adapters for upload-to-first-answer")
    parser.add_argument("--adapters", type=int, default=64, help="hot adapters for the throughput runs")
    parser.add_argument("--slots", type=int, default=8, help="the few-slots configuration")
    parser.add_argument("--requests", type=int, default=1000, help="requests per throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `loraplex serve` flag")
    parser.add_argument(
        "--workers", type=int, default=None, help="the servers' --workers (default: not passed)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.workers is not None:
        args.serve_arg += ["--workers", str(args.workers)]

    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-lifecycle-"))
    factory = AdapterFactory(r=args.rank, lora_alpha=2 * args.rank)
    count = max(args.uploads, args.adapters)
    folders = [factory.save(work / "adapters" / str(i), seed=i) for i in range(count)]
    texts = tweets(256)
    results: dict = {"rank": args.rank, "adapters": args.adapters, "slots": args.slots}

    # (1) and (2): one server whose host cache and slots are smaller than the set of adapters.
    with server(work / "store-a", args.slots, args.slots, args.serve_arg) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            files, data = files_of(folders[0])
            client.put("/adapters/warmup", files=files, data=data).raise_for_status()
            for _ in range(5):
                classify(client, "warmup", [texts[0]])
        first = results["upload_to_first_answer"] = upload_to_first_answer(
            srv, folders[: args.uploads], texts[1]
        )
        print(f"upload -> first answer: p50 {first['p50_ms']:.1f} ms, p90 {first['p90_ms']:.1f} ms "
              f"(PUT alone p50 {first['put_p50_ms']:.1f} ms)")  # fmt: skip
        # The first uploads have been pushed out of the host cache and the slots by the later ones.
        cold_ids = [f"fresh-{i}" for i in range(max(1, args.uploads - 2 * args.slots))]
        cold = results["cold_load"] = cold_load(srv, cold_ids, texts[2])
        print(f"cold request: p50 {cold['cold_p50_ms']:.1f} ms vs resident {cold['warm_p50_ms']:.1f} ms: "
              f"+{cold['added_p50_ms']:.1f} ms")  # fmt: skip

    # (3): the same adapters and traffic on few slots and on one slot per adapter.
    store = work / "store-b"
    ids = [f"hot-{i}" for i in range(args.adapters)]
    with (
        server(store, args.slots, 4 * args.adapters, args.serve_arg) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as client,
    ):
        for adapter_id, folder in zip(ids, folders, strict=False):
            files, data = files_of(folder)
            client.put(f"/adapters/{adapter_id}", files=files, data=data).raise_for_status()
    throughput: dict = {}
    for slots in (args.slots, args.adapters):
        with server(store, slots, 4 * args.adapters, args.serve_arg) as srv:
            asyncio.run(traffic(srv.url, ids, texts, args.concurrency))  # warm: every adapter once
            for kind in ("zipf", "uniform"):
                picks = popularity(ids, kind, args.requests, seed=1)
                rate = asyncio.run(traffic(srv.url, picks, texts, args.concurrency))
                metrics = httpx.get(srv.url + "/metrics").text
                throughput[f"{kind}_{slots}_slots_rps"] = rate
                print(f"{kind:7s} {args.adapters} adapters on {slots:3d} slots: {rate:7.1f} req/s")
            throughput[f"evictions_{slots}_slots"] = _counter(metrics, "loraplex_slot_evictions")
    for kind in ("zipf", "uniform"):
        ratio = throughput[f"{kind}_{args.slots}_slots_rps"] / throughput[f"{kind}_{args.adapters}_slots_rps"]
        throughput[f"{kind}_ratio"] = ratio
        print(f"{kind:7s} {args.slots} slots / {args.adapters} slots: {ratio:.2f}x")
    results["throughput"] = throughput

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith((f"{name} ", f"{name}_total ")):
            return float(line.split()[1])
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
