"""DeBERTa-v2/v3 family: small random-weight DebertaV2Config models, PEFT adapters of every kind in one batch.

The v3 model (shared attention keys, log-bucketed relative positions, LayerNorm'd relative embeddings)
carries the adapters of every kind; the v2 model covers the layers only older checkpoints have: separate
position projections, the convolution after the first layer, absolute positions, `embed_proj`.

DeBERTa's pooler (`pooler.dense`) is outside the `deberta` prefix and not in a base checkpoint, and PEFT's
default SEQ_CLS modules_to_save is only "classifier": adapters that are to be served name the pooler too.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import DebertaV2Config

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.peft import parse_adapter
from loraplex.engine.core import Engine
from tests.device_support import DEVICE
from tests.family_support import (
    check_live_server,
    check_mixed_batch,
    check_saved_modules_by_shape,
    save_model,
    tiny_config_kwargs,
)
from tests.peft_factory import save_peft_adapter

HEAD = ["pooler", "classifier"]  # the whole head, saved by PEFT (modules_to_save)
V3 = dict(
    relative_attention=True,
    position_buckets=16,  # small enough that the test texts reach the log buckets (past 8 tokens)
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    pos_att_type=["p2c", "c2p"],
    position_biased_input=False,
    type_vocab_size=0,
    max_relative_positions=-1,
)
V2 = dict(
    relative_attention=True,
    position_buckets=-1,
    max_relative_positions=12,  # shorter than the longest test text: distances past it are clamped
    norm_rel_ebd="none",
    share_att_key=False,
    pos_att_type="p2c|c2p",
    position_biased_input=True,
    type_vocab_size=2,
    conv_kernel_size=3,
    conv_act="gelu",
    embedding_size=48,
)
SPECS = [
    dict(r=8, lora_alpha=16, target_modules=None, num_labels=3),  # PEFT's default: query_proj, value_proj
    dict(r=4, lora_alpha=8, target_modules="all-linear", num_labels=7, use_rslora=True),
    dict(
        r=4,
        lora_alpha=8,
        target_modules=["query_proj", "key_proj", "value_proj", "dense"],
        num_labels=2,
        rank_pattern={"intermediate.dense": 16, "key_proj": 2},
        alpha_pattern={"value_proj": 2},
    ),
]


def deberta_config(variant: dict) -> DebertaV2Config:
    sizes = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    return DebertaV2Config(**sizes, **variant, **tiny_config_kwargs())


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("deberta_v3")
    model_dir = save_model(root / "model", deberta_config(V3))
    adapters = [
        save_peft_adapter(root / f"a{i}", seed=i, model_dir=model_dir, modules_to_save=HEAD, **s)
        for i, s in enumerate(SPECS)
    ]
    return model_dir, adapters


def test_mixed_batch_matches_peft(family):
    model_dir, adapters = family
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def test_live_server_matches_peft(family, tmp_path):
    model_dir, adapters = family
    check_live_server(model_dir, adapters[1], tmp_path / "store")


def test_v2_layers_match_peft(tmp_path):
    """all-linear adapts embed_proj and the separate pos_key_proj/pos_query_proj too (PEFT does)."""
    model_dir = save_model(tmp_path / "model", deberta_config(V2))
    adapters = [
        save_peft_adapter(tmp_path / "a0", seed=0, model_dir=model_dir, modules_to_save=HEAD, **SPECS[1]),
        save_peft_adapter(tmp_path / "a1", seed=1, model_dir=model_dir, modules_to_save=HEAD, **SPECS[0]),
    ]
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    v2_only = {"embeddings.embed_proj", "encoder.layer.0.attention.self.pos_key_proj"}
    assert v2_only <= set(engine.base.targets)
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def parse(path, engine: Engine):
    config = json.loads((path / "adapter_config.json").read_text())
    return parse_adapter(config, load_file(path / "adapter_model.safetensors"), engine.base)


@pytest.mark.parametrize(
    "targets",
    [
        None,  # PEFT's default targets; the pooler is left at its random initialisation
        "all-linear",  # PEFT then puts a LoRA on pooler.dense, over that random initialisation
        ["query_proj", "dense"],  # "dense" matches pooler.dense as well
    ],
)
def test_adapter_without_pooler_is_rejected(family, tmp_path, targets):
    """PEFT's default modules_to_save ("classifier") does not save the pooler: the error says what to add."""
    model_dir, _ = family
    adapter = save_peft_adapter(tmp_path / "a", model_dir=model_dir, target_modules=targets, num_labels=2)
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    with pytest.raises(InvalidAdapterError, match=r"modules_to_save=\['pooler', 'classifier'\]"):
        parse(adapter, engine)


def test_saved_modules_are_checked_by_shape(family):
    model_dir, adapters = family
    check_saved_modules_by_shape(model_dir, adapters)
