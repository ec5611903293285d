"""A frozen encoder of any served family, with multi-LoRA slots on its linears and a stacked head per slot.

    model = MultiLoraModel(family, seq_cls_model, slots, r_max, max_labels, dtype)
    logits = model(input_ids, attention_mask, idx, rank)   # [B, max_labels]

The family module (`loraplex.models`) writes out the encoder; this module joins it to the heads.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from loraplex.heads import SlotHead
from loraplex.lora import SlotLinear


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
        self.requires_grad_(False)
        self.eval()

    @property
    def targets(self) -> dict[str, tuple[SlotLinear, int]]:
        """PEFT module path below the family's prefix -> (its SlotLinear, part)."""
        return self.encoder.targets

    def pack(self) -> bool:
        """Prepack every frozen linear for the CPU matmul; True if all of them were packed."""
        return all([module.pack() for module in self.modules() if isinstance(module, SlotLinear)])

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        attention_mask: torch.Tensor,  # [B, T] bool, True for real tokens
        idx: torch.Tensor,  # [B] int64, slot of each row
        rank: int,  # largest rank among the rows' slots
    ) -> torch.Tensor:
        """Logits `[B, max_labels]`; row i is meaningful up to its adapter's number of labels."""
        return self.head(self.encode(input_ids, attention_mask, idx, rank), idx)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: torch.Tensor, rank: int
    ) -> torch.Tensor:
        """Pooled output `[B, hidden]` as the family pools it, each row with its slot's LoRA."""
        hidden = self.encoder(input_ids, attention_mask, idx, rank)
        return self.encoder.pool(hidden, attention_mask, idx, rank)
