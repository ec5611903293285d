"""A frozen encoder of any served family, with multi-LoRA slots on its linears and stacked heads per slot.

    model = MultiLoraModel(family, seq_cls_model, slots, r_max, max_labels, dtype)
    batch = model.batch(slots_of_rows, slot_rank)          # a LoraBatch: built once, on the host
    out = model(input_ids, attention_mask, batch)       # {"SEQ_CLS": [B, max_labels]}
    batch = model.batch(slots_of_rows, slot_rank, tasks)   # tasks: task -> row positions
    out = model(input_ids, attention_mask, batch, token_type_ids)

The family module (`loraplex.engine.models`) writes out the encoder; this module joins it to the heads. One
pass serves rows of every task: each task's rows read the shared encoder output, sequence tasks through
the pooled row, token tasks through every token.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
from torch import nn

from loraplex.adapters.peft import FEATURE_EXTRACTION, SEQ_CLS
from loraplex.engine.heads import SlotHead, task_heads
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch


class MultiLoraModel(nn.Module):
    """Frozen encoder + `slots` LoRA adapters and heads; the last slot is reserved and always empty."""

    def __init__(
        self,
        family: ModuleType,
        seq_cls_model: nn.Module,  # the family's ...ForSequenceClassification, its weights loaded
        slots: int,
        r_max: int,
        max_labels: int,
        dtype: torch.dtype,
    ):
        super().__init__()
        config = seq_cls_model.config
        self.head_stages = family.head(config)
        self.encoder = family.Encoder(getattr(seq_cls_model, family.PREFIX), config, slots, r_max, dtype)
        self.head = SlotHead(self.head_stages, config.hidden_size, slots, max_labels, dtype)
        # The token-level tasks' heads (TOKEN_CLS, QUESTION_ANS), run on every token of their rows.
        self.token_stages = {t: s for t, s in task_heads(family, config).items() if t != SEQ_CLS}
        self.token_heads = nn.ModuleDict(
            {
                task: SlotHead(stages, config.hidden_size, slots, max_labels, dtype)
                for task, stages in self.token_stages.items()
            }
        )
        self.requires_grad_(False)
        self.eval()
        # The encoder through CUDA graphs (`loraplex.engine.graphs.EncoderGraphs`), set by the engine; None:
        # every pass runs it eagerly.
        self.graphs = None
        # Each slot's largest rank in each LoRA layer (on the host), kept up to date by SlotLinear.write.
        linears = [module for module in self.modules() if isinstance(module, SlotLinear)]
        self.rank_table = np.zeros((slots, len(linears)), dtype=np.int64)
        for layer, linear in enumerate(linears):
            linear.layer_id, linear.rank_table = layer, self.rank_table

    def batch(
        self,
        slots: list[int],
        slot_rank: list[int],
        tasks: dict[str, list[int]] | None = None,
        fused: bool = False,
    ) -> LoraBatch:
        """The `LoraBatch` of rows on `slots` for this model (its device and per-layer ranks)."""
        device = next(iter(self.buffers())).device
        return LoraBatch.build(slots, slot_rank, device, self.rank_table, tasks, fused)

    @property
    def targets(self) -> dict[str, tuple[SlotLinear, int]]:
        """PEFT module path below the family's prefix -> (its SlotLinear, part)."""
        return self.encoder.targets

    def pack(self, int8: bool = False) -> str:
        """Prepack every frozen linear for the CPU matmul (in int8 if asked); returns the matmul kind
        ("int8", "onednn" or "plain"), or the kinds joined by "+" where layers fell back differently."""
        kinds = {module.pack(int8) for module in self.modules() if isinstance(module, SlotLinear)}
        return "+".join(sorted(kinds))

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        attention_mask: torch.Tensor,  # [B, T] bool, True for real tokens
        batch: LoraBatch,  # the rows' slots, segments and ranks (`batch`), built once for the pass
        token_type_ids: torch.Tensor | None = None,  # [B, T] int64; None: all zero
    ) -> dict[str, torch.Tensor]:
        """Each task's output for its rows, in the order of its positions in `batch.tasks`; no tasks there:
        every row SEQ_CLS.

        SEQ_CLS logits `[n, max_labels]`; TOKEN_CLS and QUESTION_ANS logits `[n, T, max_labels]`;
        FEATURE_EXTRACTION the hidden states `[n, T, hidden]`. A row's logits are meaningful up to its
        adapter's number of labels.
        """
        hidden = (
            None if self.graphs is None else self.graphs.run(input_ids, attention_mask, batch, token_type_ids)
        )
        if hidden is None:
            hidden = self.encoder(input_ids, attention_mask, batch, token_type_ids)  # [B, T, hidden]
        out = {}
        for task, (positions, rows) in (batch.tasks or {SEQ_CLS: (None, batch)}).items():
            h, mask = (hidden, attention_mask)
            if positions is not None:
                h, mask = hidden[positions], attention_mask[positions]
            if task == SEQ_CLS:
                out[task] = self.head(self.encoder.pool(h, mask, rows), rows)
            elif task == FEATURE_EXTRACTION:
                out[task] = h
            else:
                out[task] = self.token_heads[task](h, rows)
        return out

    def write_head(self, slot: int, task: str | None, tensors: dict[str, torch.Tensor] | None) -> None:
        """Put an adapter's head in the head of its task and empty the others; `task` None empties all."""
        self.head.write(slot, tensors if task == SEQ_CLS else None)
        for name, head in self.token_heads.items():
            head.write(slot, tensors if task == name else None)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """Pooled output `[B, hidden]` as the family pools it, each row with its slot's LoRA."""
        hidden = self.encoder(input_ids, attention_mask, batch)
        return self.encoder.pool(hidden, attention_mask, batch)
