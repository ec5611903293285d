"""bfloat16 and int8 engines on the CPU give the answers of the float32 engine, for every family.

Each family's small random-weight model carries two real PEFT adapters on all its linears (ranks 8
and 4, 3 and 2 labels) in one mixed batch. Tolerances, on softmax probabilities against the float32 engine:
bfloat16 keeps 8 bits of mantissa through the residual stream, int8 quantizes every frozen matmul's
inputs and weights (relative error about 2e-2 per matmul). Rows whose float32 answer is clear (top
probability ahead of the next by more than twice the tolerance) must keep their argmax.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, DistilBertConfig, ElectraConfig, RobertaConfig

from loraplex.engine.core import Engine, resolve_dtype
from loraplex.engine.lora import OneDnnLinear, SlotLinear, _checked, pack_weight
from tests.family_support import TEXTS, load_adapter, save_model, tiny_config_kwargs
from tests.peft_factory import save_peft_adapter
from tests.test_family_deberta_v2 import HEAD as DEBERTA_HEAD
from tests.test_family_deberta_v2 import V3, deberta_config
from tests.test_family_modernbert import modernbert_config

# Largest probability difference from float32 (measured here at most 0.015 and 0.006).
TOLERANCE = {"bfloat16": 0.03, "int8": 0.03}
SIZES = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)


def family_configs() -> dict:
    tiny = tiny_config_kwargs()
    return {
        "bert": (BertConfig(**SIZES, **tiny), {}),
        "roberta": (RobertaConfig(**SIZES, **tiny), {}),
        "distilbert": (
            DistilBertConfig(dim=64, n_layers=3, n_heads=4, hidden_dim=128, **tiny),
            {"modules_to_save": ["pre_classifier", "classifier"]},  # all-linear would adapt pre_classifier
        ),
        "electra": (ElectraConfig(**SIZES, embedding_size=32, **tiny), {}),
        "deberta-v2": (deberta_config(V3), {"modules_to_save": DEBERTA_HEAD}),
        "modernbert": (modernbert_config(), {"modules_to_save": ["head", "classifier"]}),
    }


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("precision")
    built = {}
    for name, (config, extra) in family_configs().items():
        model_dir = save_model(root / name / "model", config)
        specs = [dict(target_modules="all-linear"), dict(target_modules="all-linear", r=4, num_labels=2)]
        adapters = [
            save_peft_adapter(root / name / f"a{i}", seed=i, model_dir=model_dir, **spec, **extra)
            for i, spec in enumerate(specs)
        ]
        built[name] = model_dir, adapters
    return built


def probabilities(model_dir, adapters, dtype: str) -> tuple[Engine, list[torch.Tensor]]:
    engine = Engine(model_dir, device="cpu", dtype=dtype, num_slots=len(adapters), max_rank=16)
    for slot, path in enumerate(adapters):
        engine.load_slot(slot, load_adapter(path, engine))
    ids = engine.tokenize(TEXTS)
    rows = [(t, s) for s in range(len(adapters)) for t in range(len(TEXTS))]
    logits = engine.classify([ids[t] for t, _ in rows], [s for _, s in rows])
    return engine, [torch.softmax(row.float(), -1) for row in logits]


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", list(family_configs()))
def test_engine_agrees_with_float32(families, name, dtype):
    model_dir, adapters = families[name]
    _, want = probabilities(model_dir, adapters, "float32")
    engine, got = probabilities(model_dir, adapters, dtype)
    linear = next(m for m in engine.model.modules() if isinstance(m, SlotLinear))
    if dtype == "int8":
        assert engine.matmul == "int8", "every frozen matmul runs in int8 where the CPU has the kernels"
        assert linear.weight is None and linear.lora_A.dtype == torch.float32
    else:
        assert linear.lora_A.dtype == torch.bfloat16
        assert engine.matmul == ("onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "plain")
    tolerance = TOLERANCE[dtype]
    diffs = [(g - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    assert max(diffs) <= tolerance, f"{name} {dtype}: {max(diffs):.3f} > {tolerance}"
    assert max(diffs) > 1e-6, "the lower precision must really run (answers identical to float32)"
    for g, w in zip(got, want, strict=True):
        top2 = w.topk(2).values
        if top2[0] - top2[1] > 2 * tolerance:
            assert g.argmax() == w.argmax(), (name, dtype, w, g)


def test_auto_precision_is_float32_on_the_cpu_and_bfloat16_on_a_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype(None, torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda", 1)) == "bfloat16"
    assert resolve_dtype("int8", torch.device("cpu")) == "int8"  # a precision asked for is kept
    assert Engine(device="cpu", dtype="auto", num_slots=1, max_rank=4).dtype == "float32"


def test_float16_on_cpu_and_int8_on_cuda_are_refused():
    with pytest.raises(ValueError, match="float16 does not run on cpu; use one of float32, bfloat16, int8"):
        Engine(device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine(device="cpu", dtype="int4")


def test_int8_quantizes_each_token_on_its_own():
    """A token's int8 answer does not depend on the other tokens of the call: one token a thousand
    times larger leaves every other token's output bit for bit the same."""
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 32, generator=g) * 0.1, torch.randn(48, generator=g)
    x = torch.randn(7, 32, generator=g)
    loud = x.clone()
    loud[3] *= 1000
    packed = pack_weight(weight, bias, int8=True)
    assert packed is not None and packed.kind == "int8"
    others = [0, 1, 2, 4, 5, 6]
    assert torch.equal(packed(x)[others], packed(loud)[others])
    assert torch.equal(packed(x)[:1], packed(x[:1]))


def test_pack_weight_int8_and_its_check():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 32, generator=g) * 0.1, torch.randn(48, generator=g)
    x = torch.randn(7, 32, generator=g)
    want = torch.nn.functional.linear(x, weight, bias)
    packed = pack_weight(weight, bias, int8=True)
    assert packed is not None and packed.kind == "int8"
    got = packed(x)
    relative = ((got - want).norm() / want.norm()).item()
    assert 1e-5 < relative < 5e-2  # quantized: close, not exact
    # int8 quantizes float32 weights only; a bfloat16 weight keeps its own matmul.
    bf16 = pack_weight(weight.bfloat16(), bias.bfloat16(), int8=True)
    assert bf16 is None or bf16.kind == "onednn"
    # A packed matmul that disagrees with F.linear is refused at the check, not served.
    wrong = _checked(lambda: OneDnnLinear(weight.flip(0).contiguous(), bias), weight, bias, 1e-5)
    assert wrong is None
    right = _checked(lambda: OneDnnLinear(weight, bias), weight, bias, 1e-5)
    assert right is not None and torch.allclose(right(x), want, atol=1e-5)
