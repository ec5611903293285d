"""ELECTRA: BERT's post-LN layers after embeddings of their own width, no pooler, a GELU head on token 0.

ELECTRA's embeddings are `embedding_size` wide; where that differs from `hidden_size` (ELECTRA-small:
128 vs 256) a linear `embeddings_project` lifts them to the width of the layers. That projection is an
`nn.Linear` like any other, so PEFT's "all-linear" adapts it (and it can be named in target_modules): it
is a `SlotLinear` here. The classification head is `classifier.dense -> gelu -> classifier.out_proj`
on the first token; its activation is always exact GELU, whatever `hidden_act` or `summary_activation`
say (those feed the layers and the multiple-choice summary, not this head). PEFT saves the whole
`classifier` module for SEQ_CLS, so both dense layers come with every adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.heads import Act, Dense
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch

MODEL_TYPES = ("electra",)
PREFIX = "electra"
DEFAULT_TARGETS = ("query", "value")  # PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["electra"]


def head(config) -> tuple:
    # ElectraClassificationHead: get_activation("gelu"), fixed, not config.hidden_act
    return (Dense("classifier.dense", config.hidden_size), Act("gelu"), Dense("classifier.out_proj"))


def max_length(config) -> int:
    return config.max_position_embeddings  # absolute positions from 0, no padding offset


class EncoderLayer(nn.Module):
    """One ElectraLayer (a copy of BertLayer): self-attention, then the feed-forward, each post-LN."""

    def __init__(self, layer: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        attn = layer.attention
        self.heads = config.num_attention_heads
        self.qkv = SlotLinear([attn.self.query, attn.self.key, attn.self.value], slots, r_max, dtype)
        self.attn_out = SlotLinear([attn.output.dense], slots, r_max, dtype)
        self.attn_norm = attn.output.LayerNorm.to(dtype)
        self.inter = SlotLinear([layer.intermediate.dense], slots, r_max, dtype)
        self.act = layer.intermediate.intermediate_act_fn  # HF's own: ACT2FN[hidden_act], or a callable
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
        # the default scale 1 / sqrt(d) is HF's `scaling`; `mask` drops each row's padding keys
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)
        x = self.attn_norm(self.attn_out(ctx, lora) + x)
        return self.out_norm(self.out(self.act(self.inter(x, lora)), lora) + x)


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        if config.is_decoder:
            # HF would attend causally; this forward attends both ways, so it would be other math
            raise ValueError("an ELECTRA config with is_decoder=true is not served; loraplex serves encoders")
        self.embeddings = encoder.embeddings.to(dtype)  # HF's: word + token type + position, LayerNorm
        self.targets: dict[str, tuple[SlotLinear, int]] = {}
        # ElectraModel has `embeddings_project` only when embedding_size != hidden_size
        project = getattr(encoder, "embeddings_project", None)
        self.project = None if project is None else SlotLinear([project], slots, r_max, dtype)
        if self.project is not None:
            self.targets["embeddings_project"] = (self.project, 0)
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in encoder.encoder.layer
        )
        for i, layer in enumerate(self.layers):
            self.targets.update(layer.targets(f"encoder.layer.{i}"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # [B, T, embedding_size]; no token types: all zero, as HF's default buffer gives
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids  # [B, T]
        x = self.embeddings(input_ids=input_ids, token_type_ids=types)
        if self.project is not None:
            x = self.project(x, lora)  # [B, T, hidden]
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask, lora)
        return x  # [B, T, hidden]

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """The first token ([CLS]) as it leaves the last layer: ELECTRA has no pooler; the head reads it."""
        return hidden[:, 0]  # [B, hidden]
