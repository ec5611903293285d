"""Encoder families: one module per family, picked once from `config.model_type`.

Each family module holds everything that differs between encoders and nothing that does not (the LoRA
op, slot tensors, stacked heads and length grouping are shared code):

    MODEL_TYPES      the `config.model_type` values it serves, e.g. ("roberta", "xlm-roberta")
    PREFIX           attribute of the encoder in the family's ...ForSequenceClassification model ("bert")
    DEFAULT_TARGETS  PEFT's default `target_modules` for it (used when a config names none, and by train)
    head(config)     the classification head after pooling, as `loraplex.heads` stages
    max_length(config)  the longest input its positions allow, special tokens included
    Encoder          an nn.Module built from the Hugging Face encoder, frozen, with a `SlotLinear` in
                     place of every LoRA-capable linear layer:
        Encoder(encoder, config, slots, r_max, dtype)
        .targets: dict[str, tuple[SlotLinear, int]]   PEFT module path below PREFIX -> (linear, part)
        .forward(input_ids [B, T], attention_mask [B, T] bool, idx [B], rank) -> hidden [B, T, H]
        .pool(hidden [B, T, H], attention_mask, idx, rank) -> [B, H], what the head reads
"""

from __future__ import annotations

from types import ModuleType

from loraplex.models import bert

FAMILIES: tuple[ModuleType, ...] = (bert,)


def family_for(model_type: str) -> ModuleType:
    """The family module that serves `model_type`; ValueError naming the supported ones otherwise."""
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    supported = sorted(t for family in FAMILIES for t in family.MODEL_TYPES)
    raise ValueError(f"model_type {model_type!r} is not served; loraplex serves {', '.join(supported)}")
