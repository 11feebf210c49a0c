"""The CP-SAT model of one layer (see :mod:`placement.solvers.cpsat` for the formulation),
the solver's parameters, and running it so that a stop request ends the search."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from ortools.sat.python import cp_model

from placement.evaluate import fluid_bound
from placement.model import FloatArray, IntArray
from placement.problem import Problem
from placement.solvers.base import SolveOptions, StopSignal, stop_requested

GAP_LIMIT = 1e-4  # relative gap at which CP-SAT stops and a layer counts as optimal
_TARGET_UNITS = 1e5  # integer units per layer fluid bound
_LOAD_UNITS = 1e7  # a GPU's load in integer units of at most about this (latency curves)
_MAX_UNITS_PER_TOKEN = 10_000
_SEARCH_GAP = 1e-5  # CP-SAT stops here: below GAP_LIMIT by more than the model's rounding
_STOP_POLL_S = 0.02  # how often a running search checks for a stop request


@dataclass
class LayerVars:
    """CP-SAT variables of one layer: c[(e, g, r)], y[(e, r)], the straggler term."""

    c: dict[tuple[int, int, int], cp_model.IntVar] = field(default_factory=dict)
    y: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    cands: list[list[int]] = field(default_factory=list)  # replica counts allowed per expert
    straggler: list[cp_model.IntVar] = field(default_factory=list)  # per sample T[k]
    straggler_max: int = 1  # upper bound of the T[k] domains
    objective_terms: list[cp_model.LinearExprT] = field(default_factory=list)
    # most the integer model overstates one sample's straggler time (problem time units):
    # the coefficients' rounding; its bound less this is a bound on the placement problem
    rounding: float = 0.0

    def x(self, e: int, g: int) -> cp_model.LinearExprT:
        return cp_model.LinearExpr.sum([self.c[(e, g, r)] for r in self.cands[e]])


# which replica counts the model may choose per expert: "fixed" (the warm start's), "near"
# (the warm start's and the floor/ceiling of the proportional rule) or "all" (1 ..
# min(G, 1 + redundant), the only choice under which CP-SAT's bound and OPTIMAL hold for the
# placement problem itself rather than for the restricted model)
CountChoice = Literal["fixed", "near", "all"]


def most_copies(E: int, G: int, P: int) -> int:
    """The most copies one expert can have: one per GPU, and every other expert needs a slot."""
    return min(G, P - E + 1)


def replica_candidates(
    w: FloatArray, hint_counts: IntArray, P: int, G: int, choice: CountChoice
) -> list[list[int]]:
    """Replica-count candidates per expert for ``choice`` (``w`` [E] is the mean load)."""
    E = w.shape[0]
    if choice == "fixed":
        return [[int(hint_counts[e])] for e in range(E)]
    if choice == "all":
        return [list(range(1, most_copies(E, G, P) + 1)) for _ in range(E)]
    total = float(w.sum())
    ideal = (w / total * P) if total > 0 else np.full(E, P / E)
    out = []
    for e in range(E):
        cand = {int(hint_counts[e]), math.floor(ideal[e]), math.ceil(ideal[e])}
        out.append(sorted({min(max(r, 1), G) for r in cand}))
    return out


def add_layer(
    m: cp_model.CpModel,
    problem: Problem,
    w: FloatArray,
    hint_row: IntArray,
    current_row: IntArray | None,
    scale: float,
    hedge: str,
    cands: list[list[int]],
) -> LayerVars:
    """Add one layer's variables and constraints; w is [K, E] (this layer's samples), ``cands``
    the replica counts each expert may get (:func:`replica_candidates`)."""
    K, E = w.shape
    G, S = problem.cluster.size, problem.slots_per_gpu
    P = G * S
    hint_counts = np.bincount(hint_row, minlength=E)
    hint_gpus = [set((np.nonzero(hint_row == e)[0] // S).tolist()) for e in range(E)]
    v = LayerVars()
    v.cands = cands

    for e in range(E):
        for r in v.cands[e]:
            yv = m.new_bool_var("")
            v.y[(e, r)] = yv
            m.add_hint(yv, r == hint_counts[e])
            for g in range(G):
                cv = m.new_bool_var("")
                v.c[(e, g, r)] = cv
                m.add_hint(cv, r == hint_counts[e] and g in hint_gpus[e])
            m.add(cp_model.LinearExpr.sum([v.c[(e, g, r)] for g in range(G)]) == r * yv)
        m.add_exactly_one(v.y[(e, r)] for r in v.cands[e])
        for g in range(G):
            if len(v.cands[e]) > 1:
                m.add_at_most_one(v.c[(e, g, r)] for r in v.cands[e])
    for g in range(G):
        m.add(cp_model.LinearExpr.sum([v.c[(e, g, r)] for e in range(E) for r in v.cands[e]]) == S)
    m.add(sum(r * v.y[(e, r)] for e in range(E) for r in v.cands[e]) == P)

    cluster = problem.cluster
    speeds = cluster.speeds
    hint_share = np.zeros((E, G))
    for e in range(E):
        for g in hint_gpus[e]:
            hint_share[e, g] = 1.0 / hint_counts[e]
    hint_loads = w @ hint_share  # [K, G]
    for k in range(K):
        hint_times = cluster.times(hint_loads[k])
        t_max = math.ceil(float(hint_times.max()) * scale * 4 + 10)
        tk = m.new_int_var(0, max(t_max, 1), "")
        v.straggler_max = max(v.straggler_max, t_max)
        v.straggler.append(tk)
        if not cluster.has_curves:
            keys = [(e, r) for e in range(E) for r in v.cands[e] if w[k, e] > 0]
            per_copy = np.array([w[k, e] / r for e, r in keys])
            for g in range(G):
                coefs = np.round(per_copy / speeds[g] * scale).astype(np.int64).tolist()
                expr = cp_model.LinearExpr.weighted_sum([v.c[(e, g, r)] for e, r in keys], coefs)
                m.add(tk >= expr)
            v.rounding = max(v.rounding, 0.5 * S / scale)  # S rounded coefficients per GPU
        else:
            for g in range(G):
                err = _add_curve_time(m, problem, g, w[k], v, tk, scale)
                v.rounding = max(v.rounding, err)
        m.add_hint(tk, round(float(hint_times.max()) * scale))
    if current_row is not None and problem.weights.migration > 0:
        cur = set(zip(current_row.tolist(), (np.arange(P) // S).tolist(), strict=True))
        moved = cp_model.LinearExpr.sum(
            [v.x(e, g) for e in range(E) for g in range(G) if (e, g) not in cur]
        )
        mig = round(problem.weights.migration * scale)
        v.objective_terms.append(mig * (K if hedge != "robust" else 1) * moved)
        v.rounding += 0.5 * P / scale  # at most P moved copies, each rounded
    return v


def _add_curve_time(
    m: cp_model.CpModel,
    problem: Problem,
    g: int,
    wk: FloatArray,
    v: LayerVars,
    tk: cp_model.IntVar,
    scale: float,
) -> float:
    """time_g >= curve_g(load_g), exact piecewise-linear with one boolean per segment and one
    for an idle GPU (time 0, as :meth:`LatencyCurve.time`).

    Load is in units of ``1 / per_token`` tokens (each copy's share rounded), time in units
    of ``1/scale`` µs. Returns the most this overstates the GPU's time (µs): the load's
    rounding times the curve's steepest slope, plus the rounded-up slope and offset."""
    curve = problem.cluster.gpus[g].curve
    assert curve is not None
    E = wk.shape[0]
    total = float(sum(wk[e] / min(v.cands[e]) for e in range(E)))
    per_token = min(max(math.floor(_LOAD_UNITS / max(total, 1.0)), 1), _MAX_UNITS_PER_TOKEN)
    terms = [
        (round(float(wk[e]) * per_token / r), v.c[(e, g, r)])
        for e in range(E)
        for r in v.cands[e]
        if wk[e] > 0
    ]
    max_load = sum(coef for coef, _ in terms)
    load = m.new_int_var(0, max(max_load, 1), "")
    m.add(load == sum(coef * var for coef, var in terms))
    xs = [0, *(t * per_token for t in curve.tokens)]
    ys = [curve.micros[0], *curve.micros]
    last_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])  # µs per load unit
    segs: list[tuple[int, int, float, float]] = []  # lo, hi, y_lo, slope
    for s in range(len(xs) - 1):
        lo, hi = xs[s], xs[s + 1]
        if lo > max_load:
            break
        slope = (ys[s + 1] - ys[s]) / (hi - lo) if s > 0 else 0.0
        segs.append((lo, hi, ys[s], slope))
    if xs[-1] < max_load:
        segs.append((xs[-1], max_load, ys[-1], last_slope))
    q = max(1000, max_load)  # so that rounding the slopes up costs at most one time unit
    idle = m.new_bool_var("")
    m.add(load == 0).only_enforce_if(idle)
    bools = [idle]
    for lo, hi, y_lo, slope in segs:
        b = m.new_bool_var("")
        bools.append(b)
        m.add(load >= lo).only_enforce_if(b)
        m.add(load <= hi).only_enforce_if(b)
        # q * t >= q*scale*(y_lo + slope*(load - lo)), coefficients rounded up (safe side)
        p = math.ceil(slope * scale * q)
        const = math.ceil(q * scale * y_lo - p * lo)
        m.add(q * tk >= p * load + const).only_enforce_if(b)
    m.add_exactly_one(bools)
    steepest = max((abs(sl) for *_, sl in segs), default=0.0)
    copies = problem.slots_per_gpu
    return float(steepest * 0.5 * copies + (max_load + 2) / (q * scale) + 1 / scale)


def solver_params(options: SolveOptions, time_s: float, workers: int) -> cp_model.CpSolver:
    """CP-SAT parameters. One worker: deterministic (the deterministic-time limit stops it;
    the wall-clock cap is a safety net at 10x + 1 s). More workers: CP-SAT's parallel portfolio with
    large-neighbourhood search, stopped by the wall clock (not reproducible run to run)."""
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.max_deterministic_time = max(time_s, 0.01)
    p.max_time_in_seconds = max(time_s, 0.01) * (10.0 if workers <= 1 else 1.0) + (
        1.0 if workers <= 1 else 0.0
    )
    p.num_workers = max(workers, 1)
    p.interleave_search = False
    p.random_seed = options.seed
    p.relative_gap_limit = _SEARCH_GAP
    p.log_search_progress = False
    return solver


def layer_scale(problem: Problem, loads: FloatArray) -> float:
    """Integer units per time unit so that a layer's fluid bound is about 1e5 units."""
    f = float(np.max(fluid_bound(problem.cluster, loads)))
    return _TARGET_UNITS / f if f > 0 else 1.0


def table_from_vars(solver: cp_model.CpSolver, v: LayerVars, E: int, G: int, S: int) -> IntArray:
    """[P] slot row from a solved layer."""
    row = np.empty(G * S, dtype=np.int64)
    fill = [0] * G
    for e in range(E):
        for g in range(G):
            if any(solver.value(v.c[(e, g, r)]) for r in v.cands[e]):
                row[g * S + fill[g]] = e
                fill[g] += 1
    return row


def run_search(
    solver: cp_model.CpSolver, model: cp_model.CpModel, stop: StopSignal | None
) -> cp_model.CpSolverStatus:
    """``solver.solve(model)``; a watcher thread ends the search (``stop_search``, the best
    solution found so far is kept) as soon as ``stop`` asks for it."""
    if stop is None:
        return solver.solve(model)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_STOP_POLL_S):
            if stop_requested(stop):
                solver.stop_search()
                return

    watcher = threading.Thread(target=watch, name="cpsat-stop", daemon=True)
    watcher.start()
    try:
        return solver.solve(model)
    finally:
        done.set()
        watcher.join()
