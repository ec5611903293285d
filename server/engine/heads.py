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
from loraplex.engine.lora_batch import LoraBatch


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
    """`slots` heads of one layout; each row of a batch goes through the head in its own slot."""

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

    def forward(self, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """`x [B, hidden]` pooled rows (or `[B, T, hidden]` tokens) -> logits `[B, max_labels]` (or
        `[B, T, max_labels]`), zero past each adapter's labels.

        No loop over adapters: the rows are laid out grouped by slot (`batch.grouped`, `[U, L * T]` rows,
        a short group padded with its last row), each stage runs once over all groups with the batch's U
        distinct heads gathered (one batched matmul per dense), and the rows are read back in order."""
        features = x.shape[-1]
        groups = len(batch.distinct)
        # Rows already grouped and in order (one adapter, or each adapter's rows side by side in groups of
        # equal size): the layout is the input's own.
        in_order = len(batch.segments) == groups and batch.group_len * groups == batch.rows
        y = x if in_order else x.index_select(0, batch.grouped)
        y = y.reshape(groups, -1, features)  # [U, L * T, hidden]
        for stage, act in zip(self.stages, self.acts, strict=True):
            if isinstance(stage, Dense):
                weight = self._gather(f"{stage.path}.weight", batch)  # [U, out, in]
                if stage.bias:
                    bias = self._gather(f"{stage.path}.bias", batch)  # [U, out]
                    y = torch.baddbmm(bias[:, None], y, weight.transpose(1, 2))
                else:
                    y = torch.bmm(y, weight.transpose(1, 2))
            elif isinstance(stage, Norm):
                y = F.layer_norm(y, y.shape[-1:], None, None, stage.eps)
                y = y * self._gather(f"{stage.path}.weight", batch)[:, None]
                if stage.bias:
                    y = y + self._gather(f"{stage.path}.bias", batch)[:, None]
            else:
                y = act(y)
        y = y.reshape(-1, *x.shape[1:-1], self.max_labels)  # [U * L, (T,) max_labels]
        return y if in_order else y.index_select(0, batch.ungroup)

    def _gather(self, key: str, batch: LoraBatch) -> torch.Tensor:
        """One tensor of the batch's distinct heads: `[U, ...]`."""
        return getattr(self, self.names[key]).index_select(0, batch.distinct_idx)

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        """Put one adapter's head tensors (keyed as `head_tensors`) in `slot`; None empties the slot."""
        for key, buffer in self.names.items():
            target = getattr(self, buffer)[slot]
            target.zero_()
            if tensors is None:
                continue
            value = tensors[key]
            target[tuple(slice(0, n) for n in value.shape)].copy_(value)
