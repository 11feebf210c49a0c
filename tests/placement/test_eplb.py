"""EPLB: the published worked example, log2phy/logcnt, the global fallback, duplicate repair."""

from __future__ import annotations

import numpy as np

from placement.model import Cluster, MoEModelShape
from placement.problem import Problem
from placement.solvers import solve
from placement.solvers.eplb import (
    balanced_packing,
    rebalance_experts,
    repair_duplicates,
    replicate_experts,
)

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
    assert log2phy.shape == (2, 12, 5)
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


def test_repair_duplicates_swaps_and_replacements() -> None:
    table = np.array([[0, 0, 1, 2]])  # GPU0 holds expert 0 twice
    out, swaps, replaced = repair_duplicates(table, 2, np.array([[10.0, 3.0, 4.0]]))
    assert (swaps, replaced) == (1, 0)
    assert sorted(out[0].tolist()) == [0, 0, 1, 2] and out[0, 0] != out[0, 1]
    out, swaps, replaced = repair_duplicates(np.array([[0, 0, 0, 1]]), 2, np.ones((1, 2)))
    assert replaced == 1 and set(out[0, :2].tolist()) == {0, 1}


def test_registered_eplb_repairs_and_reports() -> None:
    model = MoEModelShape(moe_layers=2, experts=12)
    problem = Problem(model, Cluster.uniform(8, 4), 2, WEIGHT.astype(float))
    sol = solve(problem, "eplb")
    assert sol.details["nodes"] == 2 and sol.details["groups"] == 2
    raw, _, _ = rebalance_experts(WEIGHT, 16, 2, 2, 8)
    fixed, swaps, replaced = repair_duplicates(raw, 8, WEIGHT.astype(float))
    assert sol.details["duplicate_repairs"] == swaps and replaced == 0
    assert sol.placement.phy2log == fixed.tolist()
    # swaps keep the copy counts and move only the repaired slots
    assert sorted(fixed[0].tolist()) == sorted(raw[0].tolist())
    assert int((fixed != raw).sum()) <= 2 * swaps
