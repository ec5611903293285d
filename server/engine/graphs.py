"""The encoder replayed from CUDA graphs, one per bucketed shape: fewer, bigger launches on a GPU.

    graphs = EncoderGraphs(model.encoder, pad_id, max_length, r_max, empty_slot, capture=True)
    model.graphs = graphs                      # MultiLoraModel.forward runs its encoder through them
    hidden = graphs.run(input_ids, attention_mask, batch, token_type_ids)   # None: run it eagerly

A forward pass of a small encoder on a GPU is a few hundred kernel launches, each a few microseconds of
work, issued one by one from Python: the GPU waits on the host. A CUDA graph records the launches of one
pass once and replays them in one call. A graph fixes every shape and every decision taken on the host, so
a pass is padded up to a bucket and its LoRA described in a form that does not depend on the batch:

- rows up to the next of ROW_BUCKETS, tokens up to the next of TOKEN_BUCKETS (never past the model's
  length); padded rows run on the empty slot with one real token, padded tokens are masked out;
- every LoRA layer at the batch's largest rank rounded up to a power of two (`rank_bucket`; zero padding
  of a rank is exact), each row's A and B gathered from the slot tensors by the row's slot (`idx`), and the
  per-row layout for DeBERTa's shared position projections (`distinct_idx` = `idx`).

A graph's inputs are static tensors that each pass copies into; the slot tensors are the model's own, and
`SlotLinear.write` writes them in place, so an adapter loaded, replaced or cleared after a capture is what
the next replay reads: a hot swap never needs a new capture. The output is the graph's static tensor,
valid until the next pass (the engine copies every row out before then). The graphs share one memory pool:
a later capture may place its output where an earlier graph keeps its scratch, which is safe because one
thread replays them one at a time and each output is read before the next replay.

A graph is captured the first time its bucket is seen, up to MAX_GRAPHS; any other shape runs eagerly, and
so does every pass after a capture that failed (logged).
With `capture=False` (the CPU, where there are no graphs) a pass runs eagerly on the same static, padded
inputs: what the tests use to check the padding and the static layout against the plain forward pass.

Off unless LORAPLEX_CUDA_GRAPHS=1 on a CUDA device (`loraplex.engine.core.cuda_graphs_enabled`).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from loraplex.engine.lora_batch import LoraBatch

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
MAX_GRAPHS = 64  # captured graphs kept; each holds its launches, its static inputs and output
# A bucket of more padded tokens than this runs eagerly: the static output of each graph stays allocated
# (rows x tokens x hidden), and a pass that large is bound by its matmuls, not by launches.
MAX_GRAPH_TOKENS = 32768


def bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= value, or None past the last."""
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None


def rank_bucket(rank: int, r_max: int) -> int:
    """0, or the next power of two >= rank, at most r_max."""
    return 0 if rank <= 0 else min(r_max, 1 << (rank - 1).bit_length())


@dataclass(eq=False)
class _Graph:
    ids: torch.Tensor  # [R, T] int64
    mask: torch.Tensor  # [R, T] bool
    types: torch.Tensor | None  # [R, T] int64, or None for a graph of passes without token types
    idx: torch.Tensor  # [R] int64, slot of each row
    lora: LoraBatch  # the static description of its LoRA (rank bucket, per-row gather)
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # [R, T, hidden]: the captured pass's output


class EncoderGraphs:
    def __init__(
        self,
        encoder: nn.Module,  # the family's Encoder (forward(ids, mask, lora, types) -> [B, T, hidden])
        pad_id: int,
        max_length: int,  # the model's longest input: no bucket of tokens goes past it
        r_max: int,
        empty_slot: int,
        capture: bool = True,
    ):
        self.encoder = encoder
        self.pad_id = pad_id
        self.max_length = max_length
        self.r_max = r_max
        self.empty_slot = empty_slot
        self.capture = capture
        self.graphs: dict[tuple[int, int, int, bool], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.full_logged = False
        self.disabled = False  # a capture failed: every pass runs eagerly

    def key(self, rows: int, tokens: int, rank: int, types: bool) -> tuple[int, int, int, bool] | None:
        """The bucket of a pass, or None where it has none (too many rows or tokens)."""
        r, t = bucket(rows, ROW_BUCKETS), bucket(tokens, TOKEN_BUCKETS)
        if r is None or t is None:
            return None
        t = max(tokens, min(t, self.max_length))
        if r * t > MAX_GRAPH_TOKENS:
            return None
        return r, t, rank_bucket(rank, self.r_max), types

    def run(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T] bool
        batch: LoraBatch,
        token_type_ids: torch.Tensor | None = None,  # [B, T]
    ) -> torch.Tensor | None:
        """The encoder's output `[B, T, hidden]` (a view of the bucket's static output), or None where this
        pass has no bucket or its bucket cannot be captured: the caller runs the encoder itself."""
        rows, tokens = input_ids.shape
        key = self.key(rows, tokens, batch.rank, token_type_ids is not None)
        if key is None or self.disabled:
            return None
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                if not self.full_logged:
                    log.info("%d CUDA graphs captured; passes of other shapes run without one", MAX_GRAPHS)
                    self.full_logged = True
                return None
            graph = self.graphs[key] = self._new(*key, input_ids.device)
        self._fill(graph, input_ids, attention_mask, batch, token_type_ids)
        if graph.graph is None:
            if not self.capture:
                return self._forward(graph)[:rows, :tokens]
            try:
                self._capture(graph)
            except RuntimeError as exc:  # an op that cannot be captured: serve eagerly from now on
                log.warning("CUDA graph capture failed (%s); passes run without graphs", exc)
                self.graphs.clear()
                self.disabled = True
                return None
        graph.graph.replay()
        return graph.out[:rows, :tokens]

    def _new(self, rows: int, tokens: int, rank: int, types: bool, device: torch.device) -> _Graph:
        idx = torch.full((rows,), self.empty_slot, dtype=torch.long, device=device)
        lora = LoraBatch(
            slots=[self.empty_slot] * rows,
            rank=rank,
            segments=[],  # no segments: every LoRA layer gathers each row's A and B by `idx`
            distinct=[self.empty_slot] * rows,
            layer_rank=None,  # every LoRA layer at `rank`
            group_len=1,
            idx=idx,
            distinct_idx=idx,  # one "distinct" slot per row: shapes that do not depend on the batch
            inverse=torch.arange(rows, device=device),
        )
        return _Graph(
            ids=torch.full((rows, tokens), self.pad_id, dtype=torch.long, device=device),
            mask=torch.zeros(rows, tokens, dtype=torch.bool, device=device),
            types=torch.zeros(rows, tokens, dtype=torch.long, device=device) if types else None,
            idx=idx,
            lora=lora,
        )

    def _fill(self, graph: _Graph, input_ids, attention_mask, batch: LoraBatch, token_type_ids) -> None:
        """Copy a pass into the graph's static inputs; the rest is padding (empty slot, one real token)."""
        rows, tokens = input_ids.shape
        graph.ids.fill_(self.pad_id)
        graph.ids[:rows, :tokens].copy_(input_ids)
        graph.mask.zero_()
        graph.mask[:rows, :tokens].copy_(attention_mask)
        graph.mask[rows:, 0] = True  # a padded row attends to one token: no empty softmax
        if graph.types is not None:
            graph.types.zero_()
            graph.types[:rows, :tokens].copy_(token_type_ids)
        graph.idx.fill_(self.empty_slot)
        graph.idx[:rows].copy_(batch.idx)

    def _forward(self, graph: _Graph) -> torch.Tensor:
        return self.encoder(graph.ids, graph.mask, graph.lora, graph.types)

    def _capture(self, graph: _Graph) -> None:
        """Record one pass of the encoder on the graph's static inputs (after a warm-up on a side stream,
        which runs lazy initialisation outside the capture, as CUDA graphs require)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(graph)
        torch.cuda.current_stream().wait_stream(side)
        graph.graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's thread is the only one that runs the model; another thread's CUDA
        # calls (a copy of answers, say) must not abort this capture.
        with torch.cuda.graph(graph.graph, pool=self.pool, capture_error_mode="thread_local"):
            graph.out = self._forward(graph)
