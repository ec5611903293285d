"""PEFT LoRA adapters for sequence classification: config semantics and tensor layout.

`parse_adapter` turns a PEFT `adapter_config.json` (as a dict) and the tensors of its
`adapter_model.safetensors` into `AdapterWeights`, the form the engine writes into a slot.
It applies PEFT's rules exactly (target matching, rank/alpha patterns, rsLoRA, layer
selection) and rejects anything that would change the math with an `InvalidAdapterError`
naming the field, key or shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter must fit: the shapes and module names of the frozen base model."""

    prefix: str  # attribute of the encoder inside the PEFT model, e.g. "bert"
    hidden_size: int
    num_layers: int
    max_length: int  # tokens, [CLS] and [SEP] included
    # LoRA-capable linear layers, path relative to the encoder -> (in_features, out_features),
    # e.g. "encoder.layer.0.attention.self.query" -> (384, 384), "pooler.dense" -> (384, 384)
    targets: dict[str, tuple[int, int]]
    # every module name of the classification model as PEFT sees it ("bert.embeddings", "classifier", ...)
    module_names: tuple[str, ...]


@dataclass(frozen=True)
class LoraModule:
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, fp32 on the CPU, ready to be written into an engine slot."""

    modules: dict[str, LoraModule]  # keyed like BaseSpec.targets
    classifier_weight: torch.Tensor  # [num_labels, hidden]
    classifier_bias: torch.Tensor  # [num_labels]
    labels: tuple[str, ...]  # len == num_labels, in head order
    rank: int  # largest r over modules
    lora_alpha: float
    target_modules: tuple[str, ...]  # short names of the targeted layers, e.g. ("query", "value")

    @property
    def num_labels(self) -> int:
        return int(self.classifier_weight.shape[0])
