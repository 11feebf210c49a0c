"""EPLB: the published worked example, log2phy/logcnt, the global fallback, torch's tie order,
DeepSeek's output unchanged (two copies on one GPU included), the EPLB file round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placement.evaluate import evaluate
from placement.formats import PlacementFormatError, check_eplb_arrays, loads, to_eplb
from placement.model import Cluster, MoEModelShape, Placement
from placement.problem import Problem
from placement.solvers import solve
from placement.solvers.eplb import (
    balanced_packing,
    rebalance_experts,
    replicas_and_ranks,
    replicate_experts,
)
from placement.solvers.introsort import _Sorter, descending_order
from placement.validate import InvalidPlacementError, check_engine, duplicate_copies

WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_worked_example() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == PHY2LOG
    assert log2phy.shape == (2, 12, int(logcnt.max()))  # DeepSeek's width: the largest count
    assert logcnt.tolist() == [np.bincount(row, minlength=12).tolist() for row in PHY2LOG]
    for layer in range(2):
        for e in range(12):
            slots = [s for s in log2phy[layer, e].tolist() if s >= 0]
            assert len(slots) == logcnt[layer, e]
            assert all(phy2log[layer, s] == e for s in slots)
            assert (log2phy[layer, e, logcnt[layer, e] :] == -1).all()


def test_global_policy_when_groups_do_not_divide() -> None:
    phy2log, _, logcnt = rebalance_experts(WEIGHT, 16, 3, 2, 8)  # 3 groups, 2 nodes
    assert phy2log.shape == (2, 16) and logcnt.sum(-1).tolist() == [16, 16]
    # global EPLB replicates the hottest experts of the whole layer
    assert logcnt[0, 10] == 2 and logcnt[1, 5] == 2


def test_packing_and_replication_steps() -> None:
    pack, rank = balanced_packing(np.array([[5.0, 1.0, 4.0, 2.0]]), 2)
    # 5 -> pack 0, 4 -> pack 1, 2 -> pack 1 (lighter), 1 -> pack 0 (pack 1 is full)
    assert pack.tolist() == [[0, 0, 1, 1]] and rank.tolist() == [[0, 1, 0, 1]]
    phy2log, rank, count = replicate_experts(np.array([[10.0, 3.0, 6.0]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 2]]
    assert rank.tolist() == [[0, 0, 0, 1, 1]] and count.tolist() == [[2, 1, 2]]


def test_ties_follow_torch_sort_order() -> None:
    # recorded from torch 2.14.1 (CPU): torch.zeros(17).sort(descending=True).indices and
    # torch.tensor([1., 0.] * 10).sort(descending=True).indices; not stable past 16 items
    assert descending_order([0.0] * 17) == [
        8,
        16,
        15,
        14,
        13,
        12,
        11,
        10,
        9,
        0,
        7,
        6,
        5,
        4,
        3,
        2,
        1,
    ]
    assert descending_order([1.0, 0.0] * 10) == [
        0, 2, 18, 4, 6, 16, 8, 10, 14, 12, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1
    ]  # fmt: skip
    assert descending_order([3.0, 1.0, 3.0, 2.0]) == [0, 2, 3, 1]  # short rows: stable


def test_heapsort_fallback_sorts_descending() -> None:
    values = np.random.default_rng(0).integers(0, 5, size=41).tolist()
    sorter = _Sorter(values)
    sorter.heapsort(0, len(values))  # the depth-limit path, unreachable on ordinary rows
    assert [values[i] for i in sorter.idx] == sorted(values, reverse=True)
    assert sorted(sorter.idx) == list(range(41))


HOT = np.array([[100.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]])  # layer 0: expert 0 needs 5 of 8


def test_registered_eplb_is_deepseeks_output_with_two_copies_on_a_gpu() -> None:
    model = MoEModelShape(moe_layers=2, experts=4)
    problem = Problem(model, Cluster.uniform(2, 4), 4, HOT)
    sol = solve(problem, "eplb-global")
    raw, _, _ = rebalance_experts(HOT, 8, 1, 1, 2)
    assert sol.placement.phy2log == raw.tolist()
    # 5 copies of expert 0 on 2 GPUs of 4 slots: at least 3 are extra copies on a GPU
    assert sol.details["duplicates_on_gpu"] >= 3
    assert len(duplicate_copies(sol.placement.table, 2)) == sol.details["duplicates_on_gpu"]
    # the evaluator scores it as the engines dispatch it, each copy load / copies: by hand,
    # copies of 20 go to GPUs 0, 1, 0, 1, 0, the three 1s to GPU 1, 1, 0 -> [61, 42]
    assert raw[0, :4].tolist().count(0) == 3
    assert evaluate(sol.placement, problem.cluster, HOT).gpu_load[0, 0] == pytest.approx([61, 42])
    strict = solve(problem, "greedy").placement  # other solvers keep the no-duplicate rule
    assert len(duplicate_copies(strict.table, 2)) == 0


def test_eplb_file_round_trip_keeps_deepseeks_log2phy() -> None:
    weight = np.random.default_rng(3).integers(0, 50, size=(3, 12))
    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    _, ranks, _ = replicas_and_ranks(weight, 16, 4, 2, 8)
    model = MoEModelShape(moe_layers=3, experts=12)
    text = json.dumps(
        {"phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist()}
    )
    imported = loads(text, "eplb", model, 8)
    assert imported.phy2log == phy2log.tolist()
    read_ranks = check_eplb_arrays(json.loads(text), imported.table, 12)
    assert read_ranks is not None and np.array_equal(read_ranks, ranks)
    out = to_eplb(imported, read_ranks)
    assert out["log2phy"] == log2phy.tolist() and out["logcnt"] == logcnt.tolist()
    assert np.asarray(out["log2phy"]).shape == (3, 12, int(logcnt.max()))


def _eplb_text(phy2log: list[list[int]], log2phy: list[list[list[int]]]) -> str:
    return json.dumps({"phy2log": phy2log, "log2phy": log2phy})


@pytest.mark.parametrize(
    ("log2phy", "message"),
    [
        ([[[0, 1], [1, -1], [2, -1]]], r"log2phy\[0\]\[0\]\[1\] = 1, but that slot holds expert 1"),
        ([[[0, 3, 1], [1, -1, -1], [2, -1, -1]]], "expert 0 has 2 copies in phy2log"),
        ([[[0, 0], [1, -1], [2, -1]]], "listed twice"),
        ([[[0, 9], [1, -1], [2, -1]]], "does not exist"),
        ([[[0, -1], [1, -1], [2, -1]]], r"log2phy\[0\] does not list slot 3 \(expert 0\)"),
        ([[[0], [1], [2]]], r"shape \(1, 3, 1\), expected \(1, 3, >= 2\)"),
    ],
)
def test_inconsistent_log2phy_is_refused(log2phy: list[list[list[int]]], message: str) -> None:
    model = MoEModelShape(moe_layers=1, experts=3)
    phy2log = [[0, 1, 2, 0]]  # expert 0 in slots 0 and 3
    assert loads(_eplb_text(phy2log, [[[3, 0], [1, -1], [2, -1]]]), "eplb", model, 2)
    with pytest.raises(PlacementFormatError, match=message):
        loads(_eplb_text(phy2log, log2phy), "eplb", model, 2)


def test_two_copies_on_a_gpu_accepted_unless_the_engine_cannot_load_them() -> None:
    model = MoEModelShape(moe_layers=1, experts=3)
    text = json.dumps({"phy2log": [[0, 0, 1, 2]], "logcnt": [[2, 1, 1]]})
    placement = loads(text, "eplb", model, 2)
    assert check_engine(placement, "vllm").tolist() == [[0, 0, 0]]
    assert len(check_engine(placement, "sglang")) == 1
    with pytest.raises(InvalidPlacementError, match="DeepEP loads only the first copy"):
        check_engine(placement, "sglang-deepep")
    with pytest.raises(InvalidPlacementError, match="GPU 0 holds two copies"):
        loads(text, "eplb", model, 2, allow_duplicates=False)
    canonical = Placement.from_table([[0, 0, 1, 2]], model, 2, "eplb").to_json()
    assert loads(canonical).phy2log == [[0, 0, 1, 2]]  # canonical files too (solve --strategy eplb)
