"""Hostile-input checks for uploaded adapter files, before anything is stored.

The order is cheap-to-expensive: id allowlist, sizes (streamed, see `loraplex.adapters.upload`), file type
sniffing (pickle, zip or anything else that is not safetensors -> UnsupportedMediaError; nothing is ever
unpickled), the safetensors structure (parsed by safetensors' own loader, which checks the header length,
the JSON, and that the offsets cover the data exactly), dtypes and ranks of every tensor, and finally
`loraplex.adapters.peft.parse_adapter`, which applies PEFT's config semantics and checks names, shapes,
ranks, finiteness and the head against the base model. Every rejection is a LoraplexError whose message
names the file, field, key or shape at fault.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from loraplex.adapters.errors import InvalidAdapterError, UnsupportedMediaError
from loraplex.adapters.peft import AdapterWeights, BaseSpec, parse_adapter
from loraplex.adapters.store import AdapterFiles, AdapterRecord, check_adapter_id, utc_now
from loraplex.adapters.upload import check_size, parse_config, short

# What the engine can hold in a slot; float8 and integer tensors would silently change the math.
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip around a pickle
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class ValidatedAdapter:
    """An upload that passed every check: what to store, what the manifest says, and the weights."""

    record: AdapterRecord
    files: AdapterFiles
    weights: AdapterWeights
    warnings: tuple[str, ...] = ()  # accepted, but maybe not what the owner meant (`upload_warnings`)


def load_tensors(data: bytes, filename: str | None = None) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors bytes -> tensors, with safetensors' own loader and nothing else."""
    named_pickle = bool(filename) and filename.lower().endswith(PICKLE_SUFFIXES)
    if named_pickle or data.startswith((*PICKLE_PROTOCOLS, ZIP_MAGIC)):
        raise UnsupportedMediaError(
            "adapter_model looks like a pickle/PyTorch checkpoint; loraplex never unpickles uploads. "
            "Save the adapter with safe_serialization=True (adapter_model.safetensors)."
        )
    # A safetensors file starts with an 8-byte little-endian header length followed by the JSON header.
    if len(data) < 10 or data[8:9] != b"{":
        raise UnsupportedMediaError(
            "adapter_model is not a safetensors file; upload the adapter_model.safetensors that PEFT saves."
        )
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as exc:
        raise InvalidAdapterError(f"adapter_model.safetensors is damaged: {short(exc)}.") from None
    if not tensors:
        raise InvalidAdapterError("adapter_model.safetensors holds no tensors.")
    for key, tensor in tensors.items():
        if tensor.dtype not in ALLOWED_DTYPES:
            raise InvalidAdapterError(
                f"Tensor '{key}' has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                "use float32, float16, bfloat16 or float64."
            )
    return tensors


def _strings(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _ints(value) -> bool:
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return is_int(value) or (isinstance(value, list) and all(is_int(v) for v in value))


# The config fields that the parser reads as names, patterns or layer numbers, and what PEFT saves in
# them (None is always allowed: the field is unset). r, lora_alpha and the patterns are checked by
# the parser itself, with its own messages.
FIELD_TYPES = {
    "target_modules": ("a module name, a regex, or a list of names", _strings),
    "exclude_modules": ("a module name, a regex, or a list of names", _strings),
    "modules_to_save": ("a list of module names", _strings),
    "layers_to_transform": ("a layer index or a list of them", _ints),
    "layers_pattern": ("a name or a list of names", _strings),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "base_model_name_or_path": ("a string", lambda v: isinstance(v, str)),
    "task_type": ("a string", lambda v: isinstance(v, str)),
    "problem_type": ("a string", lambda v: isinstance(v, str)),
}


def check_field_types(config) -> None:
    """InvalidAdapterError naming the first field of FIELD_TYPES whose value has the wrong type."""
    if not isinstance(config, dict):
        raise InvalidAdapterError("adapter_config.json must be a JSON object.")
    for field, (kind, ok) in FIELD_TYPES.items():
        value = config.get(field)
        if value is not None and not ok(value):
            raise InvalidAdapterError(
                f"Field '{field}' of adapter_config.json must be {kind}, got {repr(value)[:80]}."
            )


def build_weights(
    config: dict,
    tensors: dict[str, torch.Tensor],
    base: BaseSpec,
    *,
    labels: list[str] | None,
    max_rank: int,
    max_labels: int,
) -> AdapterWeights:
    """`parse_adapter` plus the engine's capacity; malformed config values become InvalidAdapterError.

    The types of the config fields are checked first (`check_field_types`), so that an error the parser
    raises past that is a fault of the parser, reported as such, and not blamed on the adapter.
    """
    check_field_types(config)
    try:
        weights = parse_adapter(config, tensors, base, labels=labels, max_rank=max_rank)
    except (ValueError, OverflowError, RecursionError) as exc:
        # a value of the right type that cannot be used, e.g. a target pattern that is no regex
        raise InvalidAdapterError(f"adapter_config.json has an invalid value: {short(exc)}.") from None
    if weights.num_labels > max_labels:
        raise InvalidAdapterError(
            f"The classification head has {weights.num_labels} labels; this server accepts at most "
            f"{max_labels} (--max-labels)."
        )
    return weights


def validate_upload(
    adapter_id: str,
    config_bytes: bytes,
    model_bytes: bytes,
    labels: list[str] | None,
    base: BaseSpec,
    *,
    max_rank: int,
    max_labels: int,
    max_model_bytes: int | None = None,
    model_filename: str | None = None,
) -> ValidatedAdapter:
    """Check an upload end to end and return what the store should keep. Blocking: run off the loop."""
    check_adapter_id(adapter_id)
    if max_model_bytes is not None:
        check_size(model_bytes, max_model_bytes, "adapter_model.safetensors")
    config = parse_config(config_bytes)
    tensors = load_tensors(model_bytes, model_filename)
    weights = build_weights(config, tensors, base, labels=labels, max_rank=max_rank, max_labels=max_labels)
    files = AdapterFiles(config=config_bytes, model=model_bytes, labels=weights.labels)
    record = AdapterRecord(
        adapter_id=adapter_id,
        version=files.version(),
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        rank=weights.rank,
        lora_alpha=weights.lora_alpha,
        target_modules=weights.target_modules,
        labels=weights.labels,
        size_bytes=len(model_bytes),
        created_at=utc_now(),
        task_type=weights.task,
    )
    warnings = upload_warnings(config, labels, weights, base)
    return ValidatedAdapter(record=record, files=files, weights=weights, warnings=warnings)


def upload_warnings(
    config: dict, labels: list[str] | None, weights: AdapterWeights, base: BaseSpec
) -> tuple[str, ...]:
    """What an upload that fits the base gets told anyway: its config names another base model (same
    shapes, other weights: its answers are likely wrong), or it sent no label names for a head."""
    warnings = []
    trained = config.get("base_model_name_or_path")
    served = {_model_name(name) for name in (base.model_name, *base.aliases)}
    if isinstance(trained, str) and trained.strip() and _model_name(trained) not in served:
        warnings.append(
            f"adapter_config.json names base model {trained[:200]!r}, but this server serves "
            f"{base.model_name!r}; the shapes fit, but an adapter trained on other weights gives wrong "
            "answers. Train it on the served model, or serve the model it was trained on."
        )
    if labels is None and weights.num_labels > 0:
        names = ", ".join(weights.labels[:3]) + (", ..." if weights.num_labels > 3 else "")
        warnings.append(
            f"No labels were sent (no labels part, or no labels.json in the folder): the head's "
            f"{weights.num_labels} outputs are named {names}. Send the label names in head order."
        )
    return tuple(warnings)


def _model_name(name: str) -> str:
    """A model's name without where it lives: "org/all-MiniLM-L6-v2" and "/models/all-minilm-l6-v2/"
    name the same model."""
    return name.strip().rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def load_stored(files: AdapterFiles, base: BaseSpec, *, max_rank: int, max_labels: int) -> AdapterWeights:
    """Weights of a stored version, checked again: a shared store is input too."""
    tensors = load_tensors(files.model)
    return build_weights(
        parse_config(files.config),
        tensors,
        base,
        labels=list(files.labels),
        max_rank=max_rank,
        max_labels=max_labels,
    )
