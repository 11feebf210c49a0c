"""The CP-SAT solver against independent references (tests/placement/placement_reference.py:
a hand-written evaluator, the optimum by enumeration, a fluid/copy lower bound): its objective
is the placement's straggler time, its bound never exceeds the true optimum, OPTIMAL only when
it is; optimal where the fluid bound is reachable, traffic- and migration-aware, deterministic
with one worker. Short time limits throughout."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from placement_reference import best_split_straggler, lower_bound, optimum, straggler
from placement_strategies import problems, tiny_problems

import placement.solvers.cpsat.solve as cpsat_solve
from placement.evaluate import evaluate, fluid_bound
from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape, Placement
from placement.problem import Problem, Weights
from placement.solvers import Solution, SolveOptions, solve
from placement.solvers.cpsat import moved_copies, traffic_tokens
from placement.solvers.greedy import greedy_table
from placement.validate import validate

FAST = SolveOptions(time_limit_s=1.0, threads=1, seed=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_valid_and_objective_is_the_straggler_time(problem: Problem) -> None:
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=0.5, threads=1))
    validate(sol.placement, problem.model)
    load = problem.samples if problem.samples is not None else problem.load
    expect = straggler(sol.placement.table, problem.cluster, load)
    assert sol.objective == pytest.approx(expect, rel=1e-9, abs=1e-9)
    if not problem.cluster.has_curves:
        assert sol.bound >= lower_bound(problem) * (1 - 1e-9)


TINY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@TINY
@given(tiny_problems(with_curves=False))
def test_reaches_the_enumerated_optimum_and_bounds_it(problem: Problem) -> None:
    """Tiny problems, speed factors: every placement enumerated. The bound is a bound on the
    true optimum, and (every replica count is open to CP-SAT at this size) the optimum is
    reached."""
    _check_against_enumeration(problem)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_problems(with_curves=True))
def test_reaches_the_enumerated_optimum_with_curves(problem: Problem) -> None:
    """The same with latency curves (CP-SAT's piecewise-linear model; slower to enumerate)."""
    _check_against_enumeration(problem)


def _curve(tokens: list[int], micros: list[float]) -> LatencyCurve:
    return LatencyCurve(tokens=tokens, micros=micros)


def _found_cases() -> list[Problem]:
    """Cases random exploration found (CI, 2026-12-03): a bound above the optimum and a false
    OPTIMAL 0.07% above it (loads rounded to whole tokens per copy on steep curves), and
    CP-SAT stopping at its 1e-4 gap short of the optimum."""
    two_layers = MoEModelShape(moe_layers=2, experts=7)
    load = np.array([[29, 53, 0, 0, 22, 123, 28], [33, 471, 12792, 772, 0, 260, 2]], float)
    steep = Cluster(
        gpus=[
            GPU(node="n0", curve=_curve([0, 1, 119, 264, 321], [1, 1, 1, 1, 4])),
            GPU(node="n1", curve=_curve([0, 159, 238, 351, 361], [1, 1, 1, 1, 17.239])),
            GPU(node="n2", curve=_curve([0, 1, 2, 3, 270, 273], [1, 1, 1, 1, 1, 5])),
        ]
    )
    short = Cluster(
        gpus=[
            GPU(node="n0", curve=_curve([0, 1, 2, 242, 318], [1, 1, 1, 1, 4])),
            GPU(node="n1", curve=_curve([0, 1, 2, 92, 302], [1, 1, 1, 1, 5])),
            GPU(node="n2", curve=_curve([0, 1, 2, 3, 5], [1, 1, 1, 1, 2])),
        ]
    )
    sampled = np.array(
        [
            [[480.842, 24.932, 5.178, 1.523, 1295.403]],
            [[333.827, 20.036, 2.404, 1.415, 1025.948]],
            [[139.702, 33.373, 1.855, 1.182, 522.316]],
        ]
    )
    return [
        Problem(two_layers, steep, 3, load),
        Problem(two_layers, short, 3, load),
        Problem(
            MoEModelShape(moe_layers=1, experts=5),
            Cluster.uniform(3, 1, [1.25, 2.21875, 1.25]),
            3,
            np.array([[325.0, 25.0, 4.0, 1.0, 812.0]]),
            samples=sampled,
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_found_cases_reach_the_optimum_and_bound_it(case: int) -> None:
    _check_against_enumeration(_found_cases()[case])


def _check_against_enumeration(problem: Problem) -> None:
    """Within cpsat's optimality tolerance (a relative 1e-4, documented) of the enumerated
    optimum; the bound never above it; OPTIMAL only within that tolerance."""
    best, _ = optimum(problem)
    sol = solve(problem, "cpsat", FAST)
    load = problem.samples if problem.samples is not None else problem.load
    assert sol.objective == pytest.approx(straggler(sol.placement.table, problem.cluster, load))
    assert sol.bound <= best * (1 + 1e-9) + 1e-9
    if not problem.cluster.has_curves:
        assert sol.bound >= lower_bound(problem) * (1 - 1e-9)
    assert sol.objective <= best * (1 + 1e-4) + 1e-9


def _solve_with_near_counts(problem: Problem) -> Solution:
    """cpsat as on large problems: CP-SAT may choose replica counts near the proportional
    rule only (never every count)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpsat_solve, "_ALL_COUNTS_MAX", 0)
        return solve(problem, "cpsat", FAST)


@TINY
@given(tiny_problems())
def test_restricted_replica_counts_never_claim_optimal(problem: Problem) -> None:
    """With the model's replica counts restricted (as on large problems: only counts near the
    proportional rule), CP-SAT's OPTIMAL is optimal for the restricted model only: the solver
    must neither report its bound nor OPTIMAL unless the enumerated optimum agrees (it did,
    once: OPTIMAL at 60.29 where 58.09 was reachable, see the next test)."""
    sol = _solve_with_near_counts(problem)
    best, _ = optimum(problem)
    assert sol.bound <= best * (1 + 1e-4) + 1e-9
    if sol.status == "OPTIMAL":
        assert sol.objective <= best * (1 + 1e-4) + 1e-9


def test_optimum_needs_a_count_the_proportional_rule_rules_out() -> None:
    """Expert 1 (22 of 138 tokens) needs 2 copies for the optimum: 68 + 11 tokens at speed
    1.36 = 58.09 (every other placement of 4 slots is slower); the proportional rule gives it
    4 * 22 / 138 < 1 copy. With only near-proportional counts CP-SAT proved 60.29 'optimal'."""
    model = MoEModelShape(moe_layers=1, experts=3)
    cluster = Cluster.uniform(2, 2, [1.36, 1.26])
    load = np.array([[48.0, 22.0, 68.0]])
    problem = Problem.build(model, cluster, load, redundant=1)
    best = 79.0 / 1.36
    assert optimum(problem)[0] == pytest.approx(best)
    sol = solve(problem, "cpsat", FAST)
    assert sol.objective == pytest.approx(best)
    assert sol.status == "OPTIMAL"
    restricted = _solve_with_near_counts(problem)
    assert restricted.bound <= best * (1 + 1e-9)
    assert restricted.status != "OPTIMAL" or restricted.objective == pytest.approx(best)


@pytest.mark.parametrize("seed", range(4))
def test_random_speed_cases_close_their_gap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = MoEModelShape(moe_layers=2, experts=16)
    cluster = Cluster.uniform(4, 2, rng.uniform(0.8, 1.2, 4).tolist())
    load = np.floor(rng.pareto(1.5, (2, 16)) * 100) + 1
    problem = Problem.build(model, cluster, load, redundant=4)
    sol = solve(problem, "cpsat", FAST)
    assert sol.objective == pytest.approx(straggler(sol.placement.table, cluster, load))
    # measured: within 2e-4 of the proven bound, 1.001-1.004 x fluid (1.12 where one expert
    # is hot), greedy 1.002-1.010 x
    assert sol.bound >= lower_bound(problem) * (1 - 1e-9)
    assert sol.objective <= sol.bound * 1.005


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
    assert sol.objective == pytest.approx(straggler(sol.placement.table, cluster, load))
    # the bound holds for every placement: greedy's and a round-robin one included
    for other in (greedy_table(problem), solve(problem, "round-robin").placement.table):
        assert sol.bound <= straggler(other, cluster, load) * (1 + 1e-9)


def test_hedges_over_samples() -> None:
    rng = np.random.default_rng(7)
    model = MoEModelShape(moe_layers=1, experts=12)
    cluster = Cluster.uniform(4, 2, [1.0, 1.1, 0.9, 1.0])
    samples = np.floor(rng.pareto(1.3, (6, 1, 12)) * 50) + 1
    problem = Problem.build(model, cluster, samples.mean(0), redundant=4, samples=samples)
    for hedge in ("expected", "robust"):
        sol = solve(problem, "cpsat", SolveOptions(time_limit_s=1.0, threads=1, hedge=hedge))
        expect = straggler(sol.placement.table, cluster, samples, hedge)
        assert sol.objective == pytest.approx(expect)
        assert sol.bound >= lower_bound(problem, hedge) * (1 - 1e-9)
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


def test_best_split_mode_objective_is_the_best_split_time() -> None:
    rng = np.random.default_rng(13)
    model = MoEModelShape(moe_layers=2, experts=16)
    cluster = Cluster.uniform(8, 4, rng.uniform(0.85, 1.15, 8).tolist())
    samples = np.floor(rng.pareto(1.3, (4, 2, 16)) * 60) + 1
    problem = Problem.build(model, cluster, samples.mean(0), redundant=8, samples=samples)
    sol = solve(problem, "cpsat", replace(FAST, dispatch="speed-aware"))
    validate(sol.placement, model)
    assert sol.objective == pytest.approx(
        best_split_straggler(sol.placement.table, cluster, samples)
    )
    # the fluid/copy bound, for any dispatch
    assert sol.bound == pytest.approx(lower_bound(problem))
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
    # the bound counts the straggler term only, which every placement exceeds
    assert sol.bound <= optimum(problem)[0] * (1 + 1e-9)
    assert sol.objective >= straggler(sol.placement.table, cluster, load)


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
    assert problem.samples is not None
    expect = straggler(sol.placement.table, problem.cluster, problem.samples)
    assert sol.objective == pytest.approx(expect)


def test_stop_callable_before_start_returns_the_warm_start() -> None:
    problem = _stop_problem()
    started = time.monotonic()
    sol = solve(problem, "cpsat", SolveOptions(time_limit_s=60.0, threads=1, stop=lambda: True))
    assert time.monotonic() - started < 5.0
    assert problem.samples is not None
    assert (sol.placement.table == greedy_table(problem)).all()
    expect = straggler(sol.placement.table, problem.cluster, problem.samples)
    assert sol.objective == pytest.approx(expect)
