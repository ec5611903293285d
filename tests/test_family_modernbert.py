"""ModernBERT family: small random-weight ModernBertConfig models, PEFT adapters of every kind in one batch.

The models have 3 layers (global, sliding, global) and a local window of 8 tokens, shorter than most
test texts, so the sliding-window mask is exercised. What PEFT does for this family:

- it has no default target_modules for modernbert; q/k/v are one module, `attn.Wqkv`;
- `all-linear` adapts every Linear except `classifier`: the four per layer and also `head.dense`, which
  PEFT saves as LoRA (`head.dense.lora_A/B`), not whole, under the default modules_to_save;
- the default modules_to_save (["classifier", "score"]) saves only `classifier`: `head.dense` and
  `head.norm` come from the base checkpoint, which holds them when it is an MLM checkpoint (as every
  real ModernBERT base is). A base without them needs modules_to_save=["head", "classifier"].
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from transformers import AutoModel, AutoModelForMaskedLM, ModernBertConfig

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.peft import parse_adapter
from loraplex.adapters.validate import validate_upload
from loraplex.engine.core import Engine
from tests.device_support import DEVICE, TOLERANCE
from tests.family_support import (
    TEXTS,
    check_live_server,
    check_mixed_batch,
    check_saved_modules_by_shape,
    load_adapter,
    save_model,
    tiny_config_kwargs,
)
from tests.peft_factory import save_peft_adapter, tokenizer

HEAD = ["head", "classifier"]
CLS_SPECS = [  # on an MLM base, pooling "cls"
    dict(r=8, lora_alpha=16, target_modules=["Wqkv"], num_labels=3),  # PEFT's default modules_to_save
    dict(r=4, lora_alpha=8, target_modules="all-linear", num_labels=7, use_rslora=True),  # LoRA on head.dense
    dict(
        r=4,
        lora_alpha=8,
        target_modules=["Wqkv", "Wo", "Wi"],
        num_labels=2,
        rank_pattern={"mlp.Wi": 16},
        alpha_pattern={"attn.Wo": 2},
        modules_to_save=HEAD,
    ),
]
MEAN_SPECS = [  # on a bare encoder (no head in the checkpoint), pooling "mean", every bias on
    dict(r=4, lora_alpha=8, target_modules="all-linear", num_labels=3, modules_to_save=HEAD),
    dict(r=8, lora_alpha=32, target_modules=["Wqkv", "Wi"], num_labels=2, modules_to_save=HEAD),
]


def modernbert_config(**overrides) -> ModernBertConfig:
    tok = tokenizer()
    return ModernBertConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        local_attention=8,  # a window of |i - j| <= 4
        global_attn_every_n_layers=2,  # layers: full, sliding, full
        bos_token_id=tok.cls_token_id,
        cls_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        sep_token_id=tok.sep_token_id,
        **tiny_config_kwargs(),
        **overrides,
    )


def saved(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def cls_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert-cls")
    model_dir = save_model(root / "model", modernbert_config(), model_class=AutoModelForMaskedLM)
    adapters = [
        save_peft_adapter(root / f"a{i}", seed=i, model_dir=model_dir, **s) for i, s in enumerate(CLS_SPECS)
    ]
    return model_dir, adapters


@pytest.fixture(scope="module")
def mean_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert-mean")
    config = modernbert_config(
        classifier_pooling="mean",
        attention_bias=True,
        mlp_bias=True,
        norm_bias=True,
        classifier_bias=True,
        classifier_activation="silu",
    )
    model_dir = save_model(root / "model", config, model_class=AutoModel)
    adapters = [
        save_peft_adapter(root / f"b{i}", seed=10 + i, model_dir=model_dir, **s)
        for i, s in enumerate(MEAN_SPECS)
    ]
    return model_dir, adapters


def test_mixed_batch_matches_peft(cls_family):
    model_dir, adapters = cls_family
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def test_mean_pooling_with_biases_matches_peft(mean_family):
    model_dir, adapters = mean_family
    check_mixed_batch(model_dir, adapters, group_tokens=[None, 40])


def test_live_server_matches_peft(cls_family, tmp_path):
    model_dir, adapters = cls_family
    check_live_server(model_dir, adapters[1], tmp_path / "store")


def test_encoder_matches_hugging_face_and_the_window_matters(cls_family):
    """Hidden states of padded rows against Hugging Face's eager attention, real tokens only."""
    model_dir, _ = cls_family
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    batch = tokenizer()(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    lora = engine.model.batch([engine.empty_slot] * len(TEXTS), engine.slot_rank)
    with torch.inference_mode():
        got = engine.model.encoder(ids.to(engine.device), mask.to(engine.device), lora).cpu()
        hf = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        want = hf(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        wide = AutoModel.from_pretrained(model_dir, attn_implementation="eager", local_attention=4096).eval()
        unwindowed = wide(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    assert (got - want)[mask].abs().max().item() <= TOLERANCE
    # Rows longer than the window would come out otherwise without it.
    assert (unwindowed - want)[mask].abs().max().item() > 1e-3


def test_what_peft_saves(cls_family):
    """all-linear: LoRA on head.dense too; default modules_to_save: classifier alone; HEAD: head whole."""
    _, adapters = cls_family
    config, tensors = saved(adapters[1])
    assert "head.dense" in config["target_modules"] and "classifier" not in config["target_modules"]
    assert {k for k in tensors if not k.startswith("base_model.model.model.")} == {
        "base_model.model.head.dense.lora_A.weight",
        "base_model.model.head.dense.lora_B.weight",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    assert sum(".lora_A." in k for k in tensors) == 3 * 4 + 1
    _, tensors = saved(adapters[0])
    assert {k for k in tensors if ".lora_" not in k} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    _, tensors = saved(adapters[2])  # no biases by default: norm_bias and classifier_bias are False
    assert {k for k in tensors if ".lora_" not in k} == {
        "base_model.model.head.dense.weight",
        "base_model.model.head.norm.weight",
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }


def test_lora_on_head_dense_is_merged_into_the_base_head(cls_family):
    model_dir, adapters = cls_family
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    config, tensors = saved(adapters[1])
    adapter = load_adapter(adapters[1], engine)
    assert set(adapter.modules) == set(engine.base.targets)
    a = tensors["base_model.model.head.dense.lora_A.weight"]
    b = tensors["base_model.model.head.dense.lora_B.weight"]
    scaling = config["lora_alpha"] / config["r"] ** 0.5  # rsLoRA
    want = engine.base.head_defaults["head.dense.weight"] + scaling * b @ a
    assert torch.allclose(adapter.head["head.dense.weight"], want, atol=1e-7)
    assert torch.equal(adapter.head["head.norm.weight"], engine.base.head_defaults["head.norm.weight"])


def test_bare_base_needs_the_head_saved(mean_family, tmp_path):
    """On a checkpoint without head.dense/head.norm, PEFT's default modules_to_save leaves them random."""
    model_dir, _ = mean_family
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    assert not engine.base.head_defaults
    for i, targets in enumerate((["Wqkv"], "all-linear")):
        adapter_dir = save_peft_adapter(tmp_path / f"c{i}", model_dir=model_dir, target_modules=targets)
        config, tensors = saved(adapter_dir)
        with pytest.raises(InvalidAdapterError, match=r"modules_to_save=\['head', 'classifier'\]"):
            parse_adapter(config, tensors, engine.base)


def test_config_without_targets_uses_wqkv(cls_family):
    model_dir, adapters = cls_family
    engine = Engine(model_dir, device=DEVICE, num_slots=1)
    config, tensors = saved(adapters[0])
    adapter = parse_adapter({**config, "target_modules": None}, tensors, engine.base)
    assert adapter.target_modules == ("Wqkv",)
    with pytest.raises(InvalidAdapterError, match="matches no linear layer"):  # BERT's names are not here
        parse_adapter({**config, "target_modules": ["query", "value"]}, tensors, engine.base)


def test_upload_of_a_saved_head_with_its_one_dimensional_norm(mean_family, tmp_path):
    """modules_to_save=["head", "classifier"] saves head.norm.weight (and its bias): 1-D tensors that an
    upload takes, checked by shape against the base's own head; a wrong shape is refused by name."""
    model_dir, adapters = mean_family
    engine = Engine(model_dir, device="cpu", num_slots=1)
    config, tensors = saved(adapters[0])
    norm = "base_model.model.head.norm.weight"
    assert tensors[norm].dim() == 1 and set(HEAD) <= set(config["modules_to_save"])
    raw = (adapters[0] / "adapter_model.safetensors").read_bytes()
    config_bytes = (adapters[0] / "adapter_config.json").read_bytes()
    limits = dict(max_rank=64, max_labels=32)
    validated = validate_upload("modern", config_bytes, raw, None, engine.base, **limits)
    assert torch.equal(validated.weights.head["head.norm.weight"], tensors[norm].float())
    assert validated.record.task_type == "SEQ_CLS"
    for bad in (tensors[norm][:-1], tensors[norm][None, :], tensors[norm].sum()):
        broken = save_safetensors({**tensors, norm: bad.contiguous()})
        with pytest.raises(InvalidAdapterError, match=r"head\.norm\.weight' has shape .*expected \[64\]"):
            validate_upload("modern", config_bytes, broken, None, engine.base, **limits)


def test_saved_modules_are_checked_by_shape(mean_family):
    model_dir, adapters = mean_family
    check_saved_modules_by_shape(model_dir, adapters)
