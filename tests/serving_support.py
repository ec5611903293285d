"""Shared pieces of the serving tests: real PEFT adapters, a reference engine, metrics, a live server."""

from __future__ import annotations

import atexit
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from loraplex.adapters.peft import parse_adapter
from loraplex.engine.core import Engine
from tests.live_server import LiveServer
from tests.peft_factory import ALL_LINEAR, save_peft_adapter

# Adapters of different ranks, targets, label counts and scalings, so cross-talk would show.
ADAPTER_SPECS = {
    "sent": dict(r=8, target_modules=["query", "value"], num_labels=3, seed=0),
    "topic": dict(r=4, target_modules=ALL_LINEAR, num_labels=2, seed=1),
    "intent": dict(r=16, lora_alpha=32, target_modules=["query", "key", "value"], num_labels=5, seed=2),
    "rs": dict(r=8, target_modules=["query", "value"], num_labels=3, seed=3, use_rslora=True),
    "dense": dict(r=2, target_modules=["dense"], num_labels=4, seed=4),
    "tox": dict(r=8, target_modules=["query", "value"], num_labels=3, seed=5),
}

TEXTS = [
    "The service was quick and the food was excellent.",
    "Terrible.",
    "I would like to cancel my subscription before the next billing date, please.",
    "ok",
    "The quarterly report shows revenue up 12% while costs stayed flat across all regions.",
    "Why does my package say delivered when nothing arrived at the door?",
    "lol",
    "An unexpectedly moving film about a lighthouse keeper and the sea.",
]
LONG_TEXT = " ".join(f"word{i}" for i in range(700))  # well over 512 tokens


@lru_cache(maxsize=1)
def adapter_dirs() -> dict[str, Path]:
    """The PEFT adapters of ADAPTER_SPECS, saved once per test process."""
    root = Path(tempfile.mkdtemp(prefix="loraplex-serving-adapters-"))
    return {name: save_peft_adapter(root / name, **spec) for name, spec in ADAPTER_SPECS.items()}


@lru_cache(maxsize=1)
def overflowing_adapter() -> Path:
    """A PEFT adapter with finite weights (lora_B ~1e30) whose activations overflow float32."""
    folder = save_peft_adapter(Path(tempfile.mkdtemp(prefix="loraplex-overflow-")) / "overflow", seed=9)
    path = folder / "adapter_model.safetensors"
    tensors = {k: v * 1e30 if "lora_B" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)
    return folder


def preload_args(names: list[str] | None = None) -> list[str]:
    args = []
    for name, folder in adapter_dirs().items():
        if names is None or name in names:
            args += ["--preload", f"{name}={folder}"]
    return args


class Reference:
    """An in-process engine with every test adapter in its own slot: what the server must answer."""

    def __init__(self):
        dirs = adapter_dirs()
        self.engine = Engine(num_slots=len(dirs))
        self.slot = {}
        self.labels = {}
        for slot, (name, folder) in enumerate(dirs.items()):
            labels = json.loads((folder / "labels.json").read_text())
            config = json.loads((folder / "adapter_config.json").read_text())
            tensors = load_file(folder / "adapter_model.safetensors")
            weights = parse_adapter(config, tensors, self.engine.base, labels=labels, max_rank=64)
            self.engine.load_slot(slot, weights)
            self.slot[name] = slot
            self.labels[name] = labels

    def logits(self, name: str, texts: list[str]) -> torch.Tensor:
        """`[len(texts), num_labels]` from one forward pass of the engine."""
        ids = self.engine.tokenize(texts, truncate=True)
        return torch.stack(self.engine.classify(ids, [self.slot[name]] * len(texts)))


@lru_cache(maxsize=1)
def reference() -> Reference:
    return Reference()


def scores_of(body: dict, labels: list[str]) -> torch.Tensor:
    """`[len(results), num_labels]` from a /classify response, checking each result's label order."""
    rows = []
    for result in body["results"]:
        assert list(result["scores"]) == labels
        rows.append([result["scores"][label] for label in labels])
    return torch.tensor(rows, dtype=torch.float64)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted label items): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@lru_cache(maxsize=1)
def main_server() -> LiveServer:
    """One server for test_serving.py and test_bad_input.py: seven adapters, only four engine slots."""
    store = tempfile.mkdtemp(prefix="loraplex-serving-store-")
    server = LiveServer(
        "--adapter-store", store, "--max-resident", "4", "--metrics-max-adapters", "3",
        "--max-body-bytes", "262144", *preload_args(), "--preload", f"overflow={overflowing_adapter()}",
    )  # fmt: skip
    server.start()
    atexit.register(server.stop)
    return server
