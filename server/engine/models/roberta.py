"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's post-LN layers, positions counted past the pad id, no pooler.

The three model types share one layout in Hugging Face (only the class names differ) and all keep the
encoder under `roberta`. What sets them apart from BERT:

- position ids come from the input ids: the running count of non-pad tokens, offset by `pad_token_id`
  (fairseq's `make_positions`), so position `pad_token_id` is never a real token's and the longest input
  is `max_position_embeddings - pad_token_id - 1` tokens;
- the sequence-classification model has no pooler: `RobertaClassificationHead` reads the hidden state
  of <s> (token 0) through `classifier.dense` -> tanh -> `classifier.out_proj`, and PEFT saves that
  whole `classifier` module (SEQ_CLS modules_to_save), never with LoRA on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.heads import Act, Dense
from loraplex.engine.lora import SlotLinear
from loraplex.engine.lora_batch import LoraBatch

MODEL_TYPES = ("roberta", "xlm-roberta", "camembert")
PREFIX = "roberta"
# PEFT's default for roberta and xlm-roberta; PEFT has none for camembert (its configs always name their
# targets), and the same query/value pair is the natural default there.
DEFAULT_TARGETS = ("query", "value")


def head(config) -> tuple:
    return (Dense("classifier.dense", config.hidden_size), Act("tanh"), Dense("classifier.out_proj"))


def max_length(config) -> int:
    # Real tokens take positions pad_token_id + 1 .. pad_token_id + length.
    return config.max_position_embeddings - config.pad_token_id - 1


class EncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        attn = layer.attention
        self.heads = config.num_attention_heads
        self.qkv = SlotLinear([attn.self.query, attn.self.key, attn.self.value], slots, r_max, dtype)
        self.attn_out = SlotLinear([attn.output.dense], slots, r_max, dtype)
        self.attn_norm = attn.output.LayerNorm.to(dtype)
        self.inter = SlotLinear([layer.intermediate.dense], slots, r_max, dtype)
        # The exact activation the Hugging Face layer applies (a name from the config, or a callable).
        self.act = layer.intermediate.intermediate_act_fn
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
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]; pads are never keys
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, hidden)
        x = self.attn_norm(self.attn_out(ctx, lora) + x)
        return self.out_norm(self.out(self.act(self.inter(x, lora)), lora) + x)


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        if config.is_decoder:
            # A decoder RoBERTa attends causally; this encoder attends both ways: it would serve other math.
            raise ValueError(f"{config.model_type} with is_decoder=True (causal attention) is not served")
        if config.pad_token_id is None:
            raise ValueError(f"{config.model_type} needs pad_token_id: its position ids are counted from it")
        # Hugging Face's own embeddings: word + token type + positions made from the input ids, LayerNorm.
        self.embeddings = encoder.embeddings.to(dtype)
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in encoder.encoder.layer
        )
        # No pooler here: RobertaForSequenceClassification builds its encoder with add_pooling_layer=False.
        self.targets: dict[str, tuple[SlotLinear, int]] = {}
        for i, layer in enumerate(self.layers):
            self.targets.update(layer.targets(f"encoder.layer.{i}"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Positions are the running count of non-pad ids plus pad_token_id, as in Hugging Face. The engine
        # pads on the right, so padding never moves a real token's position.
        # One token type (type_vocab_size 1): pairs are told apart by their separators alone.
        x = self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))  # [B, T, H]
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask, lora)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """The hidden state of <s> (token 0); the head's dense and tanh come after, per slot."""
        return hidden[:, 0]  # [B, H]
