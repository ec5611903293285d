"""Encoder families: one module per family, picked once from `config.model_type`.

Each family module holds everything that differs between encoders and nothing that does not (the LoRA
op, slot tensors, stacked heads and length grouping are shared code):

    MODEL_TYPES      the `config.model_type` values it serves, e.g. ("roberta", "xlm-roberta")
    PREFIX           attribute of the encoder in the family's ...ForSequenceClassification model ("bert")
    DEFAULT_TARGETS  PEFT's default `target_modules` for it (used when a config names none, and by train)
    head(config)     the classification head after pooling, as `loraplex.engine.heads` stages
    token_head(config, task)  optional: the TOKEN_CLS / QUESTION_ANS head on every token, where it is
                     not Hugging Face's usual single `classifier` / `qa_outputs` linear
    max_length(config)  the longest input its positions allow, special tokens included
    Encoder          an nn.Module built from the Hugging Face encoder, frozen, with a `SlotLinear` in
                     place of every LoRA-capable linear layer:
        Encoder(encoder, config, slots, r_max, dtype)
        .targets: dict[str, tuple[SlotLinear, int]]   PEFT module path below PREFIX -> (linear, part)
        .forward(input_ids [B, T], attention_mask [B, T] bool, lora (a LoraBatch), token_type_ids [B, T] or
                 None) -> hidden [B, T, H]; families without token types ignore token_type_ids
        .pool(hidden [B, T, H], attention_mask, lora) -> [B, H], what the head reads
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.model_type -> the module of `loraplex.engine.models` that serves it
FAMILIES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
    "electra": "electra",
    "deberta-v2": "deberta_v2",
    "modernbert": "modernbert",
}


def family_for(model_type: str) -> ModuleType:
    """The family module that serves `model_type`; ValueError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not served; loraplex serves {', '.join(FAMILIES)}")
    family = importlib.import_module(f"loraplex.engine.models.{FAMILIES[model_type]}")
    assert model_type in family.MODEL_TYPES, (model_type, family.__name__)
    return family


def head_modules(family: ModuleType, config) -> list[str]:
    """Top-level modules of the family's head, e.g. ["pre_classifier", "classifier"]: what PEFT must save."""
    return list(
        dict.fromkeys(stage.path.split(".", 1)[0] for stage in family.head(config) if hasattr(stage, "path"))
    )
