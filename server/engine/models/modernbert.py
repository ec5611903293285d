"""ModernBERT: pre-LN layers without biases, rotary positions, global and sliding-window attention layers.

What sets it apart from BERT:

- each layer normalises before attention and before the MLP (layer 0 has no attention norm: the
  embeddings are normalised already), and the encoder ends with `final_norm`;
- q, k and v are one linear `attn.Wqkv` (out 3 * hidden), so PEFT adapts them together as one module;
  the MLP is a GLU whose `mlp.Wi` (out 2 * intermediate) holds input and gate: `Wo(act(input) * gate)`;
- positions are rotary, with their own theta per layer type (`config.rope_parameters`);
- `config.layer_types` marks every layer "full_attention" or "sliding_attention"; a sliding layer lets
  token i see token j only when |i - j| <= local_attention // 2 (Hugging Face's bidirectional window);
- the sequence-classification model pools per `classifier_pooling` ("cls": token 0, "mean": the mean
  over real tokens), then `head.dense` -> activation -> `head.norm` -> `classifier`. `head` is the MLM
  head of the base checkpoint, so PEFT's default modules_to_save (`classifier`) keeps the base's `head`;
  `target_modules="all-linear"` puts LoRA on `head.dense` as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

from loraplex.engine.heads import Act, Dense, Norm
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch

MODEL_TYPES = ("modernbert",)
PREFIX = "model"
# PEFT has no default target_modules for modernbert; its q/v projections live in the fused Wqkv.
DEFAULT_TARGETS = ("Wqkv",)


def head(config) -> tuple:
    return (
        Dense("head.dense", config.hidden_size, bias=config.classifier_bias),
        Act(config.classifier_activation),
        Norm("head.norm", config.norm_eps, bias=config.norm_bias),
        Dense("classifier"),
    )


def token_head(config, task: str) -> tuple:
    # ModernBertForTokenClassification and ...ForQuestionAnswering run the same head on every token.
    return head(config)


def max_length(config) -> int:
    # Rotary positions have no table, but the model is only trained (and its RoPE sized) up to this.
    return config.max_position_embeddings


class EncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_type = layer.attention_type  # "full_attention" or "sliding_attention"
        self.attn_norm = layer.attn_norm.to(dtype)  # nn.Identity in layer 0
        self.qkv = SlotLinear([layer.attn.Wqkv], slots, r_max, dtype)  # one PEFT module: one part
        self.attn_out = SlotLinear([layer.attn.Wo], slots, r_max, dtype)
        self.mlp_norm = layer.mlp_norm.to(dtype)
        self.wi = SlotLinear([layer.mlp.Wi], slots, r_max, dtype)
        self.act = layer.mlp.act  # the exact activation the Hugging Face MLP applies
        self.wo = SlotLinear([layer.mlp.Wo], slots, r_max, dtype)

    def targets(self, prefix: str) -> dict[str, tuple[SlotLinear, int]]:
        return {
            f"{prefix}.attn.Wqkv": (self.qkv, 0),
            f"{prefix}.attn.Wo": (self.attn_out, 0),
            f"{prefix}.mlp.Wi": (self.wi, 0),
            f"{prefix}.mlp.Wo": (self.wo, 0),
        }

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        masks: dict[str, torch.Tensor],  # layer type -> bool mask broadcastable to [B, heads, T, T]
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],  # layer type -> cos, sin [1, T, head_dim]
        lora: LoraBatch,
    ) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(self.attn_norm(x), lora)  # [B, T, 3 * hidden]
        # [B, T, 3, heads, d] -> three [B, heads, T, d], as Hugging Face's view(..., 3, -1, head_dim)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = rope[self.attention_type]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # rotated in fp32, back in the input's dtype
        mask = masks[self.attention_type]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)  # [B, T, hidden]
        x = x + self.attn_out(ctx, lora)
        inp, gate = self.wi(self.mlp_norm(x), lora).chunk(2, dim=-1)  # two [B, T, intermediate]
        return x + self.wo(self.act(inp) * gate, lora)


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.embeddings = encoder.embeddings.to(dtype)  # token embeddings -> LayerNorm (no positions)
        # Hugging Face's rotary module: inverse frequencies per layer type, cos/sin computed in fp32.
        self.rotary = encoder.rotary_emb
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in encoder.layers
        )
        self.final_norm = encoder.final_norm.to(dtype)
        self.window = config.sliding_window  # local_attention // 2: the largest |i - j| a sliding layer sees
        self.layer_types = tuple(sorted(set(config.layer_types)))
        self.pooling = config.classifier_pooling
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling {self.pooling!r} is not served; it is 'cls' or 'mean'")
        self.targets: dict[str, tuple[SlotLinear, int]] = {}
        for i, layer in enumerate(self.layers):
            self.targets.update(layer.targets(f"layers.{i}"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = input_ids.shape[1]
        x = self.embeddings(input_ids=input_ids)  # [B, T, hidden]
        # Rows are right-padded, so real tokens sit at positions 0.. as Hugging Face's default arange.
        positions = torch.arange(tokens, device=input_ids.device)[None]  # [1, T]
        rope = {kind: self.rotary(x, positions, kind) for kind in self.layer_types}
        masks = {"full_attention": attention_mask[:, None, None, :]}  # [B, 1, 1, T]: keys that are real
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = self._sliding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, masks, rope, lora)
        return self.final_norm(x)

    def _sliding_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[B, 1, T, T]`: real keys within the window; a padded query row sees every key instead.

        A padded query far past its row's end has no real key in its window; an empty row would make
        the softmax NaN. Its output is never read (pooling and attention skip padded tokens), so it may
        attend anywhere.
        """
        batch, tokens = attention_mask.shape
        if tokens - 1 <= self.window:  # every pair is within the window: the padding mask alone
            return attention_mask[:, None, None, :]
        pos = torch.arange(tokens, device=attention_mask.device)
        near = (pos[:, None] - pos[None, :]).abs() <= self.window  # [T, T]
        mask = near[None] & attention_mask[:, None, :]  # [B, T, T]
        return (mask | ~attention_mask[:, :, None])[:, None]

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """Token 0 ("cls") or the mean over real tokens ("mean"), as `classifier_pooling` says."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask[..., None].to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)
