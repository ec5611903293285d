"""`loraplex train --model PATH` for every encoder family: the adapter it writes carries the family's own
defaults (PEFT's target_modules, the whole head saved) and the engine serves it as PEFT does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from loraplex.engine.core import Engine
from loraplex.engine.models import family_for, head_modules
from loraplex.train.trainer import main
from tests.family_support import TEXTS, TOLERANCE, load_adapter, save_model, tiny_config_kwargs
from tests.peft_factory import peft_logits, tokenizer

REVIEWS = Path(__file__).resolve().parents[1] / "adapters" / "examples" / "reviews.csv"
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def _modernbert() -> ModernBertConfig:
    tok = tokenizer()
    ids = dict(bos_token_id=tok.cls_token_id, cls_token_id=tok.cls_token_id)
    ids |= dict(eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id)
    return ModernBertConfig(hidden_size=64, local_attention=8, **LAYERS, **ids, **tiny_config_kwargs())


# name -> (config, the class the base was saved with: a bare encoder or a masked-LM checkpoint)
BASES = {
    "roberta": lambda: (RobertaConfig(hidden_size=64, **LAYERS, **tiny_config_kwargs()), AutoModel),
    "xlm-roberta": lambda: (XLMRobertaConfig(hidden_size=64, **LAYERS, **tiny_config_kwargs()), AutoModel),
    "distilbert": lambda: (
        DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=96, **tiny_config_kwargs()),
        AutoModel,
    ),
    "electra": lambda: (
        ElectraConfig(hidden_size=64, embedding_size=32, **LAYERS, **tiny_config_kwargs()),
        AutoModel,
    ),
    "deberta-v2": lambda: (
        DebertaV2Config(
            hidden_size=64,
            relative_attention=True,
            pos_att_type="p2c|c2p",
            **LAYERS,
            position_biased_input=False,
            max_relative_positions=-1,
            position_buckets=16,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            **tiny_config_kwargs(),
        ),
        AutoModel,
    ),  # fmt: skip
    "modernbert": lambda: (_modernbert(), AutoModelForMaskedLM),
}


@pytest.mark.parametrize("name", list(BASES))
def test_train_any_family_and_serve_it_as_peft_does(name, tmp_path, capsys):
    config, model_class = BASES[name]()
    model_dir = save_model(tmp_path / "model", config, model_class=model_class)
    out = tmp_path / "adapter"
    args = [str(REVIEWS), "-o", str(out), "--model", str(model_dir), "--max-steps", "3", "--batch-size", "8",
            "--max-length", "32", "--learning-rate", "1e-2", "--allow-weak"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert "adapter written to" in capsys.readouterr().out

    family = family_for(config.model_type)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(family.DEFAULT_TARGETS)
    assert set(head_modules(family, config)) <= set(saved["modules_to_save"])  # PEFT adds its own
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["negative", "neutral", "positive"]

    engine = Engine(model_dir, device="cpu", num_slots=2, max_rank=16)
    weights = load_adapter(out, engine)
    assert any(m.lora_B.abs().max() > 0 for m in weights.modules.values()), "lora_B all zero"
    engine.load_slot(1, weights)
    got = torch.softmax(torch.stack(engine.classify(engine.tokenize(TEXTS), [1] * len(TEXTS))), -1)
    want = torch.softmax(peft_logits(out, TEXTS, model_dir), -1)
    assert got.shape == want.shape == (len(TEXTS), 3)
    assert (got - want).abs().max().item() <= TOLERANCE
