"""The encoder through `EncoderGraphs`: passes padded to a bucket, on static inputs, answer as eager passes
do, and an adapter written after a bucket was first used is what its next pass reads.

On the CPU the static inputs run eagerly (there are no CUDA graphs); on CUDA (LORAPLEX_TEST_DEVICE=cuda,
and the test marked `cuda`) the graphs are captured and replayed. The golden tests of every family and
task run through the graphs too (`tests.family_support.check_mixed_batch`, `tests/test_task_mixed.py`).
"""

from __future__ import annotations

import logging

import pytest
import torch

from loraplex.engine import graphs as graphs_module
from loraplex.engine.core import Engine
from loraplex.engine.graphs import MAX_GRAPH_TOKENS, EncoderGraphs, bucket, rank_bucket
from tests.device_support import DEVICE, TOLERANCE
from tests.family_support import load_adapter
from tests.peft_factory import save_peft_adapter

TEXTS = ["great", "an awful, slow and noisy film", "fine I guess", "the best meal of my whole life, really"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return {
        "r2": save_peft_adapter(root / "r2", r=2, seed=1),
        "r8-all": save_peft_adapter(root / "r8-all", r=8, seed=2, target_modules="all-linear"),
        "r16": save_peft_adapter(root / "r16", r=16, seed=3, num_labels=5),
    }


def engines(adapters, names: list[str], capture: bool = False) -> tuple[Engine, Engine]:
    """The same adapters (slot i: names[i]) in an eager engine and in one through the graphs."""
    pair = []
    for graphs in (False, True):
        engine = Engine(device=DEVICE, num_slots=4, max_rank=32)
        for slot, name in enumerate(names):
            engine.load_slot(slot, load_adapter(adapters[name], engine))
        if graphs:
            engine.use_graphs(capture=capture)
        else:  # eager even where LORAPLEX_CUDA_GRAPHS=1 gave the engine graphs at start
            engine.model.graphs = None
        pair.append(engine)
    return pair[0], pair[1]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= TOLERANCE


def test_buckets():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert [rank_bucket(r, 64) for r in (0, 1, 2, 3, 8, 9, 40, 64)] == [0, 1, 2, 4, 8, 16, 64, 64]
    assert rank_bucket(40, 32) == 32  # never past the slots' largest rank
    graphs = EncoderGraphs(torch.nn.Identity(), 0, max_length=40, r_max=64, empty_slot=4, capture=False)
    assert graphs.key(3, 20, 5, False) == (4, 32, 8, False)
    assert graphs.key(3, 38, 0, True) == (4, 40, 0, True)  # tokens: never past the model's length
    assert graphs.key(10_000, 8, 8, False) is None  # past the last bucket of rows
    big = EncoderGraphs(torch.nn.Identity(), 0, max_length=8192, r_max=64, empty_slot=4, capture=False)
    assert big.key(64, 512, 8, False) is not None
    assert big.key(64, MAX_GRAPH_TOKENS // 64 + 1, 8, False) is None  # too many padded tokens


def test_mixed_ranks_and_padding_answer_as_eager_passes(adapters):
    eager, graphed = engines(adapters, ["r2", "r8-all", "r16"])
    ids = eager.tokenize(TEXTS)
    base = eager.empty_slot  # the base model: its hidden states
    for slots in ([0, 1, 2, base], [2, 2, 0], [1], [base, base]):
        rows = [ids[i % len(ids)] for i in range(len(slots))]
        assert_same(graphed.classify(rows, slots), eager.classify(rows, slots))
    keys = set(graphed.model.graphs.graphs)
    # rows 4, 3, 1, 2 -> buckets 4, 4, 1, 2; ranks 16, 16, 8 (all-linear r8), 0 (the empty slot only)
    assert {(rows, rank) for rows, _, rank, _ in keys} == {(4, 16), (1, 8), (2, 0)}


def test_an_adapter_replaced_after_its_bucket_ran_is_what_the_next_pass_reads(adapters):
    capture = torch.device(DEVICE).type == "cuda"
    eager, graphed = engines(adapters, ["r16", "r2"], capture=capture)
    ids = eager.tokenize(TEXTS)
    slots = [0, 1, 0, 1]
    first = graphed.classify(ids, slots)
    keys = dict(graphed.model.graphs.graphs)
    for engine in (eager, graphed):  # slot 1: r2 -> r8 on every linear; the batch's rank stays 16
        engine.load_slot(1, load_adapter(adapters["r8-all"], engine))
    second = graphed.classify(ids, slots)
    assert_same(second, eager.classify(ids, slots))
    assert graphed.model.graphs.graphs == keys, "the same bucket served both passes"
    assert (second[1] - first[1]).abs().max() > 1e-3  # the new adapter answered
    assert_same(second[:1], first[:1])  # and slot 0's rows are as they were


def test_passes_without_a_bucket_run_eagerly(adapters, monkeypatch, caplog):
    eager, graphed = engines(adapters, ["r2"])
    ids = eager.tokenize(TEXTS)
    many = [ids[i % len(ids)] for i in range(300)]  # past the last bucket of rows, in one pass
    eager.group_tokens = graphed.group_tokens = None
    assert_same(graphed.classify(many, [0] * 300), eager.classify(many, [0] * 300))
    assert not graphed.model.graphs.graphs
    monkeypatch.setattr(graphs_module, "MAX_GRAPHS", 1)
    with caplog.at_level(logging.INFO, logger="loraplex.engine.graphs"):
        assert_same(graphed.classify(ids[:1], [0]), eager.classify(ids[:1], [0]))
        assert_same(graphed.classify(ids * 2, [0] * 8), eager.classify(ids * 2, [0] * 8))  # another bucket
    assert len(graphed.model.graphs.graphs) == 1
    assert "run without one" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_are_captured_once_per_bucket_and_replayed(adapters):
    eager, graphed = engines(adapters, ["r2", "r8-all", "r16"], capture=True)
    ids = eager.tokenize(TEXTS)
    for slots in ([0, 1, 2], [2, 1, 0], [1, 1, 1]):  # one bucket (4 rows, rank 16 or 8)
        assert_same(graphed.classify(ids[:3], slots), eager.classify(ids[:3], slots))
    captured = graphed.model.graphs.graphs
    assert captured and all(g.graph is not None for g in captured.values())
    assert len(captured) == 2  # ranks 16 and 8 at the same rows and tokens


def test_the_switch_is_off_by_default_and_cuda_only(monkeypatch, caplog):
    from loraplex.engine.core import cuda_graphs_enabled

    monkeypatch.delenv("LORAPLEX_CUDA_GRAPHS", raising=False)
    assert not cuda_graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv("LORAPLEX_CUDA_GRAPHS", "1")
    assert cuda_graphs_enabled(torch.device("cuda"))
    with caplog.at_level(logging.WARNING, logger="loraplex.engine.core"):
        assert Engine(device="cpu", num_slots=1).model.graphs is None
    assert "LORAPLEX_CUDA_GRAPHS=1: CUDA graphs run on CUDA only" in caplog.text
