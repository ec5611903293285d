"""DistilBERT: post-LN layers, absolute positions without token types, no pooler; head on the first token.

The frozen weights come from a Hugging Face `DistilBertModel`; the forward pass is written out so that
the slot index of every row reaches each linear layer as an argument, not through hooks or globals.

The classification head is `pre_classifier` (dim -> dim) -> ReLU -> `classifier`. `pre_classifier` is
not part of a base checkpoint, so an adapter must carry it: PEFT saves it whole under its default
`modules_to_save` (["classifier", "score"] matches any module name ending in "classifier"), and an
adapter without it is rejected by the shared head parser, which names what to add to modules_to_save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import get_activation

from loraplex.engine.heads import Act, Dense
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch

MODEL_TYPES = ("distilbert",)
PREFIX = "distilbert"
# PEFT has no default target_modules for distilbert; these are its query and value projections.
DEFAULT_TARGETS = ("q_lin", "v_lin")


def head(config) -> tuple:
    return (Dense("pre_classifier", config.dim), Act("relu"), Dense("classifier"))


def max_length(config) -> int:
    return config.max_position_embeddings


class EncoderLayer(nn.Module):
    """One `TransformerBlock`: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, layer: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        attn = layer.attention
        self.heads = config.n_heads
        # q, k and v read the same input: one fused SlotLinear with three parts.
        self.qkv = SlotLinear([attn.q_lin, attn.k_lin, attn.v_lin], slots, r_max, dtype)
        self.attn_out = SlotLinear([attn.out_lin], slots, r_max, dtype)
        self.attn_norm = layer.sa_layer_norm.to(dtype)
        self.lin1 = SlotLinear([layer.ffn.lin1], slots, r_max, dtype)
        self.act = get_activation(config.activation)  # what the Hugging Face FFN uses
        self.lin2 = SlotLinear([layer.ffn.lin2], slots, r_max, dtype)
        self.out_norm = layer.output_layer_norm.to(dtype)

    def targets(self, prefix: str) -> dict[str, tuple[SlotLinear, int]]:
        return {
            f"{prefix}.attention.q_lin": (self.qkv, 0),
            f"{prefix}.attention.k_lin": (self.qkv, 1),
            f"{prefix}.attention.v_lin": (self.qkv, 2),
            f"{prefix}.attention.out_lin": (self.attn_out, 0),
            f"{prefix}.ffn.lin1": (self.lin1, 0),
            f"{prefix}.ffn.lin2": (self.lin2, 0),
        }

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x, lora)  # [B, T, 3 * hidden]
        q, k, v = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d]
        # SDPA's default scale is d ** -0.5, the one DistilBERT uses; no dropout in eval.
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)  # [B, T, hidden]
        x = self.attn_norm(self.attn_out(ctx, lora) + x)
        return self.out_norm(self.lin2(self.act(self.lin1(x, lora)), lora) + x)


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        # Hugging Face's own embeddings: word + position (learned or sinusoidal, both stored as a weight),
        # then LayerNorm; there are no token types.
        self.embeddings = encoder.embeddings.to(dtype)
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in encoder.transformer.layer
        )
        self.targets: dict[str, tuple[SlotLinear, int]] = {}
        for i, layer in enumerate(self.layers):
            self.targets.update(layer.targets(f"transformer.layer.{i}"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids=input_ids)  # [B, T, hidden]
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]: padding keys get no attention
        for layer in self.layers:
            x = layer(x, mask, lora)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """The first token's hidden state ([CLS]); DistilBERT has no pooler, the head starts there."""
        return hidden[:, 0]  # [B, hidden]
