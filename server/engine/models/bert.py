"""BERT: post-LN encoder layers, absolute positions and token types, a tanh pooler on [CLS].

The frozen weights come from a Hugging Face `BertModel`; the forward pass is written out so that the
slot index of every row reaches each linear layer as an argument, not through hooks or globals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from loraplex.engine.heads import Dense
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch

MODEL_TYPES = ("bert",)
PREFIX = "bert"
DEFAULT_TARGETS = ("query", "value")


def head(config) -> tuple:
    return (Dense("classifier"),)


def max_length(config) -> int:
    return config.max_position_embeddings


class EncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        attn = layer.attention
        self.heads = config.num_attention_heads
        self.qkv = SlotLinear([attn.self.query, attn.self.key, attn.self.value], slots, r_max, dtype)
        self.attn_out = SlotLinear([attn.output.dense], slots, r_max, dtype)
        self.attn_norm = attn.output.LayerNorm.to(dtype)
        self.inter = SlotLinear([layer.intermediate.dense], slots, r_max, dtype)
        self.act = ACT2FN[config.hidden_act]
        self.out = SlotLinear([layer.output.dense], slots, r_max, dtype)
        self.out_norm = layer.output.LayerNorm.to(dtype)

    def targets(self, prefix: str) -> dict[str, tuple[SlotLinear, int]]:
        return {
            f"{prefix}.attention.self.query": (self.qkv, 0),
            f"{prefix}.attention.self.key": (self.qkv, 1),
            f"{prefix}.attention.self.value": (self.qkv, 2),
            f"{prefix}.attention.output.dense": (self.attn_out, 0),
            f"{prefix}.intermediate.dense": (self.inter, 0),
            f"{prefix}.output.dense": (self.out, 0),
        }

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x, lora)  # [B, T, 3 * hidden]
        q, k, v = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)
        x = self.attn_norm(self.attn_out(ctx, lora) + x)
        return self.out_norm(self.out(self.act(self.inter(x, lora)), lora) + x)


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.embeddings = encoder.embeddings.to(dtype)
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in encoder.encoder.layer
        )
        self.pooler = SlotLinear([encoder.pooler.dense], slots, r_max, dtype)
        self.targets: dict[str, tuple[SlotLinear, int]] = {"pooler.dense": (self.pooler, 0)}
        for i, layer in enumerate(self.layers):
            self.targets.update(layer.targets(f"encoder.layer.{i}"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids  # [B, T]
        x = self.embeddings(input_ids=input_ids, token_type_ids=types)
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask, lora)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """tanh of the pooler (LoRA-capable) on [CLS]."""
        return torch.tanh(self.pooler(hidden[:, :1], lora)).squeeze(1)
