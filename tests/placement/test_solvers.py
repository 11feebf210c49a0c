"""Every solver returns a valid placement on random shapes, loads and speeds; greedy and the
baselines behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from placement_reference import straggler
from placement_strategies import problems

from placement.evaluate import evaluate
from placement.model import Cluster, MoEModelShape
from placement.problem import Problem
from placement.solvers import SolveOptions, solve
from placement.solvers.baselines import linear_table, round_robin_table
from placement.solvers.greedy import greedy_table, replica_counts
from placement.validate import validate

HEURISTICS = ["linear", "round-robin", "eplb", "eplb-global", "greedy"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(HEURISTICS))
def test_every_solver_returns_a_valid_placement(problem: Problem, strategy: str) -> None:
    sol = solve(problem, strategy, SolveOptions(time_limit_s=2.0))
    # solve() checks too; be explicit. Only DeepSeek's EPLB, reproduced as the engines run
    # it, may hold two copies of one expert on one GPU.
    validate(sol.placement, problem.model, allow_duplicates=strategy.startswith("eplb"))
    assert sol.placement.num_gpus == problem.cluster.size
    assert sol.placement.slots_per_gpu == problem.slots_per_gpu
    # a heuristic's objective is its straggler time (greedy's over the samples, which it
    # hedges over), its bound the fluid one on the same load
    hedged = strategy == "greedy" and problem.samples is not None
    load = problem.samples if hedged and problem.samples is not None else problem.load
    expect = straggler(sol.placement.table, problem.cluster, load)
    assert sol.objective == pytest.approx(expect, rel=1e-9, abs=1e-9)
    if not problem.cluster.has_curves:
        fluid = load.sum(-1) / problem.cluster.speeds.sum()
        assert sol.bound == pytest.approx(float(fluid.sum(-1).mean()), rel=1e-9, abs=1e-9)
    assert sol.placement.strategy == strategy


def test_replica_counts_follow_per_copy_load() -> None:
    counts = replica_counts(np.array([100.0, 10.0, 40.0, 0.0]), 7, 4)
    # e0 -> 2 copies (50 each), 50 > 40: e0 -> 3 copies (33.3), then 40 > 33.3: e2 -> 2 copies
    assert counts.tolist() == [3, 1, 2, 1]


def test_replica_counts_capped_by_gpus() -> None:
    counts = replica_counts(np.array([1000.0, 1.0, 1.0]), 9, 3)
    assert counts.tolist() == [3, 3, 3]


def test_linear_and_round_robin_layouts() -> None:
    model = MoEModelShape(moe_layers=1, experts=6)
    load = np.array([[1.0, 9.0, 2.0, 8.0, 3.0, 7.0]])
    problem = Problem.build(model, Cluster.uniform(4), load, redundant=2)
    lin = linear_table(problem)
    assert lin[0, :6].tolist() == [0, 1, 2, 3, 4, 5]
    assert lin[0, 6:].tolist() == [1, 3]  # hottest two experts, not on GPU 3 already
    rr = round_robin_table(problem)
    # GPU g holds experts g, g+4 first; GPUs 2 and 3 get one hot extra each
    assert rr[0].tolist() == [0, 4, 1, 5, 2, 1, 3, 5]


def test_greedy_prefers_fast_gpus() -> None:
    """Two experts, hot one on the fast GPU."""
    model = MoEModelShape(moe_layers=1, experts=2)
    cluster = Cluster.uniform(2, speeds=[1.0, 3.0])
    problem = Problem(model, cluster, 1, np.array([[90.0, 30.0]]))
    assert greedy_table(problem).tolist() == [[1, 0]]


def test_greedy_beats_eplb_with_speed_spread() -> None:
    rng = np.random.default_rng(3)
    L, E, G = 4, 32, 8
    load = rng.pareto(1.0, (L, E)) * 100 + 10
    cluster = Cluster.uniform(G, 4, speeds=np.linspace(0.8, 1.2, G).tolist())
    problem = Problem.build(MoEModelShape(moe_layers=L, experts=E), cluster, load, redundant=8)
    g = evaluate(solve(problem, "greedy").placement, cluster, load)
    e = evaluate(solve(problem, "eplb").placement, cluster, load)
    assert g.straggler < e.straggler
    assert g.ratio < 1.1


@pytest.mark.parametrize("strategy", HEURISTICS)
def test_uses_samples_and_curves(strategy: str) -> None:
    from placement.model import GPU, LatencyCurve

    curve = LatencyCurve(tokens=[1, 64, 256, 1024], micros=[20.0, 22.0, 40.0, 120.0])
    slow = LatencyCurve(tokens=[1, 64, 256, 1024], micros=[25.0, 28.0, 52.0, 160.0])
    cluster = Cluster(
        gpus=[GPU(node=f"n{g // 2}", curve=curve if g % 2 else slow) for g in range(4)]
    )
    rng = np.random.default_rng(0)
    load = rng.pareto(1.0, (3, 16)) * 50
    samples = load[None] * rng.uniform(0.5, 1.5, (5, 3, 16))
    problem = Problem.build(
        MoEModelShape(moe_layers=3, experts=16), cluster, load, redundant=4, samples=samples
    )
    sol = solve(problem, strategy)
    assert sol.objective > 0


def test_greedy_handles_the_deepseek_v3_shape() -> None:
    """58 x 256 experts on 64 GPUs, +64 copies (its solve time is in the placement benchmark)."""
    rng = np.random.default_rng(0)
    L, E, G = 58, 256, 64
    ranks = rng.permuted(np.tile(np.arange(1, E + 1), (L, 1)), axis=1)
    load = 1e5 / ranks**1.0  # Zipf-skewed
    cluster = Cluster.uniform(G, 8, speeds=rng.uniform(0.9, 1.1, G).tolist())
    problem = Problem.build(MoEModelShape(moe_layers=L, experts=E), cluster, load, redundant=64)
    table = greedy_table(problem)
    assert table.shape == (L, E + 64)
    copies = np.stack([np.bincount(row, minlength=E) for row in table])
    assert copies.min() >= 1 and (copies.sum(axis=1) == E + 64).all()
    hot = np.argmax(load, axis=1)  # the hottest expert of each layer got a redundant copy
    assert (copies[np.arange(L), hot] >= 2).all()


@pytest.mark.parametrize("strategy", HEURISTICS)
def test_zero_load_and_determinism(strategy: str) -> None:
    model = MoEModelShape(moe_layers=2, experts=6)
    cluster = Cluster.uniform(3, 3, speeds=[1.0, 1.2, 0.8])
    zero = Problem.build(model, cluster, np.zeros((2, 6)), redundant=3)
    sol = solve(zero, strategy)
    ev = evaluate(sol.placement, cluster, zero.load, dispatch="speed-aware")
    assert ev.straggler == 0.0 and ev.ratio == 1.0 and ev.balancedness == 1.0
    rng = np.random.default_rng(7)
    problem = Problem.build(model, cluster, rng.pareto(1.0, (2, 6)) * 10, redundant=3)
    assert solve(problem, strategy).placement.phy2log == solve(problem, strategy).placement.phy2log


def test_greedy_traffic_weight_co_locates() -> None:
    model = MoEModelShape(moe_layers=2, experts=4)
    cluster = Cluster.uniform(2)
    load = np.full((2, 4), 10.0)
    trans = np.zeros((1, 4, 4))
    trans[0, 0, 1] = trans[0, 2, 3] = trans[0, 1, 0] = trans[0, 3, 2] = 10.0
    plain = Problem(model, cluster, 2, load, transitions=trans)
    p0 = solve(plain, "greedy").placement
    share0 = evaluate(p0, cluster, load, transitions=trans).traffic_share
    from placement.problem import Weights

    weighted = Problem(model, cluster, 2, load, transitions=trans, weights=Weights(traffic=0.1))
    sol = solve(weighted, "greedy")
    ev = evaluate(sol.placement, cluster, load, transitions=trans)
    assert ev.traffic_share == 0.0 < share0
    assert ev.straggler == evaluate(p0, cluster, load).straggler  # balance kept
    assert sol.details["cross_tokens"] == 0.0


def test_greedy_migration_weight_keeps_current() -> None:
    from placement.model import Placement
    from placement.problem import Weights

    model = MoEModelShape(moe_layers=1, experts=6)
    cluster = Cluster.uniform(3)
    load = np.full((1, 6), 5.0)
    current = Placement.from_table([[5, 0, 4, 1, 3, 2]], model, 3, "old")
    problem = Problem(model, cluster, 2, load, current=current, weights=Weights(migration=1.0))
    sol = solve(problem, "greedy")
    assert sol.details["moved"] == 0.0
    free = solve(Problem(model, cluster, 2, load), "greedy")
    assert evaluate(free.placement, cluster, load, previous=current).moved > 0
