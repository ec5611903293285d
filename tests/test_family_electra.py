"""ELECTRA family: small random-weight ElectraConfig models, with and without `embeddings_project`.

`same` has embedding_size == hidden_size (no projection); `projected` has 32-wide embeddings lifted to 64
by `electra.embeddings_project`, which PEFT's all-linear adapts. `projected` also runs its layers on
gelu_new and sets summary_activation, neither of which may reach the classification head (always GELU).
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import ElectraConfig

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

COMMON = [
    dict(r=8, lora_alpha=16, target_modules=None, num_labels=3),  # PEFT's default targets for electra
    dict(r=4, lora_alpha=8, target_modules="all-linear", num_labels=7, use_rslora=True),
]
SPECS = {
    # "dense" also names classifier.dense; PEFT saves that whole (modules_to_save), it gets no LoRA
    "same": [
        *COMMON,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "key", "value", "dense"],
            num_labels=2,
            rank_pattern={"intermediate.dense": 16},
            alpha_pattern={"value": 2},
        ),
    ],
    "projected": [
        *COMMON,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "embeddings_project"],
            num_labels=2,
            rank_pattern={"embeddings_project": 16},
            alpha_pattern={"embeddings_project": 4},
        ),
    ],
}
SIZES = {
    "same": dict(embedding_size=64),
    "projected": dict(embedding_size=32, hidden_act="gelu_new", summary_activation="tanh"),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("electra")
    built = {}
    for name, sizes in SIZES.items():
        config = ElectraConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            **sizes,
            **tiny_config_kwargs(),
        )
        model_dir = save_model(root / name / "model", config)
        adapters = [
            save_peft_adapter(root / name / f"a{i}", seed=i, model_dir=model_dir, **spec)
            for i, spec in enumerate(SPECS[name])
        ]
        built[name] = model_dir, adapters
    return built


def _parts(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(adapter_dir / "adapter_model.safetensors")


@pytest.mark.parametrize("name", list(SIZES))
def test_mixed_batch_matches_peft(family, name):
    model_dir, adapters = family[name]
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def test_live_server_matches_peft(family, tmp_path):
    model_dir, adapters = family["projected"]
    check_live_server(model_dir, adapters[1], tmp_path / "store")  # all-linear, embeddings_project included


def test_all_linear_matches_what_peft_saved(family):
    """all-linear: every encoder linear, embeddings_project where there is one; the head saved whole."""
    for name, (model_dir, adapters) in family.items():
        engine = Engine(model_dir, device=DEVICE, num_slots=1)
        config, tensors = _parts(adapters[1])
        lora = {
            k.removeprefix("base_model.model.electra.").rsplit(".lora_", 1)[0]
            for k in tensors
            if "lora_" in k
        }
        head = {k.removeprefix("base_model.model.") for k in tensors if "lora_" not in k}
        assert lora == set(engine.base.targets), name
        assert ("embeddings_project" in lora) == (name == "projected")
        assert (
            head
            == set(engine.base.head_tensors)
            == {f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
        )
        assert set(parse_adapter(config, tensors, engine.base).modules) == lora


def test_head_without_its_dense_is_rejected(family):
    """The base checkpoint holds no classifier.dense, so an adapter must save it; the error says how."""
    model_dir, adapters = family["same"]
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    config, tensors = _parts(adapters[0])
    tensors = {k: v for k, v in tensors.items() if ".classifier.dense." not in k}
    with pytest.raises(InvalidAdapterError, match=r"classifier\.dense.*modules_to_save=\['classifier'\]"):
        parse_adapter(config, tensors, engine.base)


def test_projection_adapter_on_a_base_without_projection_is_rejected(family):
    """LoRA on embeddings_project cannot be dropped silently on a base whose embeddings need no lift."""
    model_dir, _ = family["same"]
    _, adapters = family["projected"]
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    config, tensors = _parts(adapters[2])
    with pytest.raises(InvalidAdapterError, match="embeddings_project"):
        parse_adapter(config, tensors, engine.base)


@pytest.mark.parametrize("name", list(SIZES))
def test_saved_modules_are_checked_by_shape(family, name):
    model_dir, adapters = family[name]
    check_saved_modules_by_shape(model_dir, adapters)
