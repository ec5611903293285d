"""DeBERTa-v2 and DeBERTa-v3: disentangled attention over relative positions, a pooler inside the head.

What sets the family apart from BERT:

- no absolute positions in v3 (`position_biased_input=False`): each attention score adds a
  content-to-position term (c2p, the query against the key projection of the relative embedding of
  i - j) and a position-to-content term (p2c, the key against the query projection of the relative
  embedding of j - i), the distances bucketed logarithmically (`position_buckets`), and the sum is
  scaled by sqrt(head_dim * (1 + len(pos_att_type)));
- with `share_att_key` (v3) those position projections are the layer's own `query_proj` and `key_proj`
  applied to the (LayerNorm'd) relative embeddings, so a LoRA on query_proj/key_proj changes them too,
  per row's adapter. They are the same for every row but for that delta: the frozen part is computed
  once per pass and the delta once per distinct slot of the batch, and only over the relative distances
  that the batch's length can reach;
- the pooler (`ContextPooler`: token 0 -> `pooler.dense` -> `pooler_hidden_act`) sits outside the
  `deberta` prefix in DebertaV2ForSequenceClassification and is not in a base checkpoint. It is part of
  the head: PEFT's default SEQ_CLS modules_to_save ("classifier") leaves it at its random
  initialisation, so adapters must be saved with modules_to_save=["pooler", "classifier"]; the shared
  head parser rejects one that lacks it, naming that field.

Also served, for DeBERTa-v2 checkpoints: separate `pos_key_proj`/`pos_query_proj` (share_att_key off),
the convolution after the first layer (`conv_kernel_size`), absolute positions and token types, and
`embed_proj` (embedding_size != hidden_size), which PEFT's all-linear adapts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.deberta_v2.modeling_deberta_v2 import (
    build_relative_position,
    make_log_bucket_position,
    scaled_size_sqrt,
)

from loraplex.engine.heads import Act, Dense
from loraplex.engine.lora import SlotLinear, frozen_linear
from loraplex.engine.lora_batch import LoraBatch

MODEL_TYPES = ("deberta-v2",)
PREFIX = "deberta"
DEFAULT_TARGETS = ("query_proj", "value_proj")  # PEFT's default for deberta-v2


def head(config) -> tuple:
    return (
        Dense("pooler.dense", config.pooler_hidden_size),
        Act(config.pooler_hidden_act),
        Dense("classifier"),
    )


def max_length(config) -> int:
    return config.max_position_embeddings


class Positions:
    """What every layer's disentangled attention shares in one pass over a batch of length T.

    Only the relative embeddings rows lo..lo+W-1 can be indexed at length T (the bucketed distances
    reach at most |bucket(T - 1)|), so the position projections are made for those W rows only.
    """

    def __init__(self, rel: torch.Tensor, c2p: torch.Tensor, p2c: torch.Tensor, lora: LoraBatch):
        self.rel = rel  # [W, H] the LayerNorm'd relative embeddings in the window
        self.c2p = c2p  # [T, T] int64, row (query) i, column (key) j -> window index of bucket(i - j)
        self.p2c = p2c  # [T, T] int64, row (key) i, column (query) j -> window index of -bucket(i - j)
        self.lora = lora  # its distinct slots `distinct_idx [U]` and each row's among them, `inverse [B]`

    def per_row(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """`t [U or 1, ...]`, one entry per distinct slot (or one for all) -> `[B, ...]`, one per row."""
        if t.shape[0] == 1:
            return t.expand(batch, *t.shape[1:])
        return t.index_select(0, self.lora.inverse)


def slot_projection(linear: SlotLinear, x: torch.Tensor, pos: Positions) -> torch.Tensor:
    """`linear` over rows `x [W, in]` that are the same for every row of the batch.

    Returns `[U, W, out]`, one per distinct slot of the batch (`[1, W, out]` when no slot has a delta):
    the frozen matmul once, the LoRA delta of each distinct slot once.
    """
    y = frozen_linear(x, linear.weight, linear.bias, linear.packed)[None]  # [1, W, out]
    rank = pos.lora.rank_of(linear)  # this layer's: 0 where no row's adapter targets it
    if rank == 0:
        return y
    slots = pos.lora.distinct_idx  # [U]
    a = linear.lora_A[:, :, :rank].index_select(0, slots).flatten(1, 2)  # [U, parts * rank, in]
    b = linear.lora_B[:, :, :, :rank].index_select(0, slots).flatten(2, 3)  # [U, out, parts * rank]
    return y + torch.matmul(x, a.transpose(1, 2)) @ b.transpose(1, 2)  # [U, W, out]


class EncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        attn = layer.attention.self
        self.heads = attn.num_attention_heads
        self.head_size = attn.attention_head_size
        width = attn.all_head_size
        self.qkv = SlotLinear([attn.query_proj, attn.key_proj, attn.value_proj], slots, r_max, dtype)
        self.c2p = attn.relative_attention and "c2p" in attn.pos_att_type
        self.p2c = attn.relative_attention and "p2c" in attn.pos_att_type
        # 1 + one for each position term that the config names, whether relative attention is on or not
        scale_factor = 1 + ("c2p" in attn.pos_att_type) + ("p2c" in attn.pos_att_type)
        self.scale = float(scaled_size_sqrt(torch.empty(0, self.head_size), scale_factor))
        # Where the position query and key projections come from: columns of `pos_linear`'s output.
        self.pos_linear: SlotLinear | None = None
        self.pos_names: list[str] = []
        if (self.c2p or self.p2c) and attn.share_att_key:
            self.pos_query_cols, self.pos_key_cols = slice(0, width), slice(width, 2 * width)
        elif self.c2p or self.p2c:
            # v2 without shared keys: own projections of the relative embeddings, fused as parts
            self.pos_names = (["pos_query_proj"] if self.p2c else []) + (["pos_key_proj"] if self.c2p else [])
            linears = [getattr(attn, name) for name in self.pos_names]
            self.pos_linear = SlotLinear(linears, slots, r_max, dtype)
            self.pos_query_cols = slice(0, width)
            self.pos_key_cols = slice(width, 2 * width) if self.p2c else slice(0, width)
        self.attn_out = SlotLinear([layer.attention.output.dense], slots, r_max, dtype)
        self.attn_norm = layer.attention.output.LayerNorm.to(dtype)
        self.inter = SlotLinear([layer.intermediate.dense], slots, r_max, dtype)
        self.act = ACT2FN[config.hidden_act]
        self.out = SlotLinear([layer.output.dense], slots, r_max, dtype)
        self.out_norm = layer.output.LayerNorm.to(dtype)

    def targets(self, prefix: str) -> dict[str, tuple[SlotLinear, int]]:
        own = {
            f"{prefix}.attention.self.query_proj": (self.qkv, 0),
            f"{prefix}.attention.self.key_proj": (self.qkv, 1),
            f"{prefix}.attention.self.value_proj": (self.qkv, 2),
            f"{prefix}.attention.output.dense": (self.attn_out, 0),
            f"{prefix}.intermediate.dense": (self.inter, 0),
            f"{prefix}.output.dense": (self.out, 0),
        }
        for part, name in enumerate(self.pos_names):
            own[f"{prefix}.attention.self.{name}"] = (self.pos_linear, part)
        return own

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, L, heads * d]` -> `[N, heads, L, d]`."""
        return x.view(*x.shape[:2], self.heads, self.head_size).transpose(1, 2)

    def position_bias(self, q: torch.Tensor, k: torch.Tensor, pos: Positions) -> torch.Tensor | float:
        """The c2p + p2c terms of the scores, already divided by the scale: `[B, heads, T, T]`."""
        batch, tokens = q.shape[0], q.shape[2]
        linear = self.qkv if self.pos_linear is None else self.pos_linear
        projected = slot_projection(linear, pos.rel, pos)  # [U, W, out]
        index = (batch, self.heads, tokens, tokens)
        bias = 0.0
        if self.c2p:
            pos_key = pos.per_row(self.split_heads(projected[..., self.pos_key_cols]), batch)  # [B, h, W, d]
            c2p = torch.matmul(q / self.scale, pos_key.transpose(-1, -2))  # [B, h, T(query), W]
            bias = c2p.gather(-1, pos.c2p.expand(index))  # [B, h, T(query), T(key)]
        if self.p2c:
            pos_query = self.split_heads(projected[..., self.pos_query_cols]) / self.scale  # [U, h, W, d]
            p2c = torch.matmul(k, pos.per_row(pos_query, batch).transpose(-1, -2))  # [B, h, T(key), W]
            bias = bias + p2c.gather(-1, pos.p2c.expand(index)).transpose(-1, -2)  # [B, h, T(q), T(k)]
        return bias

    def forward(
        self, x: torch.Tensor, pos: Positions | None, mask: torch.Tensor, lora: LoraBatch
    ) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x, lora)  # [B, T, 3 * heads * d]
        shape = (batch, tokens, 3, self.heads, self.head_size)
        q, k, v = qkv.view(shape).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, T, d]
        if pos is not None and (self.c2p or self.p2c):
            # The softmax of (q k^T + c2p + p2c) / scale over the real keys; padded keys get the lowest
            # finite score, as in Hugging Face, so that no row of the softmax is all -inf.
            bias = self.position_bias(q, k, pos)  # [B, heads, T, T]
            attn_mask = bias.masked_fill(~mask, torch.finfo(x.dtype).min)
        else:
            attn_mask = mask  # [B, 1, 1, T]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1 / self.scale)
        ctx = ctx.transpose(1, 2).reshape(batch, tokens, -1)  # [B, T, heads * d]
        x = self.attn_norm(self.attn_out(ctx, lora) + x)
        return self.out_norm(self.out(self.act(self.inter(x, lora)), lora) + x)


class Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, config, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        emb = encoder.embeddings
        self.word_embeddings = emb.word_embeddings.to(dtype)
        self.position_embeddings = emb.position_embeddings.to(dtype) if emb.position_biased_input else None
        self.token_type_embeddings = (
            emb.token_type_embeddings.to(dtype) if emb.token_type_embeddings is not None else None
        )
        self.embed_proj = (
            SlotLinear([emb.embed_proj], slots, r_max, dtype) if emb.embed_proj is not None else None
        )
        self.embed_norm = emb.LayerNorm.to(dtype)
        self.layers = nn.ModuleList(
            EncoderLayer(layer, config, slots, r_max, dtype) for layer in encoder.encoder.layer
        )
        enc = encoder.encoder
        self.relative = enc.relative_attention
        if self.relative:
            self.rel_embeddings = enc.rel_embeddings.to(dtype)  # [2 * span, H]
            self.rel_norm = enc.LayerNorm.to(dtype) if "layer_norm" in enc.norm_rel_ebd else None
            self.buckets = enc.position_buckets
            self.max_relative = enc.max_relative_positions
            self.span = self.buckets if self.buckets > 0 else self.max_relative  # HF's pos_ebd_size
        self.conv = enc.conv.to(dtype) if enc.conv is not None else None  # frozen, after the first layer

        self.targets: dict[str, tuple[SlotLinear, int]] = {}
        if self.embed_proj is not None:
            self.targets["embeddings.embed_proj"] = (self.embed_proj, 0)
        for i, layer in enumerate(self.layers):
            self.targets.update(layer.targets(f"encoder.layer.{i}"))

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ):
        """DebertaV2Embeddings, with `embed_proj` LoRA-capable: `[B, T]` -> `[B, T, H]`."""
        x = self.word_embeddings(input_ids)  # [B, T, E]
        if self.position_embeddings is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.position_embeddings(positions)[None]
        if self.token_type_embeddings is not None:  # no token types: type 0 throughout
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids  # [B, T]
            x = x + self.token_type_embeddings(types)
        if self.embed_proj is not None:
            x = self.embed_proj(x, lora)  # [B, T, H]
        x = self.embed_norm(x)
        return x * attention_mask[:, :, None].to(x.dtype)  # padded tokens are zero, as HF's mask does

    def positions(self, tokens: int, lora: LoraBatch) -> Positions:
        """The relative positions of length `tokens`, the window of relative embeddings they index."""
        device = self.rel_embeddings.weight.device
        probe = torch.empty(tokens, 0, device=device)
        relative = build_relative_position(probe, probe, self.buckets, self.max_relative)[0]  # [T, T]
        # The farthest distance at this length; one more on each side in case log() rounds differently
        # on this device than on the CPU, since the window only has to contain every index.
        far = torch.tensor(tokens - 1)
        if self.buckets > 0 and self.max_relative > 0:
            far = make_log_bucket_position(far, self.buckets, self.max_relative)
        far = int(far) + 1
        last = 2 * self.span - 1
        lo, hi = max(self.span - far, 0), min(self.span + far, last)
        c2p = torch.clamp(relative + self.span, 0, last) - lo  # [T, T]
        p2c = torch.clamp(-relative + self.span, 0, last) - lo  # [T, T]
        rel = self.rel_embeddings.weight[lo : hi + 1]  # [W, H]
        if self.rel_norm is not None:
            rel = self.rel_norm(rel)  # row-wise, so the window's rows are those of the whole table
        return Positions(rel, c2p, p2c, lora)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraBatch,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embedded = self.embed(input_ids, attention_mask, lora, token_type_ids)  # [B, T, H]
        pos = self.positions(input_ids.shape[1], lora) if self.relative else None
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, T]: keys; a padded query row is never read
        x = embedded
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, mask, lora)
            if i == 0 and self.conv is not None:
                x = self.conv(embedded, x, attention_mask.to(x.dtype))
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """Token 0; ContextPooler's dense and activation are the head's first stages."""
        return hidden[:, 0]
