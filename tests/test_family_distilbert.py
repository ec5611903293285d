"""DistilBERT family: a small random-weight DistilBertConfig model, PEFT adapters of every kind in one batch.

DistilBERT's head is pre_classifier -> ReLU -> classifier, and pre_classifier is not in a base
checkpoint. PEFT saves it whole under its default modules_to_save (["classifier", "score"] is matched
as a suffix of the module name, and "pre_classifier" ends in "classifier"); an adapter that lacks it
cannot be reproduced and is rejected with an error that names modules_to_save.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import DistilBertConfig

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.peft import parse_adapter
from loraplex.engine.core import Engine
from tests.device_support import DEVICE
from tests.family_support import (
    check_live_server,
    check_mixed_batch,
    check_saved_modules_by_shape,
    load_adapter,
    save_model,
    tiny_config_kwargs,
)
from tests.peft_factory import save_peft_adapter

QV = ["q_lin", "v_lin"]  # PEFT has no default target_modules for distilbert
HEAD = ("pre_classifier", "classifier")  # PEFT extends a modules_to_save list in place
SPECS = [
    dict(r=8, lora_alpha=16, target_modules=QV, num_labels=3),  # PEFT's default modules_to_save
    dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        num_labels=7,
        use_rslora=True,
        modules_to_save=list(HEAD),
    ),
    dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
        num_labels=2,
        rank_pattern={"lin1": 16},
        alpha_pattern={"v_lin": 2},
        modules_to_save=list(HEAD),
    ),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilbert")
    config = DistilBertConfig(dim=64, n_layers=3, n_heads=4, hidden_dim=128, **tiny_config_kwargs())
    model_dir = save_model(root / "model", config)
    adapters = [
        save_peft_adapter(root / f"a{i}", seed=i, model_dir=model_dir, **s) for i, s in enumerate(SPECS)
    ]
    return model_dir, adapters


@pytest.fixture(scope="module")
def engine(family):
    model_dir, _ = family
    return Engine(model_dir, device=DEVICE, num_slots=2)


def saved(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(adapter_dir / "adapter_model.safetensors")


def test_mixed_batch_matches_peft(family):
    model_dir, adapters = family
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def test_live_server_matches_peft(family, tmp_path):
    model_dir, adapters = family
    check_live_server(model_dir, adapters[0], tmp_path / "store")


def test_peft_saves_the_whole_head(family, engine):
    """What PEFT writes for this family, and that loraplex reads the same modules."""
    _, adapters = family
    head_keys = {f"base_model.model.{m}.{p}" for m in HEAD for p in ("weight", "bias")}
    for adapter_dir in adapters:
        _, tensors = saved(adapter_dir)
        assert head_keys <= set(tensors), adapter_dir.name  # the default modules_to_save too
        assert not any("classifier.lora_" in key for key in tensors)
    # all-linear lists pre_classifier among the targets, but modules_to_save keeps it whole, without LoRA
    config, _ = saved(adapters[1])
    assert "pre_classifier" in config["target_modules"]
    adapter = load_adapter(adapters[1], engine)
    assert len(adapter.modules) == len(engine.base.targets) == 3 * 6
    assert set(adapter.head) == {key.removeprefix("base_model.model.") for key in head_keys}


def test_adapter_without_pre_classifier_is_rejected(family, engine):
    _, adapters = family
    config, tensors = saved(adapters[0])
    tensors = {k: v for k, v in tensors.items() if ".pre_classifier." not in k}
    with pytest.raises(InvalidAdapterError, match=r"modules_to_save=\['pre_classifier', 'classifier'\]"):
        parse_adapter(config, tensors, engine.base)


def test_lora_on_the_head_is_rejected(family, engine):
    """LoRA on pre_classifier while the default modules_to_save saves it whole: PEFT cannot load that."""
    _, adapters = family
    config, tensors = saved(adapters[0])
    assert "pre_classifier" not in config["modules_to_save"]  # saved by the suffix rule alone
    for target in (QV + ["pre_classifier"], "all-linear"):
        with pytest.raises(
            InvalidAdapterError, match="'pre_classifier', which modules_to_save entry 'classifier'"
        ):
            parse_adapter({**config, "target_modules": target}, tensors, engine.base)


def test_config_without_targets_uses_q_and_v(family, engine):
    _, adapters = family
    config, tensors = saved(adapters[0])
    adapter = parse_adapter({**config, "target_modules": None}, tensors, engine.base)
    assert adapter.target_modules == tuple(QV)


def test_saved_modules_are_checked_by_shape(family):
    model_dir, adapters = family
    check_saved_modules_by_shape(model_dir, adapters)
