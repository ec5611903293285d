"""Small random-weight encoders of every family, real PEFT adapters on them, and the golden checks.

A family's test builds its model with the family's own config class (`save_model`), saves PEFT
adapters on it (`tests.peft_factory.save_peft_adapter(..., model_dir=...)`) and calls `check_mixed_batch`
and `check_live_server`: every row of a mixed batch, and a live server's answer, within TOLERANCE
(fp32 probabilities, `tests.device_support`: 1e-5 on the CPU) of `PeftModel` with that adapter alone, the
engines on LORAPLEX_TEST_DEVICE.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, PretrainedConfig

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.peft import AdapterWeights, parse_adapter
from loraplex.engine.core import Engine
from tests.device_support import DEVICE, TOLERANCE
from tests.live_server import LiveServer
from tests.peft_factory import peft_logits, tokenizer

TEXTS = [
    "I love this phone, the battery lasts forever!",
    "ok",
    "Worst customer service I have ever had. Waited two hours on hold and then they hung up on me.",
    "The meeting moved to Thursday at 3pm.",
    "meh",
    "Absolutely fantastic concert last night, the band played every song I wanted to hear",
]


def tiny_config_kwargs() -> dict:
    """Sizes and special tokens shared by every family's test model: 2-4 layers, hidden 64-128."""
    tok = tokenizer()
    return dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)


def save_model(root: Path, config: PretrainedConfig, *, model_class=AutoModel, seed: int = 0) -> Path:
    """A random-weight model of `config`'s family, saved with save_pretrained; the MiniLM tokenizer beside."""
    torch.manual_seed(seed)
    model = model_class.from_config(config).eval()
    out = Path(root)
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def read_adapter(path: Path) -> tuple[dict, list, dict]:
    """A saved adapter's config, labels and tensors."""
    config = json.loads((path / "adapter_config.json").read_text())
    labels = json.loads((path / "labels.json").read_text())
    return config, labels, load_file(path / "adapter_model.safetensors")


def load_adapter(path: Path, engine: Engine) -> AdapterWeights:
    config, labels, tensors = read_adapter(path)
    return parse_adapter(config, tensors, engine.base, labels=labels, max_rank=engine.max_rank)


def check_mixed_batch(model_dir: Path, adapter_dirs: list[Path], group_tokens: list[int | None]) -> None:
    """All adapters in one batch, rows of every length interleaved: each row equals PEFT for its adapter,
    in eager passes and then through the encoder's graphs (captured on CUDA; on the CPU their padded static
    inputs run eagerly)."""
    engine = Engine(model_dir, device=DEVICE, num_slots=len(adapter_dirs), max_rank=64)
    expected = [torch.softmax(peft_logits(path, TEXTS, model_dir), -1) for path in adapter_dirs]
    for slot, path in enumerate(adapter_dirs):
        engine.load_slot(slot, load_adapter(path, engine))
    rows = [(t, s) for t in range(len(TEXTS)) for s in range(len(adapter_dirs))]
    rows = rows[1::2] + rows[::2]
    ids = engine.tokenize(TEXTS)
    for graphs in (False, True):
        if graphs:
            engine.use_graphs(capture=engine.device.type == "cuda")
        for tokens in group_tokens:  # None: one padded pass; small: groups of a few rows
            engine.group_tokens = tokens
            logits = engine.classify([ids[t] for t, _ in rows], [s for _, s in rows])
            for (t, s), row in zip(rows, logits, strict=True):
                want = expected[s][t]
                assert row.shape == want.shape, (adapter_dirs[s].name, row.shape, want.shape)
                diff = (torch.softmax(row, -1) - want).abs().max().item()
                where = f"groups of {tokens}" + (", graphs" if graphs else "")
                assert diff <= TOLERANCE, f"{adapter_dirs[s].name} text {t}: {diff:.2e} ({where})"
    assert engine.model.graphs.graphs, "no pass went through the graphs"
    # The check would be empty if the adapters agreed with each other: they must not.
    assert any(
        (expected[0] - e).abs().max() > 1e-3 for e in expected[1:] if e.shape == expected[0].shape
    ) or (len({e.shape for e in expected}) > 1)


def check_saved_modules_by_shape(model_dir: Path, adapter_dirs: list[Path]) -> None:
    """Every tensor that an adapter saves whole (modules_to_save: the head's layers, a pooler, a norm) is
    checked against the base's own module by its shape: given one more element on its last axis, each is
    refused by name, and the adapter as saved is accepted."""
    engine = Engine(model_dir, device="cpu", num_slots=1)
    checked = 0
    for adapter_dir in adapter_dirs:
        config, labels, tensors = read_adapter(adapter_dir)
        parse_adapter(config, tensors, engine.base, labels=labels, max_rank=engine.max_rank)
        for name, tensor in tensors.items():
            if "lora_" in name or tensor.dim() == 0:
                continue
            wrong = {**tensors, name: torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + 1)}
            with pytest.raises(InvalidAdapterError, match=re.escape(f"'{name}'")):
                parse_adapter(config, wrong, engine.base, labels=labels, max_rank=engine.max_rank)
            checked += 1
    assert checked, "no adapter here saves a module whole"


def check_live_server(model_dir: Path, adapter_dir: Path, store: Path) -> None:
    """`loraplex serve --model DIR`: upload over HTTP, classify, and compare with PEFT."""
    from tests.lifecycle_support import upload

    want = torch.softmax(peft_logits(adapter_dir, TEXTS, model_dir), -1)
    args = [
        "--model",
        str(model_dir),
        "--device",
        DEVICE,
        "--adapter-store",
        str(store),
        "--max-resident",
        "2",
    ]
    with (
        LiveServer(*args) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        response = upload(client, "family-adapter", adapter_dir)
        assert response.status_code == 201, response.text
        answer = client.post("/classify", json={"adapter_id": "family-adapter", "inputs": TEXTS})
        assert answer.status_code == 200, answer.text
        got = torch.tensor([list(r["scores"].values()) for r in answer.json()["results"]])
    assert (got - want).abs().max().item() <= TOLERANCE
