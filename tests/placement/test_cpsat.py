"""The CP-SAT solver: valid, never worse than greedy, optimal where the fluid bound is reachable,
traffic- and migration-aware, deterministic with one worker. Short time limits throughout."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from placement_strategies import problems

from placement.evaluate import evaluate, fluid_bound
from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape, Placement
from placement.problem import Problem, Weights
from placement.solvers import SolveOptions, solve
from placement.solvers.cpsat import moved_copies, objective, traffic_tokens
from placement.solvers.greedy import greedy_table
from placement.validate import validate

FAST = SolveOptions(time_limit_s=1.0, threads=1, seed=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_valid_and_never_worse_than_greedy(problem: Problem) -> None:
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=0.5, threads=1))
    validate(sol.placement, problem.model)
    greedy = objective(greedy_table(problem), problem)
    assert sol.objective <= greedy * (1 + 1e-9) + 1e-9
    assert sol.objective == pytest.approx(objective(sol.placement.table, problem))
    assert 0.0 <= sol.bound <= sol.objective * (1 + 1e-9) + 1e-9
    assert 0.0 <= sol.gap <= 1.0


@pytest.mark.parametrize("seed", range(4))
def test_random_speed_cases_beat_or_match_greedy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = MoEModelShape(moe_layers=2, experts=16)
    cluster = Cluster.uniform(4, 2, rng.uniform(0.8, 1.2, 4).tolist())
    load = np.floor(rng.pareto(1.5, (2, 16)) * 100) + 1
    problem = Problem.build(model, cluster, load, redundant=4)
    sol = solve(problem, "cpsat", FAST)
    greedy = objective(greedy_table(problem), problem)
    assert sol.objective <= greedy * (1 + 1e-9)
    ev = evaluate(sol.placement, cluster, load)
    assert ev.straggler == pytest.approx(sol.objective)


def test_reaches_fluid_bound_and_proves_it() -> None:
    # speeds 1, 2, 1: GPU 1 must take 12 tokens, the others 6 each; 5+1, 8+4, 3+3 does it
    model = MoEModelShape(moe_layers=1, experts=6)
    cluster = Cluster.uniform(3, 3, [1.0, 2.0, 1.0])
    load = np.array([[8.0, 4.0, 5.0, 1.0, 3.0, 3.0]])
    problem = Problem.build(model, cluster, load)
    sol = solve(problem, "cpsat", FAST)
    fluid = float(fluid_bound(cluster, load).sum())
    assert fluid == pytest.approx(6.0)
    assert sol.objective == pytest.approx(fluid)
    assert sol.status == "OPTIMAL"
    assert sol.gap == pytest.approx(0.0, abs=1e-6)


def test_reaches_fluid_bound_with_copies() -> None:
    # one hot expert (60) must be split: 4 GPUs x 3 slots, 8 experts + 4 redundant copies
    model = MoEModelShape(moe_layers=1, experts=8)
    cluster = Cluster.uniform(4, 2)
    load = np.array([[60.0, 20.0, 20.0, 20.0, 10.0, 10.0, 10.0, 10.0]])
    problem = Problem.build(model, cluster, load, redundant=4)
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=3.0, threads=1))
    fluid = float(fluid_bound(cluster, load).sum())
    assert sol.objective <= fluid * (1 + 1e-3)
    assert sol.bound == pytest.approx(fluid, rel=1e-3)


def test_latency_curves() -> None:
    slow = LatencyCurve(tokens=[0, 64, 128, 512], micros=[10.0, 12.0, 30.0, 100.0])
    fast = LatencyCurve(tokens=[0, 64, 128, 512], micros=[8.0, 10.0, 20.0, 70.0])
    cluster = Cluster(gpus=[GPU(node="a", curve=c) for c in (slow, fast, fast, slow)])
    rng = np.random.default_rng(3)
    model = MoEModelShape(moe_layers=2, experts=8)
    load = np.floor(rng.pareto(1.2, (2, 8)) * 60) + 5
    problem = Problem.build(model, cluster, load, redundant=4)
    sol = solve(problem, "cpsat", FAST)
    ev = evaluate(sol.placement, cluster, load)
    assert ev.straggler == pytest.approx(sol.objective)
    assert sol.objective <= objective(greedy_table(problem), problem) * (1 + 1e-9)
    assert sol.bound <= sol.objective


def test_hedges_over_samples() -> None:
    rng = np.random.default_rng(7)
    model = MoEModelShape(moe_layers=1, experts=12)
    cluster = Cluster.uniform(4, 2, [1.0, 1.1, 0.9, 1.0])
    samples = np.floor(rng.pareto(1.3, (6, 1, 12)) * 50) + 1
    problem = Problem.build(model, cluster, samples.mean(0), redundant=4, samples=samples)
    for hedge in ("expected", "robust"):
        sol = solve(problem, "cpsat", SolveOptions(time_limit_s=1.0, threads=1, hedge=hedge))
        per_sample = evaluate(sol.placement, cluster, samples).layer_time[:, 0]
        expect = per_sample.max() if hedge == "robust" else per_sample.mean()
        assert sol.objective == pytest.approx(expect)
        assert sol.objective <= objective(greedy_table(problem), problem, hedge) * (1 + 1e-9)
    with pytest.raises(ValueError, match="hedge"):
        solve(problem, "cpsat", SolveOptions(hedge="optimistic"))


def test_traffic_weight_reduces_traffic_share() -> None:
    # expert i in layer l sends all its tokens to expert (3 i + 1) % 8 in layer l + 1
    L, E = 3, 8
    model = MoEModelShape(moe_layers=L, experts=E)
    cluster = Cluster.uniform(4, 2)
    load = np.full((L, E), 100.0)
    trans = np.zeros((L - 1, E, E))
    for layer in range(L - 1):
        for i in range(E):
            trans[layer, i, (3 * i + 1) % E] = 100.0
    base = Problem.build(model, cluster, load, transitions=trans)
    weighted = Problem.build(model, cluster, load, transitions=trans, weights=Weights(traffic=1.0))
    plain = solve(base, "cpsat", FAST)
    aware = solve(weighted, "cpsat", SolveOptions(time_limit_s=3.0, threads=1))
    share_plain = evaluate(plain.placement, cluster, load, transitions=trans).traffic_share
    share_aware = evaluate(aware.placement, cluster, load, transitions=trans).traffic_share
    assert share_aware < share_plain
    assert share_aware == pytest.approx(0.0, abs=1e-9)  # a perfect co-location exists
    # and the balance did not suffer: every GPU still holds 200 tokens
    assert evaluate(aware.placement, cluster, load).ratio == pytest.approx(1.0)
    assert traffic_tokens(aware.placement.table, weighted).sum() == pytest.approx(0.0)


def test_migration_weight_limits_moved_copies() -> None:
    rng = np.random.default_rng(11)
    model = MoEModelShape(moe_layers=2, experts=12)
    cluster = Cluster.uniform(4, 2)
    old_load = np.floor(rng.pareto(1.3, (2, 12)) * 50) + 1
    new_load = old_load[:, ::-1].copy()  # hot experts are now cold and vice versa
    current = solve(Problem.build(model, cluster, old_load, redundant=4), "greedy").placement
    free = Problem.build(model, cluster, new_load, redundant=4, current=current)
    sticky = Problem.build(
        model, cluster, new_load, redundant=4, current=current, weights=Weights(migration=1e6)
    )
    moved_free = int(moved_copies(solve(free, "cpsat", FAST).placement.table, free).sum())
    sol = solve(sticky, "cpsat", FAST)
    moved_sticky = evaluate(sol.placement, cluster, new_load, previous=current).moved
    assert moved_free > 0
    assert moved_sticky < moved_free
    assert moved_sticky == int(moved_copies(sol.placement.table, sticky).sum())
    # copies that stay on their GPU keep their slot
    kept = (sol.placement.table == current.table).sum()
    assert kept >= sol.placement.table.size - 2 * moved_sticky


def test_deterministic_with_one_worker() -> None:
    rng = np.random.default_rng(5)
    model = MoEModelShape(moe_layers=3, experts=16)
    cluster = Cluster.uniform(8, 4, rng.uniform(0.85, 1.15, 8).tolist())
    load = np.floor(rng.pareto(1.2, (3, 16)) * 80) + 1
    problem = Problem.build(model, cluster, load, redundant=8)
    opts = SolveOptions(time_limit_s=1.0, threads=1, seed=3)
    first = solve(problem, "cpsat", opts)
    second = solve(problem, "cpsat", opts)
    assert first.placement.phy2log == second.placement.phy2log
    assert first.objective == second.objective


def test_progress_and_metadata() -> None:
    seen: list[float] = []
    model = MoEModelShape(moe_layers=3, experts=4)
    problem = Problem.build(model, Cluster.uniform(2), np.arange(12.0).reshape(3, 4))
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=1.0, threads=1, progress=seen.append))
    assert seen and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)
    assert sol.placement.strategy == "cpsat"
    assert isinstance(Placement.model_validate_json(sol.placement.to_json()), Placement)


def test_best_split_mode_never_worse_than_greedy() -> None:
    from placement.solvers.cpsat import objective as obj_fn

    rng = np.random.default_rng(13)
    model = MoEModelShape(moe_layers=2, experts=16)
    cluster = Cluster.uniform(8, 4, rng.uniform(0.85, 1.15, 8).tolist())
    samples = np.floor(rng.pareto(1.3, (4, 2, 16)) * 60) + 1
    problem = Problem.build(model, cluster, samples.mean(0), redundant=8, samples=samples)
    sol = solve(problem, "cpsat", replace(FAST, dispatch="speed-aware"))
    validate(sol.placement, model)
    best = evaluate(sol.placement, cluster, samples, dispatch="speed-aware").straggler
    assert sol.objective == pytest.approx(best)
    greedy = obj_fn(greedy_table(problem), problem, dispatch="speed-aware")
    assert sol.objective <= greedy * (1 + 1e-9)
    assert sol.bound <= sol.objective
    with pytest.raises(ValueError, match="dispatch"):
        solve(problem, "cpsat", replace(FAST, dispatch="fastest"))


def test_coupled_mode_reports_progress_and_never_claims_optimal() -> None:
    L, E = 2, 4
    model = MoEModelShape(moe_layers=L, experts=E)
    cluster = Cluster.uniform(2)
    load = np.full((L, E), 10.0)
    trans = np.zeros((L - 1, E, E))
    trans[0, 0, 1] = trans[0, 1, 0] = trans[0, 2, 3] = trans[0, 3, 2] = 10.0
    problem = Problem.build(model, cluster, load, transitions=trans, weights=Weights(traffic=1.0))
    seen: list[float] = []
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=1.0, threads=1, progress=seen.append))
    assert seen == [1.0]
    assert sol.status in ("FEASIBLE", "OPTIMAL")  # OPTIMAL only via the proven bound
    assert sol.bound <= sol.objective


def _stop_problem() -> Problem:
    """Big enough that a 60 s limit is used in full: 4 layers x 64 experts on 16 GPUs."""
    rng = np.random.default_rng(17)
    model = MoEModelShape(moe_layers=4, experts=64)
    cluster = Cluster.uniform(16, 4, rng.uniform(0.9, 1.01, 16).tolist())
    samples = np.floor(rng.pareto(1.3, (8, 4, 64)) * 60) + 1
    return Problem.build(model, cluster, samples.mean(0), redundant=16, samples=samples)


@pytest.mark.parametrize("threads", [1, 2])
def test_stop_event_ends_a_long_solve_early(threads: int) -> None:
    problem = _stop_problem()
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    started = time.monotonic()
    timer.start()
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=60.0, threads=threads, stop=stop))
    wall = time.monotonic() - started
    timer.cancel()
    assert wall < 5.0
    validate(sol.placement, problem.model)
    assert sol.details["stopped"] == 1.0
    ev = evaluate(sol.placement, problem.cluster, problem.samples)
    assert sol.objective == pytest.approx(ev.straggler)


def test_stop_callable_before_start_returns_the_warm_start() -> None:
    problem = _stop_problem()
    started = time.monotonic()
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=60.0, threads=1, stop=lambda: True))
    assert time.monotonic() - started < 5.0
    greedy = greedy_table(problem)
    per_layer = evaluate(
        Placement.from_table(greedy, problem.model, problem.cluster.size, "greedy"),
        problem.cluster,
        problem.samples,
    ).straggler
    assert sol.objective == pytest.approx(per_layer)
