"""A BERT encoder with multi-LoRA slots on every linear layer and a stacked classification head per slot.

The frozen weights come from a Hugging Face `BertModel`; the forward pass is written out here so that
the slot index of every row reaches each linear layer as an argument, not through hooks or globals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from loraplex.lora import lora_linear, pack_weight
from torch import nn
from transformers.activations import ACT2FN

# LoRA targets of one encoder layer: slot tensor name -> module path inside `encoder.layer.{i}`.
LAYER_TARGETS = {
    "attn_out": "attention.output.dense",
    "inter": "intermediate.dense",
    "out": "output.dense",
}
QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


class SlotLinear(nn.Module):
    """Frozen linear layers that read one input, fused into one matmul, plus `slots` LoRA deltas.

    `parts` linears of equal shape (query, key and value; or a single one) are concatenated along the
    output; each part's LoRA sits in its own block of a block-diagonal `lora_B`, so one gathered shrink
    and one gathered expand serve them all.
    """

    def __init__(self, linears: list[nn.Linear], slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.parts = len(linears)
        self.part_out, in_features = linears[0].weight.shape
        weight = torch.cat([lin.weight.detach() for lin in linears]).to(dtype)  # [parts * out, in]
        bias = torch.cat([lin.bias.detach() for lin in linears]).to(dtype)  # [parts * out]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        # [slots, parts, r_max, in] and [slots, parts * out, parts, r_max]
        self.register_buffer("lora_A", torch.zeros(slots, self.parts, r_max, in_features, dtype=dtype))
        self.register_buffer("lora_B", torch.zeros(slots, weight.shape[0], self.parts, r_max, dtype=dtype))

        self.packed: torch.Tensor | None = None  # the weight prepacked for the CPU matmul (`pack`)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, idx, rank, self.packed)

    def pack(self) -> bool:
        """Prepack the frozen weight for the CPU matmul (on the final device); drops the plain copy."""
        self.packed = pack_weight(self.weight, self.bias)
        if self.packed is not None:
            self.weight = None
        return self.packed is not None

    def write(self, slot: int, part: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> None:
        """Put one part's `lora_A [r, in]` and scaled `lora_B [out, r]` in `slot`; None clears the part."""
        rows = slice(part * self.part_out, (part + 1) * self.part_out)
        self.lora_A[slot, part].zero_()
        self.lora_B[slot, rows, part].zero_()
        if lora_A is not None:
            r = lora_A.shape[0]
            self.lora_A[slot, part, :r].copy_(lora_A)
            self.lora_B[slot, rows, part, :r].copy_(lora_B)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x, idx, rank)  # [B, T, 3 * hidden]
        q, k, v = qkv.view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)
        x = self.attn_norm(self.attn_out(ctx, idx, rank) + x)
        return self.out_norm(self.out(self.act(self.inter(x, idx, rank)), idx, rank) + x)


class MultiLoraBert(nn.Module):
    """Frozen BERT + `slots` LoRA adapters and heads; the last slot is reserved and always empty."""

    def __init__(self, bert: nn.Module, slots: int, r_max: int, max_labels: int, dtype: torch.dtype):
        super().__init__()
        config = bert.config
        self.embeddings = bert.embeddings.to(dtype)
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in bert.encoder.layer
        )
        self.pooler = SlotLinear([bert.pooler.dense], slots, r_max, dtype)
        self.register_buffer("head_weight", torch.zeros(slots, max_labels, config.hidden_size, dtype=dtype))
        self.register_buffer("head_bias", torch.zeros(slots, max_labels, dtype=dtype))  # [slots, labels]
        self.requires_grad_(False)
        self.eval()

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
        pooled = self.encode(input_ids, attention_mask, idx, rank)  # [B, hidden]
        weight = self.head_weight.index_select(0, idx)  # [B, labels, hidden]
        logits = torch.bmm(pooled[:, None], weight.transpose(1, 2)).squeeze(1)  # [B, labels]
        return logits + self.head_bias.index_select(0, idx)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: torch.Tensor, rank: int
    ) -> torch.Tensor:
        """Pooled output `[B, hidden]` (tanh of the pooler on [CLS]), each row with its slot's LoRA."""
        x = self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask, idx, rank)
        return torch.tanh(self.pooler(x[:, :1], idx, rank)).squeeze(1)
