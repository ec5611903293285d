"""Adapters of every task in one forward pass: sequence classification (single texts and pairs,
multi-label, regression), token classification, extractive QA and embeddings, K = 8 adapters mixed in one
batch with rows of different lengths; every row equals PEFT with that adapter alone (fp32, 1e-5 on the CPU:
`tests.device_support`)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from loraplex.adapters.peft import parse_adapter
from loraplex.engine.core import Engine
from loraplex.http.inputs import encode
from tests.device_support import DEVICE, TOLERANCE
from tests.peft_factory import tokenizer
from tests.task_support import peft_model, save_task_adapter

TEXTS = [
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "Terrible.",
    "I would like to cancel my subscription before the next billing date, please, and get a refund.",
    "Where is the nearest station?",
]
PAIRS = [("A man is playing a guitar.", "Someone plays music."), ("It rains.", "The sun is out today.")]
QA = [
    ("Who met Macron?", "Angela Merkel met Emmanuel Macron in Paris on Tuesday."),
    ("When is billing?", "The next billing date is the first of the month, after the trial ends."),
]

# name: (task, options of save_task_adapter, the inputs its rows take)
ADAPTERS = {
    "sentiment": ("SEQ_CLS", dict(num_labels=3, seed=11), "texts"),
    "nli": ("SEQ_CLS", dict(num_labels=3, seed=12, target_modules="all-linear", r=4), "pairs"),
    "topics": ("SEQ_CLS", dict(num_labels=5, seed=13, problem_type="multi_label_classification"), "texts"),
    "score": ("SEQ_CLS", dict(num_labels=1, seed=14, problem_type="regression", r=16), "texts"),
    "ner": ("TOKEN_CLS", dict(num_labels=5, seed=15), "texts"),
    "ner-wide": ("TOKEN_CLS", dict(num_labels=9, seed=16, target_modules=("query", "key", "dense")), "texts"),
    "qa": ("QUESTION_ANS", dict(num_labels=2, seed=17, r=2), "qa"),
    "emb": ("FEATURE_EXTRACTION", dict(seed=18, target_modules="all-linear"), "texts"),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-mixed")
    return {name: save_task_adapter(root / name, task, **opts) for name, (task, opts, _) in ADAPTERS.items()}


def inputs(kind: str) -> list:
    return {"texts": TEXTS, "pairs": PAIRS, "qa": QA}[kind]


@functools.cache
def _peft(path, task: str):
    return peft_model(path, task)


def reference(path, task: str, item) -> torch.Tensor:
    """What PEFT gives for one input with this adapter alone, in the engine's per-row shape."""
    model = _peft(path, task)
    batch = tokenizer()(*([item] if isinstance(item, str) else item), return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch)
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        return out.logits[0]
    if task == "QUESTION_ANS":
        return torch.stack([out.start_logits[0], out.end_logits[0]], dim=-1)
    return out.last_hidden_state[0]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_every_task_in_one_forward_pass_matches_peft_alone(adapters, graphs):
    """Eager, and through the encoder's graphs (captured on CUDA; on the CPU their padded static inputs,
    token types included, run eagerly)."""
    engine = Engine(device=DEVICE, num_slots=len(ADAPTERS))
    if graphs:
        engine.use_graphs(capture=engine.device.type == "cuda")
    slots = {}
    for slot, (name, path) in enumerate(adapters.items()):
        config = json.loads((path / "adapter_config.json").read_text())
        engine.load_slot(
            slot, parse_adapter(config, load_file(path / "adapter_model.safetensors"), engine.base)
        )
        slots[name] = slot
    plan = [(name, item) for name, (_, _, kind) in ADAPTERS.items() for item in inputs(kind)]
    plan = plan[::2] + plan[1::2]  # interleave the tasks, so that groups hold rows of several of them
    rows = [encode(engine.tokenizer, 512, [item])[0] for _, item in plan]
    assert len({len(row) for row in rows}) > 5, "rows of different lengths"
    mixed = engine.classify(rows, [slots[name] for name, _ in plan])
    assert {engine.slot_task[slots[name]] for name, _ in plan} == {
        "SEQ_CLS",
        "TOKEN_CLS",
        "QUESTION_ANS",
        "FEATURE_EXTRACTION",
    }
    for (name, item), got in zip(plan, mixed, strict=True):
        want = reference(adapters[name], ADAPTERS[name][0], item)
        assert got.shape == want.shape, (name, item)
        got, want = answered(name, got), answered(name, want)
        error = ((got - want).abs() / want.abs().clamp(min=1)).max()  # relative where values exceed 1
        assert error <= TOLERANCE, (name, item, error)
    if graphs:
        assert engine.model.graphs.graphs, "no pass went through the graphs"


def answered(name: str, logits: torch.Tensor) -> torch.Tensor:
    """What the routes answer from a row: probabilities (over labels; over tokens for QA's start and end),
    a sigmoid per label for multi-label, the raw values for regression and embeddings."""
    task, opts, _ = ADAPTERS[name]
    problem = opts.get("problem_type")
    if task == "FEATURE_EXTRACTION" or problem == "regression":
        return logits
    if problem == "multi_label_classification":
        return logits.sigmoid()
    return logits.softmax(dim=0 if task == "QUESTION_ANS" else -1)
