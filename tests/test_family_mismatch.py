"""An adapter for another family or size is refused with a 422 naming its base model and the served one."""

from __future__ import annotations

import json

import httpx
import pytest
from safetensors.torch import load_file
from transformers import BertConfig, RobertaConfig

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.engine.core import EMBEDDED_HUB_ID, Engine
from tests.family_support import load_adapter, save_model, tiny_config_kwargs
from tests.lifecycle_support import upload
from tests.live_server import LiveServer
from tests.peft_factory import save_peft_adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, **tiny_config_kwargs())
    bert = save_model(root / "tiny-bert", BertConfig(hidden_size=64, **small))
    roberta = save_model(
        root / "tiny-roberta", RobertaConfig(hidden_size=384, max_position_embeddings=514, **small)
    )
    return {
        "tiny-bert": save_peft_adapter(root / "a-tiny-bert", model_dir=bert),
        "tiny-roberta": save_peft_adapter(root / "a-tiny-roberta", model_dir=roberta),
        "minilm": save_peft_adapter(root / "a-minilm"),
        "tiny-bert-model": bert,
    }


@pytest.fixture(scope="module")
def minilm() -> Engine:
    return Engine(device="cpu", num_slots=2)


def test_other_hidden_size_names_both_models(models, minilm):
    with pytest.raises(InvalidAdapterError) as info:
        load_adapter(models["tiny-bert"], minilm)
    message = str(info.value)
    assert str(models["tiny-bert-model"]) in message and EMBEDDED_HUB_ID in message
    assert "hidden size 384" in message


def test_other_family_names_both_models(models, minilm):
    """A RoBERTa adapter of the same hidden size still cannot run on BERT: its tensors name roberta."""
    with pytest.raises(
        InvalidAdapterError, match=r"belongs to a 'roberta' model, not to the served bert"
    ) as info:
        load_adapter(models["tiny-roberta"], minilm)
    assert "tiny-roberta" in str(info.value) and EMBEDDED_HUB_ID in str(info.value)


def test_served_model_refuses_the_embedded_models_adapter(models):
    engine = Engine(models["tiny-bert-model"], device="cpu", num_slots=1)
    with pytest.raises(InvalidAdapterError) as info:
        load_adapter(models["minilm"], engine)
    assert str(models["tiny-bert-model"]) in str(info.value)


def test_upload_of_a_foreign_adapter_is_a_422_naming_both(models, tmp_path):
    config = json.loads((models["tiny-bert"] / "adapter_config.json").read_text())
    assert load_file(models["tiny-bert"] / "adapter_model.safetensors")  # a real PEFT file
    with (
        LiveServer("--adapter-store", str(tmp_path)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        response = upload(client, "foreign", models["tiny-bert"])
        listed = client.get("/adapters").json()
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation"
    assert config["base_model_name_or_path"] in body["error"] and EMBEDDED_HUB_ID in body["error"]
    assert all(a["adapter_id"] != "foreign" for a in listed.get("adapters", listed))
