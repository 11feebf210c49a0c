"""Orchestration of a cpsat solve: the greedy warm start, the time budget per layer, the
thread pool over layers, the coupled all-layer model when traffic is weighted, the
never-worse-than-the-warm-start choice and the reported bound (see
:mod:`placement.solvers.cpsat`)."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from placement.evaluate import DISPATCH_RULES, Dispatch
from placement.model import FloatArray, IntArray, Placement
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions, register, stop_requested
from placement.solvers.cpsat.dispatch_polish import flex_polish
from placement.solvers.cpsat.local_search import SWAP_S_PER_UNIT, polish
from placement.solvers.cpsat.model import (
    GAP_LIMIT,
    CountChoice,
    LayerVars,
    add_layer,
    layer_scale,
    most_copies,
    replica_candidates,
    run_search,
    solver_params,
    table_from_vars,
)
from placement.solvers.cpsat.objective import (
    copy_matrix,
    hedged_fluid,
    layer_objective,
    objective,
    scenarios,
)

_MAX_PAIRS_PER_BOUNDARY = 64
_POLISH_SHARE = 0.4  # of a layer's budget for the local search before CP-SAT
_FREE_COUNTS_MAX = 20000  # E * G up to which CP-SAT may change replica counts ("near")
# E * G * (most copies) up to which CP-SAT may give any expert any count ("all"): the model
# is then the placement problem itself and its bound and OPTIMAL can be trusted
_ALL_COUNTS_MAX = 3000
_BUILD_S_PER_TERM = 2e-6  # rough cost of building the CP-SAT model, seconds per term
_MIN_SOLVE_S = 0.05
_BUILD_S_PER_VAR = 6e-6  # CP-SAT model building (deterministic mode): per boolean c[e, g, r]
_BUILD_S_PER_TERM_DET = 5e-7  # ... and per linear term
_BUILD_S_PER_CURVE = 3e-3  # ... and per (sample, GPU) latency-curve block
_DET_PER_WALL_S = 0.5  # deterministic-time units given per wall second of budget
_FLEX_SHARE = 0.25  # of a layer's budget for the speed-aware polish (dispatch="speed-aware")
_REFINE_CURVES_MAX = 100_000  # L * P * K * G above which greedy's refinement is skipped


def _threads(options: SolveOptions) -> int:
    return options.threads if options.threads > 0 else (os.cpu_count() or 1)


def _stopped(options: SolveOptions) -> Callable[[], bool]:
    """``options.stop`` as a callable for the local searches."""
    return lambda: stop_requested(options.stop)


@dataclass
class _LayerResult:
    row: IntArray
    bound: float  # lower bound on the layer's objective (problem units)
    optimal: bool
    improved: bool


def _keep_slots(row: IntArray, previous: IntArray | None, S: int) -> IntArray:
    """Reorder slots within each GPU so that copies already there keep their slot."""
    if previous is None:
        return row
    out = row.copy()
    for g in range(row.size // S):
        new = list(row[g * S : (g + 1) * S])
        old = list(previous[g * S : (g + 1) * S])
        slots: list[int | None] = [e if e in new else None for e in old]
        rest = [e for e in new if e not in old]
        out[g * S : (g + 1) * S] = [e if e is not None else rest.pop(0) for e in slots]
    return out


def _layer_problem(problem: Problem, layer: int) -> Problem:
    """The one-layer sub-problem of ``layer`` (no transitions)."""
    shape = problem.model.model_copy(update={"moe_layers": 1})
    current = None
    if problem.current is not None:
        current = Placement.from_table(
            problem.current.table[layer : layer + 1], shape, problem.cluster.size, "current"
        )
    return Problem(
        shape,
        problem.cluster,
        problem.slots_per_gpu,
        problem.load[layer : layer + 1],
        samples=None if problem.samples is None else problem.samples[:, layer : layer + 1],
        current=current,
        weights=problem.weights,
    )


def _solve_layer(
    problem: Problem,
    options: SolveOptions,
    layer: int,
    hint_row: IntArray,
    budget_s: float,
    workers: int,
    deterministic: bool,
    dispatch: Dispatch,
) -> _LayerResult:
    """One layer: the even-split pipeline, then (``dispatch="speed-aware"``) the speed-aware
    polish and the choice by the exact best-split objective."""
    if dispatch != "speed-aware":
        return _solve_layer_even(
            problem, options, layer, hint_row, budget_s, workers, deterministic
        )
    start = time.monotonic()
    even = _solve_layer_even(
        problem, options, layer, hint_row, (1 - _FLEX_SHARE) * budget_s, workers, deterministic
    )
    sub = _layer_problem(problem, layer)
    candidates = [hint_row, even.row]
    if not problem.cluster.has_curves:
        loads = scenarios(problem)[:, layer, :]
        deadline = math.inf if deterministic else start + budget_s
        S = problem.slots_per_gpu
        moves = 4 * hint_row.size
        if deterministic:  # a flex move scores about 2 G candidates per sample and slot
            unit = SWAP_S_PER_UNIT * 2 * problem.cluster.size * S * hint_row.size * len(loads)
            moves = max(5, min(moves, int(_FLEX_SHARE * budget_s / unit)))
        speeds = problem.cluster.speeds
        flex = flex_polish(loads, even.row, speeds, S, deadline, moves, _stopped(options))
        candidates.append(flex)
    objs = [
        float(layer_objective(r[None, :], sub, options.hedge, "speed-aware")[0]) for r in candidates
    ]
    pick = int(np.argmin(objs))  # first of equals: greedy's row is kept unless beaten
    bound = min(float(hedged_fluid(sub, options.hedge)[0]), objs[pick])
    return _LayerResult(candidates[pick], bound, objs[pick] <= bound * (1 + GAP_LIMIT), pick > 0)


def _solve_layer_even(
    problem: Problem,
    options: SolveOptions,
    layer: int,
    hint_row: IntArray,
    budget_s: float,
    workers: int,
    deterministic: bool,
) -> _LayerResult:
    """Polish the warm start, then CP-SAT on the layer; ``budget_s`` seconds in all.

    ``deterministic``: the local search is bounded by a move count and the decision to build
    the CP-SAT model by a cost model, so that wall-clock time never changes the answer."""
    start = time.monotonic()
    E, G, S = problem.model.experts, problem.cluster.size, problem.slots_per_gpu
    loads = scenarios(problem)[:, layer, :]  # [K, E]
    K = loads.shape[0]
    hedge = options.hedge
    sub = _layer_problem(problem, layer)
    current = problem.current.table[layer] if problem.current is not None else None
    fluid = float(hedged_fluid(sub, hedge)[0])
    greedy_obj = float(layer_objective(hint_row[None, :], sub, hedge)[0])
    row = polish(
        loads,
        hint_row,
        problem.cluster,
        S,
        hedge,
        current,
        problem.weights.migration,
        deadline=math.inf if deterministic else start + _POLISH_SHARE * budget_s,
        work_s=_POLISH_SHARE * budget_s if deterministic else math.inf,
        stopped=_stopped(options),
    )
    obj = float(layer_objective(row[None, :], sub, hedge)[0])
    if obj > greedy_obj:  # cannot happen (the search only accepts improvements); be safe
        row, obj = hint_row.copy(), greedy_obj
    improved = obj < greedy_obj - 1e-9 * max(greedy_obj, 1.0)
    if obj <= fluid * (1.0 + GAP_LIMIT):  # provably optimal already
        return _LayerResult(row, min(fluid, obj), True, improved)
    if stop_requested(options.stop):
        return _LayerResult(row, min(fluid, obj), False, improved)
    # CP-SAT, if the model can be built and searched in what is left of the budget
    cands = _count_candidates(problem, loads, row)
    # its bound holds for the placement problem only if no replica count was ruled out
    every_count = [list(range(1, most_copies(E, G, G * S) + 1))] * E
    exact_counts = cands == every_count
    # the cost model counts every expert at the widest candidate set (how it was calibrated)
    variables = G * E * max(len(c) for c in cands)
    terms = K * variables
    if deterministic:  # by the cost model only, never by the clock
        left = (1 - _POLISH_SHARE) * budget_s
        build = variables * _BUILD_S_PER_VAR + terms * _BUILD_S_PER_TERM_DET
        if problem.cluster.has_curves:
            build += K * G * _BUILD_S_PER_CURVE
        if build > 0.5 * left:
            return _LayerResult(row, min(fluid, obj), False, improved)
        left -= build
    else:
        left = budget_s - (time.monotonic() - start)
        if terms * _BUILD_S_PER_TERM > 0.5 * left:
            return _LayerResult(row, min(fluid, obj), False, improved)
    scale = layer_scale(problem, loads)
    m = cp_model.CpModel()
    v = add_layer(m, problem, loads, row, current, scale, hedge, cands)
    if hedge == "robust":
        t = m.new_int_var(0, v.straggler_max, "")
        for tk in v.straggler:
            m.add(t >= tk)
        m.minimize(cp_model.LinearExpr.sum([t, *v.objective_terms]))
        div = float(scale)
    else:
        m.minimize(cp_model.LinearExpr.sum([*v.straggler, *v.objective_terms]))
        div = float(scale * K)
    if deterministic:  # deterministic time runs slower than the wall clock on a busy machine
        left *= _DET_PER_WALL_S
    else:
        left = budget_s - (time.monotonic() - start)
    solver = solver_params(options, max(left, _MIN_SOLVE_S), workers)
    status = run_search(solver, m, options.stop)
    bound = fluid
    optimal = False
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if exact_counts:  # a restricted model's bound is no bound on the problem
            # the integer model overstates times by at most its rounding
            bound = max(fluid, solver.best_objective_bound / div - v.rounding)
        cand = table_from_vars(solver, v, E, G, S)
        cand_obj = float(layer_objective(cand[None, :], sub, hedge)[0])
        if cand_obj < obj - 1e-9 * max(obj, 1.0):
            row, obj, improved = cand, cand_obj, True
        # optimal only as far as the exact objective and the sound bound say so
        optimal = obj <= bound * (1.0 + GAP_LIMIT)
    return _LayerResult(row, min(bound, obj), optimal, improved)


def _count_candidates(problem: Problem, loads: FloatArray, row: IntArray) -> list[list[int]]:
    """The replica counts CP-SAT may choose for one layer (``loads`` [K, E], ``row`` the
    polished warm start): every count where the model stays small, else counts near the
    proportional rule, else the warm start's."""
    E, G, S = problem.model.experts, problem.cluster.size, problem.slots_per_gpu
    P = G * S
    choice: CountChoice = "fixed"
    if E * G * most_copies(E, G, P) <= _ALL_COUNTS_MAX:
        choice = "all"
    elif E * G <= _FREE_COUNTS_MAX:
        choice = "near"
    counts = np.bincount(row, minlength=E)
    return replica_candidates(loads.mean(0), counts, P, G, choice)


def _solve_independent(
    problem: Problem, options: SolveOptions, hint: IntArray, t0: float, dispatch: Dispatch
) -> tuple[IntArray, float, str, dict[str, float]]:
    """Layers in a thread pool: ``threads // 2`` layers at a time (CP-SAT's search needs two
    workers for its large-neighbourhood search), each an even share of the time left."""
    L = problem.model.moe_layers
    threads = _threads(options)
    concurrent = max(1, min(threads // 2, L))
    workers = max(1, threads // concurrent)
    deadline = t0 + options.time_limit_s
    deterministic = threads == 1
    share = options.time_limit_s / L  # fixed, so that the clock never changes the answer
    lock = threading.Lock()
    started = [0]

    def run(layer: int) -> _LayerResult:
        if deterministic:  # fixed share, no wall-clock dependence
            return _solve_layer(problem, options, layer, hint[layer], share, 1, True, dispatch)
        with lock:
            waiting = L - started[0]  # layers not started yet, this one included
            started[0] += 1
        left = max(deadline - time.monotonic(), 0.0)
        budget = left * min(concurrent, waiting) / max(waiting, 1)
        return _solve_layer(problem, options, layer, hint[layer], budget, workers, False, dispatch)

    results: list[_LayerResult] = []
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        futures = [pool.submit(run, layer) for layer in range(L)]
        for done, fut in enumerate(futures, start=1):
            results.append(fut.result())
            if options.progress is not None:
                options.progress(done / L)
    S = problem.slots_per_gpu
    cur = problem.current.table if problem.current is not None else None
    table = np.stack(
        [_keep_slots(r.row, None if cur is None else cur[i], S) for i, r in enumerate(results)]
    )
    bound = float(sum(r.bound for r in results))
    status = "OPTIMAL" if all(r.optimal for r in results) else "FEASIBLE"
    details = {
        "layers_optimal": float(sum(r.optimal for r in results)),
        "layers_improved": float(sum(r.improved for r in results)),
        "concurrent_layers": float(concurrent),
        "workers_per_layer": float(workers),
    }
    return table, bound, status, details


def _solve_coupled(
    problem: Problem, options: SolveOptions, hint: IntArray, t0: float
) -> tuple[IntArray, float, str, dict[str, float]]:
    """One model over all layers, with co-location booleans for the heaviest transitions."""
    assert problem.transitions is not None
    L, E = problem.model.moe_layers, problem.model.experts
    G, S = problem.cluster.size, problem.slots_per_gpu
    hedge = options.hedge
    loads = scenarios(problem)  # [K, L, E]
    K = loads.shape[0]
    scale = layer_scale(problem, loads)
    m = cp_model.CpModel()
    layers: list[LayerVars] = []
    for layer in range(L):
        cur = problem.current.table[layer] if problem.current is not None else None
        warm = np.bincount(hint[layer], minlength=E)
        fixed = replica_candidates(loads[:, layer].mean(0), warm, G * S, G, "fixed")
        layers.append(add_layer(m, problem, loads[:, layer], hint[layer], cur, scale, hedge, fixed))
    counts = np.stack([np.bincount(hint[layer], minlength=E) for layer in range(L)])
    per = float(K) if hedge != "robust" else 1.0
    traffic_terms: list[cp_model.LinearExprT] = []
    hint_x = copy_matrix(hint, E, G)
    for layer in range(L - 1):
        tr = problem.transitions[layer] / np.outer(counts[layer], counts[layer + 1])
        order = np.argsort(-tr, axis=None)[:_MAX_PAIRS_PER_BOUNDARY]
        for flat in order:
            i, j = divmod(int(flat), E)
            if tr[i, j] <= 0:
                break
            coef = round(problem.weights.traffic * tr[i, j] * scale * per)
            if coef <= 0:
                continue
            for g in range(G):
                z = m.new_bool_var("")
                m.add_implication(z, layers[layer].c[(i, g, int(counts[layer, i]))])
                m.add_implication(z, layers[layer + 1].c[(j, g, int(counts[layer + 1, j]))])
                m.add_hint(z, bool(hint_x[layer, i, g] and hint_x[layer + 1, j, g]))
                traffic_terms.append(-coef * z)
    strag: list[cp_model.LinearExprT] = []
    for v in layers:
        if hedge == "robust":
            t = m.new_int_var(0, v.straggler_max, "")
            for tk in v.straggler:
                m.add(t >= tk)
            strag.append(t)
        else:
            strag.extend(v.straggler)
    extra = [t for v in layers for t in v.objective_terms]
    m.minimize(cp_model.LinearExpr.sum([*strag, *extra, *traffic_terms]))
    left = max(t0 + options.time_limit_s - time.monotonic(), 0.05)
    solver = solver_params(options, left, _threads(options))
    status = run_search(solver, m, options.stop)
    hint_obj = objective(hint, problem, hedge)
    bound = float(hedged_fluid(problem, hedge).sum())
    details: dict[str, float] = {"coupled": 1.0}
    if options.progress is not None:
        options.progress(1.0)
    # the model counts traffic only for the heaviest pairs: never claim optimality for it
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        table = np.stack([table_from_vars(solver, v, E, G, S) for v in layers])
        if problem.current is not None:
            table = np.stack(
                [_keep_slots(table[la], problem.current.table[la], S) for la in range(L)]
            )
        if objective(table, problem, hedge) < hint_obj:
            details["improved"] = 1.0
            return table, bound, "FEASIBLE", details
    return hint.copy(), bound, "FEASIBLE", details


@register("cpsat")
def solve_cpsat(problem: Problem, options: SolveOptions) -> Solution:
    """Solve ``problem`` with CP-SAT (see the module docstring for the model).

    ``options.dispatch``: ``"even"``, placements for engines that split an expert's tokens
    evenly over its copies; ``"speed-aware"``, for a dispatcher that splits each batch
    optimally over the copies; the objective is then the hedged best-split straggler time and
    the reported bound the fluid/copy bound."""
    from placement.solvers.greedy import greedy_table

    if options.hedge not in ("expected", "robust"):
        raise ValueError(f"hedge must be 'expected' or 'robust', got {options.hedge!r}")
    if options.dispatch not in DISPATCH_RULES:
        raise ValueError(f"dispatch must be one of {DISPATCH_RULES}, got {options.dispatch!r}")
    dispatch: Dispatch = "speed-aware" if options.dispatch == "speed-aware" else "even"
    t0 = time.monotonic()
    # greedy's own swap refinement is what polish does first; it is skipped where it would
    # cost seconds (latency curves, large instances), so that the polish gets the time
    K = scenarios(problem).shape[0]
    size = problem.model.moe_layers * problem.num_slots * K * problem.cluster.size
    refine = not (problem.cluster.has_curves and size > _REFINE_CURVES_MAX)
    hint = np.asarray(greedy_table(problem, refine=refine), dtype=np.int64)
    coupled = (
        problem.weights.traffic > 0
        and problem.transitions is not None
        and problem.model.moe_layers > 1
    )
    if coupled:
        table, bound, status, details = _solve_coupled(problem, options, hint, t0)
    else:
        table, bound, status, details = _solve_independent(problem, options, hint, t0, dispatch)
    obj = objective(table, problem, options.hedge, dispatch)
    hint_obj = objective(hint, problem, options.hedge, dispatch)
    if dispatch == "speed-aware":
        bound = min(bound, float(hedged_fluid(problem, options.hedge).sum()))
    if hint_obj < obj:  # never worse than the warm start
        table, obj = hint, hint_obj
    details["greedy_objective"] = hint_obj
    if stop_requested(options.stop):
        details["stopped"] = 1.0
    placement = Placement.from_table(
        table,
        problem.model,
        problem.cluster.size,
        "cpsat",
        hedge=options.hedge,
        dispatch=dispatch,
        seed=options.seed,
        time_limit_s=options.time_limit_s,
    )
    return Solution(
        placement=placement,
        objective=obj,
        bound=min(bound, obj),
        wall_s=time.monotonic() - t0,
        status="OPTIMAL" if status == "OPTIMAL" or obj <= bound * (1 + GAP_LIMIT) else status,
        details=details,
    )
