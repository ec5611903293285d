"""PEFT LoRA adapters of the encoder tasks: config semantics and tensor layout.

`parse_adapter` turns a PEFT `adapter_config.json` (as a dict) and the tensors of its
`adapter_model.safetensors` into `AdapterWeights`, the form the engine writes into a slot.
It applies PEFT's rules exactly (target matching, rank/alpha patterns, rsLoRA, layer
selection) and rejects anything that would change the math with an `InvalidAdapterError`
naming the field, key or shape.

The config's `task_type` says what the adapter computes (`TASKS`): SEQ_CLS (or none) a head on the
pooled output, TOKEN_CLS a head on every token, QUESTION_ANS PEFT's `qa_outputs` on every token
(start and end logits), FEATURE_EXTRACTION no head (the encoder's hidden states, pooled by the
caller). PEFT saves FEATURE_EXTRACTION adapters of the bare encoder, so their keys lack the
encoder prefix ("base_model.model.encoder...", not "base_model.model.bert.encoder..."). An optional
`problem_type` field (not one of PEFT's; PEFT ignores it when loading) gives a SEQ_CLS head's
`problem_type` as Hugging Face's configs name it: single_label_classification (softmax),
multi_label_classification (a sigmoid per label) or regression (raw scores, the default for one label).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import regex
import torch

from loraplex.adapters.errors import InvalidAdapterError


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter must fit: the shapes and module names of the frozen base model."""

    model_name: str  # what the server serves: a checkpoint directory or hub id
    model_type: str  # config.model_type, e.g. "bert", "roberta"
    prefix: str  # attribute of the encoder inside the PEFT model, e.g. "bert"
    hidden_size: int
    num_layers: int
    max_length: int  # tokens, special tokens included
    # LoRA-capable linear layers, path relative to the encoder -> (in_features, out_features),
    # e.g. "encoder.layer.0.attention.self.query" -> (384, 384), "pooler.dense" -> (384, 384)
    targets: dict[str, tuple[int, int]]
    # every module name of the classification model as PEFT sees it ("bert.embeddings", "classifier", ...)
    module_names: tuple[str, ...]
    default_targets: tuple[str, ...]  # PEFT's default target_modules for this family
    # the head's tensors as PEFT saves them (modules_to_save) -> shape, None where the label count goes,
    # e.g. "classifier.dense.weight" -> (768, 768), "classifier.out_proj.weight" -> (None, 768)
    head_tensors: dict[str, tuple[int | None, ...]]
    # head tensors that the base checkpoint itself holds (e.g. ModernBERT's head.dense from its MLM
    # head): an adapter that does not save them uses these, as PEFT does
    head_defaults: dict[str, torch.Tensor]
    # the heads of the other tasks (TOKEN_CLS, QUESTION_ANS), keyed like head_tensors
    task_head_tensors: dict[str, dict[str, tuple[int | None, ...]]] | None = None
    # other names of the served model, e.g. the directory that the embedded model's hub id is read from
    aliases: tuple[str, ...] = ()

    def for_task(self, task: str) -> BaseSpec:
        """This base as an adapter of `task` sees it: that task's head, and the modules its model has."""
        if task == SEQ_CLS:
            return self
        heads = (self.task_head_tensors or {}).get(task, {}) if task != FEATURE_EXTRACTION else {}
        if task != FEATURE_EXTRACTION and not heads:
            raise InvalidAdapterError(f"Adapters of task_type {task!r} are not served on {self.model_type}.")
        names = self.module_names
        if task != FEATURE_EXTRACTION:  # ...ForTokenClassification / ForQuestionAnswering have no pooler
            names = tuple(n for n in names if not n.startswith(f"{self.prefix}.pooler"))
        return replace(self, head_tensors=heads, module_names=names)

    @property
    def head_modules(self) -> tuple[str, ...]:
        """Top-level module names of the head, e.g. ("classifier",) or ("pre_classifier", "classifier")."""
        return tuple(dict.fromkeys(name.split(".", 1)[0] for name in self.head_tensors))

    def served(self, config: dict) -> str:
        """A sentence naming the adapter's base model and the one served, for shape and name mismatches."""
        trained = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        return (
            f" The adapter was trained on {str(trained)[:200]!r}; this server serves {self.model_name!r} "
            f"({self.model_type}, hidden size {self.hidden_size}, {self.num_layers} layers)."
        )


@dataclass(frozen=True)
class LoraModule:
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA


SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION = (
    "SEQ_CLS",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
TASKS = (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION)
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, fp32 on the CPU, ready to be written into an engine slot."""

    modules: dict[str, LoraModule]  # keyed like BaseSpec.targets
    head: dict[str, torch.Tensor]  # keyed like BaseSpec.head_tensors, e.g. "classifier.weight" [labels, H]
    num_labels: int
    labels: tuple[str, ...]  # len == num_labels, in head order
    rank: int  # largest r over modules
    lora_alpha: float
    target_modules: tuple[str, ...]  # short names of the targeted layers, e.g. ("query", "value")
    task: str = SEQ_CLS  # one of TASKS
    problem_type: str = "single_label_classification"  # SEQ_CLS: one of PROBLEM_TYPES


HEAD_NAMES = ("classifier", "score", "qa_outputs")  # what PEFT puts in modules_to_save for its tasks
KEY_PREFIX = "base_model.model."
LAYER_INDEX_FREE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
# The patterns of a config (target_modules, exclude_modules, modules_to_save, layers_pattern and the keys
# of rank_pattern / alpha_pattern) come from whoever uploaded the adapter. `re` has no time bound and holds
# the GIL, so one pattern that backtracks without end would stall the whole server; they are matched by
# `regex` with the GIL released and a bound far above what any real pattern takes on a module name
# (microseconds), and the first that runs past it refuses the adapter.
PATTERN_TIMEOUT_S = 0.5

# Fields that only matter while training or saving; they never change what a saved adapter computes.
_INERT_FIELDS = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "ensure_weight_tying",
    "eva_config",
    "loftq_config",
    "corda_config",
    "lora_ga_config",
    "fan_in_fan_out",
    "task_type",
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "init_lora_weights",
    "bias",
    "use_dora",
    "lora_bias",
    "problem_type",
}
# Initialisations that rewrite the base weights: the adapter is only correct on that rewritten base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _check_config(config: dict) -> None:
    if not isinstance(config, dict):
        raise InvalidAdapterError("adapter_config.json must be a JSON object.")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidAdapterError(f"Field 'peft_type' is {peft_type!r}; loraplex serves only LORA adapters.")
    task_type = config.get("task_type")
    if task_type is not None and task_type not in TASKS:
        raise InvalidAdapterError(
            f"Field 'task_type' is {str(task_type)[:80]!r}; loraplex serves {', '.join(TASKS)} adapters."
        )
    problem_type = config.get("problem_type")
    if problem_type is not None and (task_type not in (None, SEQ_CLS) or problem_type not in PROBLEM_TYPES):
        raise InvalidAdapterError(
            f"Field 'problem_type' is {str(problem_type)[:80]!r}; it is for SEQ_CLS adapters and one of "
            f"{', '.join(PROBLEM_TYPES)}."
        )
    if config.get("use_dora"):
        raise InvalidAdapterError("Field 'use_dora' is true; DoRA adapters are not supported; use LoRA.")
    if config.get("bias", "none") != "none":
        raise InvalidAdapterError(f"Field 'bias' is {config.get('bias')!r}; only bias='none' is supported.")
    if config.get("lora_bias"):
        raise InvalidAdapterError("Field 'lora_bias' is true; LoRA biases are not supported.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise InvalidAdapterError(
            f"Field 'init_lora_weights' is {init!r}, which rewrites the base model's weights; convert the "
            "adapter to plain LoRA (PEFT's path_initial_model_for_weight_conversion) before uploading."
        )
    for field in ("r", "lora_alpha"):
        value = config.get(field, 8)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise InvalidAdapterError(f"Field '{field}' must be a positive number, got {value!r}.")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in pattern.values()
        ):
            raise InvalidAdapterError(f"Field '{field}' must map module patterns to positive numbers.")
    for field, value in config.items():
        if field not in _INERT_FIELDS and not _is_unset(value):
            raise InvalidAdapterError(
                f"Field '{field}' is set to {value!r}; loraplex cannot serve that LoRA variant exactly, "
                "so the adapter is rejected rather than served with different math."
            )


def _pattern_match(
    pattern: str, key: str, *, whole: bool = False, given: str | None = None
) -> regex.Match | None:
    """`re.match` (or `re.fullmatch`) of a pattern built from the adapter's own `given` one (default:
    `pattern` itself), bounded in time (`PATTERN_TIMEOUT_S`); errors name the adapter's pattern."""
    shown = repr((given or pattern)[:80])
    match = regex.fullmatch if whole else regex.match
    try:
        return match(pattern, key, timeout=PATTERN_TIMEOUT_S, concurrent=True)
    except TimeoutError:
        raise ValueError(
            f"the pattern {shown} takes longer than {PATTERN_TIMEOUT_S} s to match one module name"
        ) from None
    except regex.error as exc:
        raise ValueError(f"{shown} is not a regular expression ({exc})") from None


def _matches_list(key: str, names: list[str]) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = LAYER_INDEX_FREE.match(key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = _pattern_match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, given=pattern)
            if match:
                break
    return int(match.group("idx")) if match else None


def _is_target(config: dict, key: str, default_targets: tuple[str, ...]) -> bool:
    """PEFT's `check_target_module_exists` for one module name of the classification model."""
    exclude = config.get("exclude_modules")
    if exclude and (
        _pattern_match(exclude, key, whole=True) if isinstance(exclude, str) else _matches_list(key, exclude)
    ):
        return False
    modules_to_save = config.get("modules_to_save") or []
    if any(_pattern_match(rf"(^|.*\.){m}($|\..*)", key, given=m) for m in modules_to_save):
        return False
    targets = config.get("target_modules")
    if targets is None:
        targets = list(default_targets)
    if isinstance(targets, str):
        return _pattern_match(targets, key, whole=True) is not None
    if key in targets:
        return True
    if not _matches_list(key, targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(key, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module name wins."""
    for pattern, value in patterns.items():
        if _pattern_match(rf"(.*\.)?({pattern})$", key, given=pattern):
            return value
    return default


def _head_linears(base: BaseSpec) -> dict[str, tuple[int, int]]:
    """The head's dense layers before the one that outputs the labels -> (in_features, out_features).

    PEFT's all-linear puts LoRA on them unless modules_to_save saves them whole (ModernBERT's head.dense
    under the default modules_to_save); such a LoRA is merged into the head's weight (`parse_adapter`).
    """
    return {
        name.removesuffix(".weight"): (shape[1], shape[0])
        for name, shape in base.head_tensors.items()
        if name.endswith(".weight") and len(shape) == 2 and None not in shape
    }


def matched_targets(config: dict, base: BaseSpec) -> list[str]:
    """Paths (relative to the encoder, as in `base.targets`) that this config adapts, in model order.

    A LoRA on a head linear (`_head_linears`) comes back by its full module name, e.g. "head.dense".
    """
    _check_config(config)
    targets = config.get("target_modules")
    head_linears = _head_linears(base)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # PEFT's all-linear: every Linear but the label layer; modules_to_save still exclude theirs
        names = [*(f"{base.prefix}.{path}" for path in base.targets), *head_linears]
        config = {**config, "target_modules": names}
    elif isinstance(targets, set | tuple):
        config = {**config, "target_modules": sorted(targets)}
    elif targets is not None and not isinstance(targets, str | list):
        raise InvalidAdapterError("Field 'target_modules' must be a list of module names or a regex string.")
    head_modules = (*HEAD_NAMES, *base.head_modules)
    for name in config.get("modules_to_save") or []:
        if name not in head_modules and any(_matches_list(m, [name]) for m in base.module_names):
            raise InvalidAdapterError(
                f"Field 'modules_to_save' lists '{name}', a module of the encoder that every adapter "
                f"shares; only the head ({', '.join(base.head_modules)}) may be saved whole. Train without "
                f"'{name}' in modules_to_save; LoRA on the encoder's linear layers is served."
            )
    matched = []
    for name in base.module_names:
        if not _is_target(config, name, base.default_targets):
            continue
        if name in head_linears:
            # PEFT saves whole every module whose name merely ends in a modules_to_save entry (DistilBERT's
            # pre_classifier under "classifier"), and refuses to load one that is also a LoRA target.
            saved_by = [m for m in config.get("modules_to_save") or [] if name.endswith(m)]
            if saved_by:
                raise InvalidAdapterError(
                    f"Field 'target_modules' matches '{name}', which modules_to_save entry '{saved_by[0]}' "
                    "also saves whole; PEFT cannot load such an adapter. Drop it from target_modules, or "
                    f"list '{name}' in modules_to_save."
                )
            matched.append(name)
            continue
        path = name.removeprefix(f"{base.prefix}.")
        if path not in base.targets or not name.startswith(f"{base.prefix}."):
            if name.split(".", 1)[0] in base.head_modules:
                # e.g. DeBERTa's pooler.dense: PEFT's all-linear, or a plain "dense", adapts it unless the
                # head is saved whole; loraplex serves heads only saved whole.
                raise InvalidAdapterError(
                    f"Field 'target_modules' matches '{name}', part of the classification head, which "
                    f"the adapter must save whole: train it with modules_to_save={list(base.head_modules)!r}."
                )
            what = "an embedding" if "embeddings" in name else "not a LoRA-capable linear layer"
            linears = ", ".join(dict.fromkeys(p.rsplit(".", 1)[-1] for p in base.targets))
            raise InvalidAdapterError(
                f"Field 'target_modules' matches '{name}', which is {what}; target only the linear layers "
                f"({linears})."
            )
        matched.append(path)
    if not matched:
        raise InvalidAdapterError(
            f"Field 'target_modules' ({targets!r}) matches no linear layer of the base model."
            + base.served(config)
        )
    return matched


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], served: str) -> torch.Tensor:
    tensor = tensors[key]
    if not tensor.is_floating_point():
        raise InvalidAdapterError(f"Tensor '{key}' has dtype {tensor.dtype}; weights must be floating point.")
    if tuple(tensor.shape) != shape:
        raise InvalidAdapterError(
            f"Tensor '{key}' has shape {list(tensor.shape)}, expected {list(shape)} for this base model."
            + served
        )
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise InvalidAdapterError(f"Tensor '{key}' contains NaN or infinite values.")
    return tensor


def _check_family(config: dict, tensors: dict[str, torch.Tensor], base: BaseSpec) -> None:
    """Every tensor lives under the served encoder or its head; anything else is another model's."""
    own = (base.prefix, *HEAD_NAMES, *base.head_modules)
    for key in tensors:
        top = key.removeprefix(KEY_PREFIX).split(".", 1)[0]
        if key.startswith(KEY_PREFIX) and top not in own:
            raise InvalidAdapterError(
                f"Tensor '{key}' belongs to a '{top}' model, not to the served {base.model_type} "
                f"encoder ('{base.prefix}')." + base.served(config)
            )


def parse_adapter(
    config: dict,
    tensors: dict[str, torch.Tensor],
    base: BaseSpec,
    *,
    labels: list[str] | None = None,
    max_rank: int = 64,
) -> AdapterWeights:
    """Check a PEFT LoRA adapter of one of `TASKS` against `base` and return its weights in engine form."""
    _check_config(config)
    task = config.get("task_type") or SEQ_CLS
    base = base.for_task(task)
    if task == FEATURE_EXTRACTION:
        config, tensors = _under_prefix(config, tensors, base.prefix)
    paths = matched_targets(config, base)
    _check_family(config, tensors, base)
    served = base.served(config)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    expected: set[str] = set()
    modules: dict[str, LoraModule] = {}
    head_linears = _head_linears(base)
    head_loras: dict[str, LoraModule] = {}  # LoRA on a head linear, merged into its weight below
    for path in paths:
        name = path if path in head_linears else f"{base.prefix}.{path}"
        r = _pattern_value(rank_pattern, name, r_default)
        alpha = _pattern_value(alpha_pattern, name, alpha_default)
        if int(r) != r or not 1 <= r <= max_rank:
            raise InvalidAdapterError(
                f"Module '{name}' has rank {r}; this server accepts ranks from 1 to {max_rank} (--max-rank)."
            )
        r = int(r)
        in_features, out_features = head_linears[path] if path in head_linears else base.targets[path]
        key_a, key_b = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
        for key in (key_a, key_b):
            if key not in tensors:
                raise InvalidAdapterError(f"Tensor '{key}' is missing: the config targets '{name}'." + served)
        expected.update((key_a, key_b))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        module = LoraModule(
            lora_A=_tensor(tensors, key_a, (r, in_features), served),
            lora_B=_tensor(tensors, key_b, (out_features, r), served),
            scaling=float(scaling),
        )
        (head_loras if path in head_linears else modules)[path] = module

    head, num_labels = _parse_head(config, tensors, base, served)
    expected.update(KEY_PREFIX + name for name in head if KEY_PREFIX + name in tensors)
    for path, module in head_loras.items():  # W + scaling * B @ A: the same layer, merged as PEFT merges
        key = f"{path}.weight"
        head[key] = head[key] + module.scaling * (module.lora_B @ module.lora_A)

    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise InvalidAdapterError(
            f"Tensor '{unexpected[0]}' does not belong to any module this adapter's config targets"
            + (f" (and {len(unexpected) - 1} more)." if len(unexpected) > 1 else ".")
        )
    labels = [f"LABEL_{i}" for i in range(num_labels)] if labels is None else labels
    if len(labels) != num_labels:
        raise InvalidAdapterError(
            f"'labels' has {len(labels)} names but the classification head has {num_labels} outputs."
        )
    if len(set(labels)) != len(labels):
        raise InvalidAdapterError("'labels' contains duplicate names.")
    if task == QUESTION_ANS and num_labels != 2:
        raise InvalidAdapterError(
            f"The question-answering head has {num_labels} outputs; it needs 2 (start and end logits)."
        )
    short_names = tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))
    problem_type = config.get("problem_type") or (
        "regression" if num_labels == 1 else "single_label_classification"
    )
    return AdapterWeights(
        modules=modules,
        head=head,
        num_labels=num_labels,
        labels=tuple(labels),
        rank=max(m.lora_A.shape[0] for m in (*modules.values(), *head_loras.values())),
        lora_alpha=float(alpha_default),
        target_modules=short_names,
        task=task,
        problem_type=problem_type,
    )


def _under_prefix(config: dict, tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """A FEATURE_EXTRACTION adapter (saved on the bare encoder) named as under the encoder's prefix.

    Keys gain the prefix; a regex `target_modules` or `exclude_modules` is anchored below it, so that it
    matches exactly the names it matched in the bare encoder.
    """
    config = dict(config)
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str) and value.lower() != "all-linear":
            config[field] = rf"{re.escape(prefix)}\.(?:{value})"
    renamed = {
        (f"{KEY_PREFIX}{prefix}.{key.removeprefix(KEY_PREFIX)}" if key.startswith(KEY_PREFIX) else key): value
        for key, value in tensors.items()
    }
    return config, renamed


def _parse_head(
    config: dict, tensors: dict[str, torch.Tensor], base: BaseSpec, served: str
) -> tuple[dict[str, torch.Tensor], int]:
    """The head's tensors (saved whole by PEFT, or the base checkpoint's own) and its label count."""
    if not base.head_tensors:  # FEATURE_EXTRACTION: the encoder's output is the answer
        return {}, 0
    label_name = next(name for name, shape in base.head_tensors.items() if None in shape and len(shape) == 2)
    weight_key = KEY_PREFIX + label_name
    if weight_key not in tensors:
        raise InvalidAdapterError(
            f"Tensor '{weight_key}' is missing: the adapter has no classification head "
            "(train it with task_type='SEQ_CLS')." + served
        )
    width = base.head_tensors[label_name][1]
    head_shape = tuple(tensors[weight_key].shape)
    if len(head_shape) != 2 or head_shape[1] != width or head_shape[0] < 1:
        raise InvalidAdapterError(
            f"Tensor '{weight_key}' has shape {list(head_shape)}, expected [num_labels, {width}]: "
            "the head was trained for another hidden size." + served
        )
    num_labels = head_shape[0]
    head: dict[str, torch.Tensor] = {}
    for name, shape in base.head_tensors.items():
        key = KEY_PREFIX + name
        if key in tensors:
            head[name] = _tensor(tensors, key, tuple(num_labels if d is None else d for d in shape), served)
        elif name in base.head_defaults and None not in shape:
            head[name] = base.head_defaults[name]
        else:
            module = name.rsplit(".", 1)[0]
            raise InvalidAdapterError(
                f"Tensor '{key}' is missing: the {base.model_type} classification head includes '{module}', "
                "which the base checkpoint does not hold, so the adapter must save it; train it with "
                f"modules_to_save={list(base.head_modules)!r}."
            )
    return head, num_labels
