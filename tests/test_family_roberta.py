"""RoBERTa family: small random-weight RoBERTa, XLM-RoBERTa and CamemBERT models, PEFT adapters in a batch."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, CamembertConfig, RobertaConfig, XLMRobertaConfig

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.peft import parse_adapter
from loraplex.engine.core import Engine
from loraplex.engine.models import roberta
from tests.device_support import DEVICE, TOLERANCE
from tests.family_support import (
    check_live_server,
    check_mixed_batch,
    check_saved_modules_by_shape,
    load_adapter,
    save_model,
    tiny_config_kwargs,
)
from tests.peft_factory import save_peft_adapter

SPECS = [
    dict(r=8, lora_alpha=16, target_modules=None, num_labels=3),  # PEFT's default targets for roberta
    # PEFT writes all-linear out as every linear name, classifier.dense and classifier.out_proj included
    # (20 names or more it shortens to their suffixes); the classifier is in modules_to_save, so it is
    # saved whole and gets no LoRA.
    dict(r=4, lora_alpha=8, target_modules="all-linear", num_labels=7, use_rslora=True),
    dict(
        r=4,
        lora_alpha=8,
        # "dense" also names classifier.dense, which PEFT leaves to modules_to_save
        target_modules=["query", "key", "value", "dense"],
        num_labels=2,
        rank_pattern={"intermediate.dense": 16},
        alpha_pattern={"value": 2},
    ),
]


def tiny_config(config_class, **overrides):
    # The MiniLM tokenizer's pad id is 0, so real tokens take positions 1, 2, ...
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return config_class(**{**sizes, "max_position_embeddings": 514, **tiny_config_kwargs(), **overrides})


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("roberta")
    model_dir = save_model(root / "model", tiny_config(RobertaConfig, num_hidden_layers=3))
    adapters = [
        save_peft_adapter(root / f"a{i}", seed=i, model_dir=model_dir, **s) for i, s in enumerate(SPECS)
    ]
    return model_dir, adapters


def test_mixed_batch_matches_peft(family):
    model_dir, adapters = family
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


@pytest.mark.parametrize("config_class", [XLMRobertaConfig, CamembertConfig])
def test_other_model_types_mixed_batch(config_class, tmp_path):
    model_dir = save_model(tmp_path / "model", tiny_config(config_class), seed=1)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] in roberta.MODEL_TYPES
    # PEFT has no default targets for camembert, so both adapters name theirs.
    adapters = [
        save_peft_adapter(tmp_path / "qv", seed=3, model_dir=model_dir, target_modules=["query", "value"]),
        save_peft_adapter(
            tmp_path / "all", seed=4, model_dir=model_dir, r=2, target_modules="all-linear", num_labels=2
        ),
    ]
    check_mixed_batch(model_dir, adapters, group_tokens=[None])


def test_live_server_matches_peft(family, tmp_path):
    model_dir, adapters = family
    check_live_server(model_dir, adapters[1], tmp_path / "store")


def test_classifier_gets_no_lora_and_must_be_saved_whole(family):
    model_dir, adapters = family
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    config = json.loads((adapters[1] / "adapter_config.json").read_text())
    targets = set(config["target_modules"])  # all-linear as PEFT saved it: it names classifier.dense too
    assert "classifier.dense" in targets or "dense" in targets
    assert "classifier" in config["modules_to_save"]
    adapter = load_adapter(adapters[1], engine)
    assert len(adapter.modules) == 6 * 3 and all(path.startswith("encoder.") for path in adapter.modules)
    assert set(adapter.head) == {
        f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")
    }

    # The base checkpoint has no classifier.dense, so an adapter without it cannot be served.
    tensors = load_file(adapters[1] / "adapter_model.safetensors")
    del tensors["base_model.model.classifier.dense.weight"], tensors["base_model.model.classifier.dense.bias"]
    with pytest.raises(InvalidAdapterError, match=r"classifier\.dense.*modules_to_save=\['classifier'\]"):
        parse_adapter(config, tensors, engine.base, max_rank=engine.max_rank)


def test_longest_input_uses_the_last_position(tmp_path):
    """Positions start after the pad id: max_position_embeddings 40, pad id 0 -> 39 tokens at most."""
    model_dir = save_model(tmp_path / "model", tiny_config(RobertaConfig, max_position_embeddings=40))
    # RoBERTa-base: pad id 1 and 514 positions give 512 tokens
    assert roberta.max_length(RobertaConfig(max_position_embeddings=514)) == 512
    adapter_dir = save_peft_adapter(tmp_path / "a", model_dir=model_dir, target_modules="all-linear")
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    assert engine.base.max_length == 39
    engine.load_slot(0, load_adapter(adapter_dir, engine))
    ids = engine.tokenize(["word " * 60, "short one"])  # the first is truncated to 39 tokens
    assert len(ids[0]) == 39
    got = engine.classify(ids, [0, 0])

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    input_ids = torch.zeros(2, 39, dtype=torch.long)
    mask = torch.zeros(2, 39, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.inference_mode():
        want = peft_model(input_ids=input_ids, attention_mask=mask).logits
    for row, expected in zip(got, want, strict=True):
        assert (torch.softmax(row, -1) - torch.softmax(expected, -1)).abs().max().item() <= TOLERANCE


def test_decoder_configs_are_refused(tmp_path):
    model_dir = save_model(tmp_path / "model", tiny_config(RobertaConfig, is_decoder=True))
    with pytest.raises(ValueError, match="is_decoder"):
        Engine(model_dir, device=DEVICE, num_slots=1)


def test_saved_modules_are_checked_by_shape(family):
    model_dir, adapters = family
    check_saved_modules_by_shape(model_dir, adapters)
