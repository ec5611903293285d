"""BERT family: a small random-weight BertConfig model, PEFT adapters of every kind in one batch."""

from __future__ import annotations

import pytest
from transformers import BertConfig

from tests.family_support import (
    check_live_server,
    check_mixed_batch,
    check_saved_modules_by_shape,
    save_model,
    tiny_config_kwargs,
)
from tests.peft_factory import save_peft_adapter

SPECS = [
    dict(r=8, lora_alpha=16, target_modules=None, num_labels=3),  # PEFT's default targets for bert
    dict(r=4, lora_alpha=8, target_modules="all-linear", num_labels=7, use_rslora=True),
    dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "key", "value", "dense"],
        num_labels=2,
        rank_pattern={"intermediate.dense": 16},
        alpha_pattern={"value": 2},
    ),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        **tiny_config_kwargs(),
    )
    model_dir = save_model(root / "model", config)
    adapters = [
        save_peft_adapter(root / f"a{i}", seed=i, model_dir=model_dir, **s) for i, s in enumerate(SPECS)
    ]
    return model_dir, adapters


def test_mixed_batch_matches_peft(family):
    model_dir, adapters = family
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def test_live_server_matches_peft(family, tmp_path):
    model_dir, adapters = family
    check_live_server(model_dir, adapters[1], tmp_path / "store")


def test_saved_modules_are_checked_by_shape(family):
    model_dir, adapters = family
    check_saved_modules_by_shape(model_dir, adapters)
