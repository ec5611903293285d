"""The golden test: a mixed batch gives every row what PEFT gives for that row's adapter alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.adapters.peft import AdapterWeights, parse_adapter
from loraplex.engine.core import Engine
from tests.device_support import DEVICE, TOLERANCE, tolerance
from tests.peft_factory import ALL_LINEAR, peft_logits, save_peft_adapter

TEXTS = [
    "I love this phone, the battery lasts forever!",
    "ok",
    "Worst customer service I have ever had. Waited two hours on hold and then they hung up on me.",
    "The meeting moved to Thursday at 3pm.",
    "meh",
    "Absolutely fantastic concert last night, the band played every song I wanted to hear",
]

# Eight adapters that differ in every way the config allows: rank 1..64, target sets, rsLoRA,
# rank/alpha patterns, layer selection, regex targets, 2, 3 and 7 labels.
SPECS = [
    dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, num_labels=3),
    dict(r=64, lora_alpha=32, target_modules=["query", "value"], num_labels=7, use_rslora=True),
    dict(r=1, lora_alpha=4, target_modules=["dense"], num_labels=2),
    dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL_LINEAR,
        num_labels=3,
        rank_pattern={"intermediate.dense": 16},
        alpha_pattern={"value": 2},
    ),
    dict(r=16, lora_alpha=16, target_modules=r".*\.layer\.[0-2]\..*(query|key)", num_labels=2),
    dict(r=2, lora_alpha=8, target_modules=["query", "value"], num_labels=7, layers_to_transform=[1, 4]),
    dict(r=32, lora_alpha=64, target_modules="all-linear", num_labels=3, use_rslora=True),
    dict(r=8, lora_alpha=8, target_modules=["key", "dense"], num_labels=2, exclude_modules=["pooler.dense"]),
]


def load_adapter(path: Path, engine: Engine) -> AdapterWeights:
    config = json.loads((path / "adapter_config.json").read_text())
    labels = json.loads((path / "labels.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    return parse_adapter(config, tensors, engine.base, labels=labels, max_rank=engine.max_rank)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device=DEVICE, num_slots=8, max_rank=64)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, engine):
    """(path, AdapterWeights, PEFT probabilities for TEXTS) per spec."""
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for i, spec in enumerate(SPECS):
        path = save_peft_adapter(root / f"a{i}", seed=i, **spec)
        out.append((path, load_adapter(path, engine), torch.softmax(peft_logits(path, TEXTS), -1)))
    return out


@pytest.mark.parametrize("group_tokens", [None, 40])  # None: one padded pass; 40: groups of 1-4 rows
@pytest.mark.parametrize("k", [1, 3, 8])
def test_mixed_batch_matches_peft_per_adapter(engine, adapters, k, group_tokens, monkeypatch):
    monkeypatch.setattr(engine, "group_tokens", group_tokens)
    chosen = list(range(8))[:k] if k != 3 else [1, 2, 6]
    for slot, a in enumerate(chosen):
        engine.load_slot(slot, adapters[a][1])
    # Every (text, adapter) pair once, interleaved so neighbouring rows use different adapters and lengths.
    rows = [(t, s) for t in range(len(TEXTS)) for s in range(k)]
    rows = rows[1::2] + rows[::2]
    ids = engine.tokenize(TEXTS)
    logits = engine.classify([ids[t] for t, _ in rows], [s for _, s in rows])
    for (t, s), row in zip(rows, logits, strict=True):
        expected = adapters[chosen[s]][2][t]
        assert row.shape == expected.shape
        assert (torch.softmax(row, -1) - expected).abs().max().item() <= TOLERANCE


def test_lora_delta_is_material(engine, adapters):
    """The golden test would be empty if LoRA did nothing: the same head without LoRA must differ."""
    _, weights, expected = adapters[0]
    head_only = AdapterWeights(
        modules={},
        head=weights.head,
        num_labels=weights.num_labels,
        labels=weights.labels,
        rank=1,
        lora_alpha=1.0,
        target_modules=(),
    )
    engine.load_slot(0, head_only)
    got = torch.softmax(torch.stack(engine.classify(engine.tokenize(TEXTS), [0] * len(TEXTS))), -1)
    assert (got - expected).abs().max().item() > 1e-3


def test_cleared_slot_contributes_nothing(engine, adapters):
    big, small = adapters[1], adapters[2]  # rank 64 on q/v, then rank 1 on dense
    engine.load_slot(5, big[1])
    engine.clear_slot(5)
    for tensor in engine.model.buffers():
        if tensor.dim() >= 2 and tensor.shape[0] == engine.num_slots + 1:
            assert not tensor[5].any()
    assert engine.slot_labels[5] == 0
    engine.load_slot(5, big[1])
    engine.load_slot(5, small[1])  # a smaller adapter over a bigger one leaves nothing of the first
    got = torch.softmax(torch.stack(engine.classify(engine.tokenize(TEXTS), [5] * len(TEXTS))), -1)
    assert (got - small[2]).abs().max().item() <= TOLERANCE


def test_empty_slot_equals_base_model(engine):
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(engine.tokenizer.name_or_path).eval()
    batch = engine.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        pooled = bert(**batch).pooler_output
        lora = engine.model.batch([engine.empty_slot] * len(TEXTS), engine.slot_rank)
        mask = batch["attention_mask"].bool().to(engine.device)
        ours = engine.model.encode(batch["input_ids"].to(engine.device), mask, lora).cpu()
    assert (ours - pooled).abs().max().item() <= TOLERANCE


def test_tokenize_truncates_or_names_the_input(engine):
    from loraplex.adapters.errors import InvalidInputError

    long_text = "word " * 600
    ids = engine.tokenize(["short", long_text])
    assert len(ids[1]) == engine.base.max_length == 512
    assert ids[1][0] == engine.tokenizer.cls_token_id and ids[1][-1] == engine.tokenizer.sep_token_id
    with pytest.raises(InvalidInputError, match=r"Input 1 has \d+ tokens"):
        engine.tokenize(["short", long_text], truncate=False)


def test_limits_checked_when_loading(adapters):
    from loraplex.adapters.errors import InvalidAdapterError

    small = Engine(device="cpu", num_slots=2, max_rank=8, max_labels=4)
    with pytest.raises(InvalidAdapterError, match="rank 64"):
        small.load_slot(0, adapters[1][1])
    with pytest.raises(InvalidAdapterError, match="7 labels"):
        small.load_slot(0, adapters[5][1])
    with pytest.raises(IndexError):
        small.load_slot(2, adapters[0][1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_matches_peft(adapters, dtype):
    tol = tolerance(getattr(torch, dtype), "cuda")
    gpu = Engine(device="cuda", dtype=dtype, num_slots=8, max_rank=64)
    for slot, (_, weights, _) in enumerate(adapters):
        gpu.load_slot(slot, weights)
    ids = gpu.tokenize(TEXTS)
    rows = [(t, s) for t in range(len(TEXTS)) for s in range(8)]
    logits = gpu.classify([ids[t] for t, _ in rows], [s for _, s in rows])
    for (t, s), row in zip(rows, logits, strict=True):
        assert (torch.softmax(row, -1) - adapters[s][2][t]).abs().max().item() <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_serves_in_bfloat16_unless_told_otherwise():
    assert Engine(device="cuda", dtype="auto", num_slots=1, max_rank=4).dtype == "bfloat16"


def test_each_row_owns_its_memory_not_the_whole_batchs(engine, tmp_path):
    """A request keeps its rows until all are done; a row that were a view of the batch's host tensor would
    keep every other row's embeddings alive with it."""
    from tests.task_support import save_task_adapter

    folder = save_task_adapter(tmp_path / "emb", "FEATURE_EXTRACTION", seed=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = parse_adapter(config, load_file(folder / "adapter_model.safetensors"), engine.base, max_rank=64)
    engine.load_slot(0, weights)
    try:
        ids = engine.tokenize(["a short one", "a much longer text about the weather " * 4, "mid length text"])
        rows = engine.classify(ids, [0, 0, 0])
    finally:
        engine.clear_slot(0)
    for row, tokens in zip(rows, ids, strict=True):
        assert row.shape == (len(tokens), engine.base.hidden_size)
        assert row.untyped_storage().nbytes() == row.numel() * row.element_size()


@pytest.mark.skipif(DEVICE != "cpu", reason="the thread count of a pass is the CPU's")
def test_a_small_pass_runs_on_one_thread_and_the_caller_keeps_its_threads(engine, monkeypatch):
    import loraplex.engine.core as core

    seen = []
    hook = engine.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = engine.tokenize(["ok"])  # 3 tokens of MiniLM: above the limit, so every thread takes part
        engine.classify(ids, [engine.empty_slot])
        monkeypatch.setattr(core, "CPU_SMALL_PASS_FLOPS", 3 * engine.flops_per_token + 1)
        small = engine.classify(ids, [engine.empty_slot])
        assert seen == [2, 1]
        assert torch.get_num_threads() == 2  # restored for whatever the caller runs next
        monkeypatch.setattr(core, "CPU_SMALL_PASS_FLOPS", 0)
        torch.testing.assert_close(engine.classify(ids, [engine.empty_slot])[0], small[0])
    finally:
        hook.remove()
        torch.set_num_threads(threads)
