"""Task heads, one per slot, stacked: every family's head layout as a list of stages.

A family describes its head as the stages PEFT saves in `modules_to_save` after pooling, e.g. RoBERTa's
`Dense("classifier.dense", hidden) -> Act("tanh") -> Dense("classifier.out_proj")`. `SlotHead` keeps one
copy of every stage per slot, so adapters with different label counts share a batch: the last dense is
zero-padded to `max_labels` and each row's logits are read up to its own adapter's label count.

Token-level tasks have heads of their own (`task_heads`), run on every token: `classifier` for
TOKEN_CLS and `qa_outputs` for QUESTION_ANS (start and end logits) in Hugging Face's
...ForTokenClassification and ...ForQuestionAnswering; a family whose models differ (ModernBERT) says so
with a `token_head(config, task)` of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from loraplex.adapters.peft import QUESTION_ANS, SEQ_CLS, TOKEN_CLS


@dataclass(frozen=True)
class Dense:
    path: str  # module path in the ...ForSequenceClassification model, e.g. "classifier.out_proj"
    out: int | None = None  # output width; None: the adapter's number of labels (the last stage)
    bias: bool = True


@dataclass(frozen=True)
class Act:
    name: str  # a transformers activation name: "tanh", "gelu", "relu", ...


@dataclass(frozen=True)
class Norm:
    path: str  # a LayerNorm over the features
    eps: float
    bias: bool = True


HeadStage = Dense | Act | Norm


def task_heads(family, config) -> dict[str, tuple[HeadStage, ...]]:
    """The head layout of every task with a head: SEQ_CLS on the pooled row, the others on every token."""
    token_head = getattr(family, "token_head", None)
    heads = {SEQ_CLS: family.head(config)}
    for task, default in ((TOKEN_CLS, (Dense("classifier"),)), (QUESTION_ANS, (Dense("qa_outputs"),))):
        heads[task] = token_head(config, task) if token_head else default
    return heads


def head_tensors(stages: tuple[HeadStage, ...], hidden: int) -> dict[str, tuple[int | None, ...]]:
    """The tensors an adapter's head must have, name -> shape, None where the label count goes."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    width = hidden
    for stage in stages:
        if isinstance(stage, Dense):
            shapes[f"{stage.path}.weight"] = (stage.out, width)
            if stage.bias:
                shapes[f"{stage.path}.bias"] = (stage.out,)
            width = stage.out
        elif isinstance(stage, Norm):
            shapes[f"{stage.path}.weight"] = (width,)
            if stage.bias:
                shapes[f"{stage.path}.bias"] = (width,)
    return shapes


class SlotHead(nn.Module):
    """`slots` heads of one layout; row i of a batch goes through the head in slot `idx[i]`."""

    def __init__(
        self, stages: tuple[HeadStage, ...], hidden: int, slots: int, max_labels: int, dtype: torch.dtype
    ):
        super().__init__()
        if not stages or not isinstance(stages[-1], Dense) or stages[-1].out is not None:
            raise ValueError("a head ends with the dense layer that outputs the labels")
        self.stages = stages
        self.max_labels = max_labels
        self.acts = nn.ModuleList(ACT2FN[s.name] if isinstance(s, Act) else nn.Identity() for s in stages)
        # One buffer per tensor of `head_tensors`, with a leading slot dimension:
        # dense [slots, out, in] and [slots, out]; norm [slots, width].
        self.names: dict[str, str] = {}
        for key, shape in head_tensors(stages, hidden).items():
            buffer = "head_" + key.replace(".", "_")
            size = tuple(max_labels if d is None else d for d in shape)
            self.register_buffer(buffer, torch.zeros(slots, *size, dtype=dtype))
            self.names[key] = buffer

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`x [B, hidden]` pooled rows (or `[B, T, hidden]` tokens) -> logits `[B, max_labels]` (or
        `[B, T, max_labels]`), zero past each adapter's labels."""
        out = x.new_zeros(*x.shape[:-1], self.max_labels)
        order = torch.argsort(idx)
        slots, counts = torch.unique_consecutive(idx[order], return_counts=True)
        start = 0
        for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
            rows = order[start : start + count]
            start += count
            out[rows] = self._run(x[rows], slot)
        return out

    def _run(self, y: torch.Tensor, slot: int) -> torch.Tensor:
        for stage, act in zip(self.stages, self.acts, strict=True):
            if isinstance(stage, Dense):
                bias = self._get(f"{stage.path}.bias", slot) if stage.bias else None
                y = F.linear(y, self._get(f"{stage.path}.weight", slot), bias)
            elif isinstance(stage, Norm):
                bias = self._get(f"{stage.path}.bias", slot) if stage.bias else None
                y = F.layer_norm(y, y.shape[-1:], self._get(f"{stage.path}.weight", slot), bias, stage.eps)
            else:
                y = act(y)
        return y

    def _get(self, key: str, slot: int) -> torch.Tensor:
        return getattr(self, self.names[key])[slot]

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        """Put one adapter's head tensors (keyed as `head_tensors`) in `slot`; None empties the slot."""
        for key, buffer in self.names.items():
            target = getattr(self, buffer)[slot]
            target.zero_()
            if tensors is None:
                continue
            value = tensors[key]
            target[tuple(slice(0, n) for n in value.shape)].copy_(value)
