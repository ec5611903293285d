"""Upload validation without HTTP: hostile uploads, each rejected with its error type, nothing stored.

`hostile_cases` is shared with the HTTP test (tests/test_lifecycle.py), which sends the same table through
a real server.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from loraplex.adapters.errors import LoraplexError
from loraplex.adapters.registry import Registry
from loraplex.adapters.store import DirectoryStore
from loraplex.adapters.upload import parse_labels
from loraplex.adapters.validate import load_stored, validate_upload
from loraplex.engine.core import Engine
from tests.lifecycle_support import TEXTS, AdapterFactory, PeftReference

MAX_UPLOAD = 1_000_000  # the HTTP test starts its server with this --max-upload-bytes
MAX_RANK = 16  # the HTTP test starts its server with this --max-rank
MAX_LABELS = 32
STATUS = {"validation": 422, "payload_too_large": 413, "unsupported_media_type": 415, "bad_request": 400}
PREFIX = "base_model.model.bert.encoder.layer.0.attention.self."
# Backtracks exponentially on a module name (no match ends in a digit), in any backtracking regex engine;
# matching it unbounded would hold the server for longer than anyone waits.
BACKTRACKS = r"(?:(.)(.)(.)(.)(.)(.)(.)(.)(.)(.)|(.)(.)(.)(.)(.)|(.)(.)|.)*\d"


@dataclass
class Case:
    name: str
    status: int
    error_type: str
    adapter_id: str = "victim"
    config: bytes | None = None  # None: the good adapter's
    model: bytes | None = None
    model_filename: str = "adapter_model.safetensors"
    labels: str | None = None  # None: the good adapter's labels.json
    http_only: bool = False  # a property of the request, not of the files
    parts: dict = field(default_factory=dict)  # extra multipart parts (HTTP only)
    omit: tuple[str, ...] = ()  # multipart parts left out (HTTP only)
    json_body: dict | None = None  # send this instead of multipart (HTTP only)
    chunked: bool = False  # stream the body without Content-Length (HTTP only)


@dataclass(frozen=True)
class Good:
    config: dict
    config_bytes: bytes
    model: bytes
    tensors: dict[str, torch.Tensor]
    labels: str


def load_good(folder: Path) -> Good:
    model = (folder / "adapter_model.safetensors").read_bytes()
    config_bytes = (folder / "adapter_config.json").read_bytes()
    return Good(
        json.loads(config_bytes), config_bytes, model, load_bytes(model), (folder / "labels.json").read_text()
    )


def hostile_cases(good: Good) -> list[Case]:
    t = good.tensors
    query_a, query_b = PREFIX + "query.lora_A.weight", PREFIX + "query.lora_B.weight"
    head_w, head_b = "base_model.model.classifier.weight", "base_model.model.classifier.bias"

    def cfg(**changes) -> bytes:
        return json.dumps({**good.config, **changes}).encode()

    def tensors(**changes) -> bytes:
        out = dict(t)
        for key, value in changes.items():
            key = {"qa": query_a, "qb": query_b, "hw": head_w, "hb": head_b}.get(key, key)
            if value is None:
                del out[key]
            else:
                out[key] = value
        return save_bytes({k: v.contiguous() for k, v in out.items()})

    def header(entries: dict, data_len: int) -> bytes:
        text = json.dumps(entries).encode()
        return struct.pack("<Q", len(text)) + text + b"\0" * data_len

    def resized(old: int, new: int) -> bytes:
        return save_bytes({k: torch.zeros([new if d == old else d for d in v.shape]) for k, v in t.items()})

    def with_rank(r: int) -> bytes:
        return save_bytes(
            {
                k: torch.zeros((r, v.shape[1]) if "lora_A" in k else (v.shape[0], r)) if "lora_" in k else v
                for k, v in t.items()
            }
        )

    nan_b = t[query_b].clone()
    nan_b[0, 0] = float("nan")
    inf_head = t[head_w].clone()
    inf_head[1, 2] = float("inf")
    pickle_buf, zip_buf = io.BytesIO(), io.BytesIO()
    torch.save(t, pickle_buf, _use_new_zipfile_serialization=False)
    torch.save(t, zip_buf)
    labels40 = json.dumps([f"l{i}" for i in range(40)])
    wide_head = {head_w: torch.zeros(40, 384), head_b: torch.zeros(40)}
    V, P413, U415 = "validation", "payload_too_large", "unsupported_media_type"
    return [
        # ids: 422 before any file or the store is touched
        Case("id traversal", 422, V, adapter_id="../../etc/passwd", http_only=True),
        Case("id uppercase", 422, V, adapter_id="Sentiment"),
        Case("id non-ascii", 422, V, adapter_id="café"),
        Case("id too long", 422, V, adapter_id="a" * 65),
        Case("id leading dot", 422, V, adapter_id=".env"),
        # not safetensors: 415, never unpickled
        Case("pickle (torch.save legacy)", 415, U415, model=pickle_buf.getvalue()),
        Case("torch.save zip checkpoint", 415, U415, model=zip_buf.getvalue()),
        Case("plain pickle named .bin", 415, U415, model=pickle.dumps({"w": [1.0]}), model_filename="a.bin"),
        Case("text instead of tensors", 415, U415, model=b"these are not the weights you are looking for"),
        Case("empty weights file", 415, U415, model=b""),
        # safetensors with a broken structure
        Case("truncated safetensors", 422, V, model=good.model[:-1000]),
        Case("header length lies", 422, V, model=struct.pack("<Q", 1 << 40) + good.model[8:]),
        Case("header not JSON", 422, V, model=struct.pack("<Q", 10) + b"{not json}" + b"\0" * 8),
        Case(
            "overlapping offsets",
            422,
            V,
            model=header(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                },
                8,
            ),
        ),
        Case(
            "offsets beyond the data",
            422,
            V,
            model=header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8),
        ),
        # tensors that would change the math
        Case("integer dtype", 422, V, model=tensors(hw=t[head_w].to(torch.int32))),
        Case("float8 dtype", 422, V, model=tensors(qa=t[query_a].to(torch.float8_e4m3fn))),
        Case("3-D tensor", 422, V, model=tensors(qa=t[query_a].unsqueeze(0))),
        Case("NaN in lora_B", 422, V, model=tensors(qb=nan_b)),
        Case("inf in the head", 422, V, model=tensors(hw=inf_head)),
        Case("adapter for hidden size 768", 422, V, model=resized(384, 768)),
        Case("lora_A rank differs from config r", 422, V, model=tensors(qa=t[query_a][:4])),
        Case("rank 0", 422, V, config=cfg(r=0), model=with_rank(0)),
        Case("rank above --max-rank", 422, V, config=cfg(r=MAX_RANK + 1), model=with_rank(MAX_RANK + 1)),
        Case("lora_A without its lora_B", 422, V, model=tensors(qb=None)),
        Case(
            "tensor for an untargeted module",
            422,
            V,
            model=tensors(**{PREFIX + "key.lora_A.weight": torch.zeros(8, 384)}),
        ),
        Case("no classification head", 422, V, model=tensors(hw=None, hb=None)),
        Case("more labels than --max-labels", 422, V, model=tensors(**wide_head), labels=labels40),
        # config
        Case("config not JSON", 422, V, config=b'{"r": 8,'),
        Case("config is an array", 422, V, config=b"[1, 2]"),
        Case("config nested 100000 deep", 422, V, config=b"[" * 100_000 + b"]" * 100_000),
        Case("DoRA", 422, V, config=cfg(use_dora=True)),
        Case("targets match nothing", 422, V, config=cfg(target_modules=["q_proj", "v_proj"])),
        Case("invalid target regex", 422, V, config=cfg(target_modules="(query")),
        Case("target regex that backtracks without end", 422, V, config=cfg(target_modules=BACKTRACKS)),
        Case("rank_pattern key that backtracks", 422, V, config=cfg(rank_pattern={BACKTRACKS: 4})),
        Case("layers_to_transform of the wrong type", 422, V, config=cfg(layers_to_transform="0-3")),
        Case("target_modules a number", 422, V, config=cfg(target_modules=5)),
        Case("modules_to_save an object", 422, V, config=cfg(modules_to_save={"classifier": 1})),
        Case("layers_to_transform with a string", 422, V, config=cfg(layers_to_transform=[0, "1"])),
        Case("use_rslora a string", 422, V, config=cfg(use_rslora="yes")),
        Case("exclude_modules a list of numbers", 422, V, config=cfg(exclude_modules=[1, 2])),
        Case("IA3 instead of LoRA", 422, V, config=cfg(peft_type="IA3")),
        Case("causal LM task", 422, V, config=cfg(task_type="CAUSAL_LM")),
        Case("PiSSA init rewrites the base", 422, V, config=cfg(init_lora_weights="pissa")),
        # labels
        Case("labels fewer than the head", 422, V, labels='["neg", "pos"]'),
        Case("labels not a JSON array", 422, V, labels="neg,neu,pos"),
        Case("duplicate labels", 422, V, labels='["a", "a", "b"]'),
        Case("label not a string", 422, V, labels='["a", 2, "b"]'),
        # sizes
        Case("weights over the upload limit", 413, P413, model=good.model + b"\0" * MAX_UPLOAD),
        Case(
            "over the limit, no Content-Length",
            413,
            P413,
            model=b"\0" * (MAX_UPLOAD + 1),
            chunked=True,
            http_only=True,
        ),
        # request shape (HTTP only)
        Case("no adapter_model part", 422, V, omit=("adapter_model",), http_only=True),
        Case("unknown part", 422, V, parts={"extra": "x"}, http_only=True),
        Case("JSON body instead of multipart", 415, U415, json_body={"adapter_config": {}}, http_only=True),
    ]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the store with its hash: equal snapshots mean an untouched store."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def engine():
    return Engine(num_slots=2, max_rank=MAX_RANK, max_labels=MAX_LABELS)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return AdapterFactory().save(tmp_path_factory.mktemp("good"), seed=7)


def test_each_case_is_its_own_upload_and_what_it_leaves_alone_is_valid(engine, good_dir):
    """A rejection means something only when the rest of the upload is fine: the good adapter, as every
    case sends what it does not change, is accepted; no case repeats another under a new name; and the
    table reaches every status an upload's files can get."""
    good = load_good(good_dir)
    validate_upload(
        "victim", good.config_bytes, good.model, parse_labels(good.labels), engine.base, max_rank=MAX_RANK,
        max_labels=MAX_LABELS, max_model_bytes=MAX_UPLOAD,
    )  # fmt: skip
    cases = hostile_cases(good)
    uploads = [repr({k: v for k, v in vars(case).items() if k not in ("name", "status", "error_type")})
               for case in cases]  # fmt: skip
    repeated = [case.name for case, u in zip(cases, uploads, strict=True) if uploads.count(u) > 1]
    assert not repeated, f"cases that send the same upload: {repeated}"
    assert {case.status for case in cases} >= {413, 415, 422}


def test_good_adapter_passes_and_matches_peft(engine, good_dir):
    good = load_good(good_dir)
    validated = validate_upload(
        "victim", good.config_bytes, good.model, parse_labels(good.labels), engine.base,
        max_rank=MAX_RANK, max_labels=MAX_LABELS, max_model_bytes=MAX_UPLOAD,
    )  # fmt: skip
    record = validated.record
    assert (record.rank, record.lora_alpha, record.target_modules) == (8, 16, ("query", "value"))
    assert record.labels == tuple(json.loads(good.labels))
    assert record.sha256 == hashlib.sha256(good.model).hexdigest() and record.size_bytes == len(good.model)
    assert record.version == validated.files.version()
    # Stored bytes load back to the same weights, and the engine with them computes what PEFT computes.
    again = load_stored(validated.files, engine.base, max_rank=MAX_RANK, max_labels=MAX_LABELS)
    assert torch.equal(again.head["classifier.weight"], validated.weights.head["classifier.weight"])
    engine.load_slot(0, again)
    ids = engine.tokenize(TEXTS)
    ours = torch.stack(engine.classify(ids, [0] * len(ids)))
    torch.testing.assert_close(ours, PeftReference().logits(good_dir, TEXTS), atol=1e-5, rtol=0)


def test_hostile_uploads_are_rejected_and_store_is_untouched(engine, good_dir, tmp_path):
    good = load_good(good_dir)
    store = DirectoryStore(tmp_path / "store")
    registry = Registry(store, engine, max_rank=MAX_RANK, max_labels=MAX_LABELS)

    async def run() -> list[str]:
        record, created = await registry.import_dir("victim", good_dir)
        assert created
        before = snapshot(store.root)
        failures = []
        for case in hostile_cases(good):
            if case.http_only:
                continue
            config = case.config if case.config is not None else good.config_bytes
            model = case.model if case.model is not None else good.model
            raw_labels = case.labels if case.labels is not None else good.labels
            try:
                validate_upload(
                    case.adapter_id, config, model, parse_labels(raw_labels), engine.base, max_rank=MAX_RANK,
                    max_labels=MAX_LABELS, max_model_bytes=MAX_UPLOAD, model_filename=case.model_filename,
                )  # fmt: skip
                failures.append(f"{case.name}: accepted")
            except LoraplexError as exc:
                if (STATUS.get(exc.error_type), exc.error_type) != (case.status, case.error_type):
                    failures.append(f"{case.name}: {exc.error_type} ({exc.message})")
                elif len(exc.message) < 20:
                    failures.append(f"{case.name}: message too short to act on: {exc.message!r}")
            if case.status != 413:  # the registry path (size limits are the HTTP layer's, streamed)
                with pytest.raises(LoraplexError):
                    labels = parse_labels(raw_labels)
                    await registry.put(
                        case.adapter_id, config, model, labels, model_filename=case.model_filename
                    )
            assert snapshot(store.root) == before, case.name
        assert (await registry.get("victim")).version == record.version
        return failures

    assert asyncio.run(run()) == []


def test_messages_name_what_is_wrong(engine, good_dir):
    good = load_good(good_dir)
    by_name = {c.name: c for c in hostile_cases(good)}
    expected = {
        "NaN in lora_B": "lora_B",
        "adapter for hidden size 768": "768",
        "rank above --max-rank": "--max-rank",
        "labels fewer than the head": "labels",
        "DoRA": "use_dora",
        "integer dtype": "classifier.weight",
        "truncated safetensors": "safetensors",
        "pickle (torch.save legacy)": "pickle",
        "target_modules a number": "Field 'target_modules'",
        "layers_to_transform with a string": "Field 'layers_to_transform'",
        "use_rslora a string": "Field 'use_rslora'",
        "invalid target regex": "'(query' is not a regular expression",
        "target regex that backtracks without end": "takes longer than",
        "rank_pattern key that backtracks": "the pattern '(?:(.)(.)",  # its own, not the one built on it
    }
    for name, fragment in expected.items():
        case = by_name[name]
        with pytest.raises(LoraplexError) as info:
            validate_upload(
                case.adapter_id,
                case.config if case.config is not None else good.config_bytes,
                case.model if case.model is not None else good.model,
                parse_labels(case.labels if case.labels is not None else good.labels),
                engine.base,
                max_rank=MAX_RANK,
                max_labels=MAX_LABELS,
            )
        assert fragment in info.value.message, (name, info.value.message)


def test_a_fault_of_the_parser_is_not_blamed_on_the_adapter(engine, good_dir, monkeypatch):
    """Field types are checked before parsing, so a TypeError from the parser is a bug and surfaces as
    one (the server's 500 with its traceback logged), not as a 422 telling the client its config is bad."""
    import loraplex.adapters.validate as validate

    def broken_parser(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(validate, "parse_adapter", broken_parser)
    good = load_good(good_dir)
    with pytest.raises(TypeError):
        validate_upload(
            "good", good.config_bytes, good.model, parse_labels(good.labels), engine.base,
            max_rank=MAX_RANK, max_labels=MAX_LABELS,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("saved", "module"),
    [
        (["classifier", "LayerNorm"], "LayerNorm"),
        (["classifier", "word_embeddings"], "word_embeddings"),
        (["pooler", "classifier"], "pooler"),
    ],  # fmt: skip
)
def test_a_module_saved_inside_the_shared_encoder_is_refused_by_name(engine, tmp_path, saved, module):
    """PEFT saves modules_to_save whole; inside the encoder (norms, embeddings, BERT's pooler) such a copy
    would change the one encoder every adapter shares, so the upload is a 422 that names the module and what
    may be saved, never a silent drop of the tensors the adapter was trained with."""
    from tests.peft_factory import save_peft_adapter

    folder = save_peft_adapter(tmp_path / "a", modules_to_save=saved)
    tensors = load_bytes((folder / "adapter_model.safetensors").read_bytes())
    assert any(f".{module}." in key for key in tensors), sorted(tensors)  # PEFT did save it
    with pytest.raises(LoraplexError) as info:
        validate_upload(
            "inside",
            (folder / "adapter_config.json").read_bytes(),
            (folder / "adapter_model.safetensors").read_bytes(),
            parse_labels((folder / "labels.json").read_text()),
            engine.base,
            max_rank=MAX_RANK,
            max_labels=MAX_LABELS,
        )
    assert STATUS[info.value.error_type] == 422
    assert f"'{module}'" in info.value.message and "classifier" in info.value.message, info.value.message
