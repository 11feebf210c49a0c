"""``cpsat``: expert placement with OR-Tools CP-SAT (the product solver).

Notation: L layers, E experts, G GPUs, S slots per GPU, P = G * S slots, K load samples.

The model, per MoE layer (layers are coupled only by the traffic term, see below):

Variables
    ``y[e, r]`` (bool): expert ``e`` gets ``r`` copies, for ``r`` in a small candidate set
    ``R_e`` (at most 3 values: greedy's count and the floor/ceiling of the proportional rule
    ``r*_e = P * w_e / sum(w)``, clipped to 1..G). Exactly one ``y[e, r]`` per expert.
    ``c[e, g, r]`` (bool): ``e`` has ``r`` copies and one of them is on GPU ``g``.
    ``x[e, g] = sum_r c[e, g, r]`` is the copy indicator of the task statement.

Constraints
    ``sum_r y[e, r] == 1`` (every expert has >= 1 copy since every candidate r >= 1);
    ``sum_g c[e, g, r] == r * y[e, r]`` (the copies exist);
    ``sum_r c[e, g, r] <= 1`` (at most one copy of an expert per GPU);
    ``sum_{e, r} c[e, g, r] == S`` (exact slot count per GPU).

GPU load (even-split dispatch, what vLLM and SGLang do)
    ``load[k, g] = sum_{e, r} c[e, g, r] * w[k, e] / r``. The non-linear ``w / r_e`` is
    linearised by the (e, r) booleans: each ``c[e, g, r]`` carries the constant per-copy load
    ``w[k, e] / r``, integer-scaled.

GPU time
    Speed factors: ``time[k, g] = load[k, g] / speed_g`` (linear, coefficients
    ``round(scale * w[k, e] / (r * speed_g))``).
    Latency curves: exact piecewise-linear, one boolean per curve segment (the segment
    ``[t_s, t_{s+1}]`` that contains the load, the first one from 0 and the last one extended
    past the last sample) with ``time >= curve_s(load)`` enforced only for the chosen segment
    (``OnlyEnforceIf``). Exact for non-convex, non-monotone curves; no convex hull.

Objective (integer; one unit = ``1 / scale`` of the problem's time unit, i.e. of a token-time
with speed factors or of a µs with curves; ``scale`` is chosen so that the fluid bound of a
layer is about 10^5 units)
    ``sum_layers hedge_k(max_g time[k, g])``: per-sample maximum variables ``T[k] >= time[k, g]``,
    hedged over the K samples (``problem.samples``; the mean ``problem.load`` when none):
    ``hedge="expected"`` minimises the mean of the per-sample maxima, ``"robust"`` the
    maximum over samples (``T >= T[k]``);
    ``+ weights.migration * #(copies (e, g) not in problem.current)``;
    ``+ weights.traffic * tokens that change GPU between consecutive layers`` (MoETuner):
    with even split a token with expert i in layer l and j in l+1 stays on its GPU with
    probability ``sum_g x_l[i, g] x_{l+1}[j, g] / (r_i r_j)``. Only the heaviest transition
    pairs get co-location booleans ``z[i, j, g] <= x_l[i, g], z <= x_{l+1}[j, g]``; in this
    coupled mode the replica counts are fixed to the warm start's, so ``1 / (r_i r_j)`` is a
    constant.

Solving, per layer (without traffic coupling: ``weights.traffic == 0`` or no transitions)
    1. Warm start :func:`placement.solvers.greedy.greedy_table` (its own swap refinement is
       skipped on large latency-curve problems, where it costs seconds).
    2. Local search on the exact float objective (40% of the layer's budget): best-improvement
       swaps of two copies touching a bottleneck GPU, then relocations of a redundant copy to
       another expert (changes replica counts); plateaus are crossed by a sum-of-squares
       tie-break.
    3. CP-SAT on the model above, hinted (``add_hint``) with the polished row, for the rest
       of the budget; stops at a relative gap of 1e-4. Skipped when the polished row already
       meets the lower bound, or when building the model would not fit in the budget.
    The layer keeps the best of greedy's, the polished and CP-SAT's row under the exact (float)
    objective, so ``cpsat`` is never worse than its greedy warm start.
    Layers run in a thread pool, ``threads // 2`` at a time with two CP-SAT workers each
    (``threads`` = ``options.threads``, 0 = all cores; one worker for ``threads == 1``); each
    layer gets an even share of the time still left, so layers that finish early leave time
    to the rest. ``progress`` is called after each layer.
    Reported bound: per layer the largest of CP-SAT's bound, the fluid bound and the copy
    bound (the heaviest expert has at most ``min(G, 1 + redundant)`` copies; without
    redundancy its GPU also holds the S - 1 lightest experts), summed over layers; traffic and
    migration terms count 0 in it. With traffic coupling, one model holds all layers (replica
    counts fixed to greedy's, no local search) and gets the whole budget.

Dispatch-aware mode (``SolveOptions(dispatch="best")``; the default is ``"even"``)
    For a speed-aware dispatcher that splits each batch's tokens optimally over an expert's
    copies, the layer time of a sample is ``max_H W(H) / speed(H)`` over GPU sets H, where
    ``W(H)`` is the work of the experts whose copies all lie in H (max-flow min-cut). After
    the even-split pipeline (75% of the budget), a swap local search minimises the hedged
    maximum of that expression over single GPUs and pairs of GPUs (speed factors only), and
    the layer keeps whichever of greedy's, the even-split and this row has the least exact
    best-split time (:func:`placement.dispatch.best_split`) over the samples. Reported bound:
    the fluid/copy bound (valid for any dispatch).

Determinism
    ``threads == 1``: deterministic for a seed and time limit. Every layer gets the fixed
    share ``time_limit_s / L``; the local search is bounded by a cost model of its moves, and
    CP-SAT is built only when a cost model of the build fits the share, then runs one worker
    with ``random_seed = options.seed``, stopped by its deterministic time limit (half a unit
    per second of share; the wall-clock cap, 10x + 1 s, is a safety net). Nothing reads the
    clock, so the answer is reproducible; the price is that the wall time can overrun the
    limit by the warm start's time and the cost models' errors (measured: DeepSeek-V2-Lite on
    32 GPUs, 1 s limit: 0.4 s with speed factors, 2.2 s with latency curves).
    ``threads > 1``: CP-SAT's parallel portfolio (with large-neighbourhood search, which is
    what finds improvements in short budgets; ``interleave_search`` was tried and is much
    weaker) and the local search are stopped by the wall clock: results can differ from run
    to run, never to worse than the greedy start.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from placement.model import Cluster, FloatArray, IntArray, Placement
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions, register

_TARGET_UNITS = 1e5  # integer units per layer fluid bound
_GAP_LIMIT = 1e-4
_MAX_PAIRS_PER_BOUNDARY = 64
_POLISH_SHARE = 0.4  # of a layer's budget for the local search before CP-SAT
_FREE_COUNTS_MAX = 20000  # E * G up to which CP-SAT may change replica counts
_BUILD_S_PER_TERM = 2e-6  # rough cost of building the CP-SAT model, seconds per term
_MIN_SOLVE_S = 0.05
# cost model of the local search (deterministic mode): seconds per swap, per S * P * K, and
# per relocation, per candidate x K x G (measured on the benchmark machine, rounded up)
_SWAP_S_PER_UNIT = 2.5e-7
_BUILD_S_PER_VAR = 6e-6  # CP-SAT model building (deterministic mode): per boolean c[e, g, r]
_BUILD_S_PER_TERM_DET = 5e-7  # ... and per linear term
_BUILD_S_PER_CURVE = 3e-3  # ... and per (sample, GPU) latency-curve block
_DET_PER_WALL_S = 0.5  # deterministic-time units given per wall second of budget
_RELOCATE_S_PER_UNIT = 5e-8
_FLEX_SHARE = 0.25  # of a layer's budget for the dispatcher-aware polish (dispatch="best")
_REFINE_CURVES_MAX = 100_000  # L * P * K * G above which greedy's refinement is skipped


# --------------------------------------------------------------------------------------------
# Exact (float) objective of a table, shared by the solver and the tests
# --------------------------------------------------------------------------------------------


def scenarios(problem: Problem) -> FloatArray:
    """[K, L, E] the load samples the objective hedges over (``[load]`` when none)."""
    if problem.samples is not None and problem.samples.shape[0] > 0:
        return np.asarray(problem.samples, dtype=np.float64)
    return np.asarray(problem.load[None, :, :], dtype=np.float64)


def copy_matrix(table: IntArray, experts: int, num_gpus: int) -> IntArray:
    """[L, E, G] copy indicators x[l, e, g] of a [L, P] slot table."""
    L, P = table.shape
    S = P // num_gpus
    x = np.zeros((L, experts, num_gpus), dtype=np.int64)
    gpu = np.arange(P) // S
    for layer in range(L):
        x[layer, table[layer], gpu] = 1
    return x


def even_straggler(table: IntArray, problem: Problem, loads: FloatArray) -> FloatArray:
    """[K, L] slowest GPU's time per sample and layer, tokens split evenly over copies.

    ``loads`` is [K, L, E]."""
    x = copy_matrix(table, problem.model.experts, problem.cluster.size).astype(np.float64)
    r = np.maximum(x.sum(axis=2), 1.0)  # [L, E]
    share = x / r[:, :, None]  # [L, E, G]
    gpu_load = np.einsum("kle,leg->klg", loads, share)
    return np.asarray(problem.cluster.times(gpu_load).max(axis=2), dtype=np.float64)


def traffic_tokens(table: IntArray, problem: Problem) -> FloatArray:
    """[L-1] tokens that change GPU between layer l and l+1 (even split); zeros if no
    transitions."""
    L = problem.model.moe_layers
    if problem.transitions is None or L < 2:
        return np.zeros(max(L - 1, 0), dtype=np.float64)
    x = copy_matrix(table, problem.model.experts, problem.cluster.size).astype(np.float64)
    share = x / np.maximum(x.sum(axis=2, keepdims=True), 1.0)
    trans = problem.transitions
    stay = np.einsum("lij,lig,ljg->l", trans, share[:-1], share[1:])
    return np.asarray(trans.sum(axis=(1, 2)) - stay, dtype=np.float64)


def moved_copies(table: IntArray, problem: Problem) -> IntArray:
    """[L] copies (e, g) present in ``table`` but not in ``problem.current`` (zeros if none)."""
    L = problem.model.moe_layers
    if problem.current is None:
        return np.zeros(L, dtype=np.int64)
    E, G = problem.model.experts, problem.cluster.size
    new = copy_matrix(table, E, G)
    old = copy_matrix(problem.current.table, E, G)
    return np.asarray(((new == 1) & (old == 0)).sum(axis=(1, 2)), dtype=np.int64)


def best_straggler(table: IntArray, problem: Problem, loads: FloatArray) -> FloatArray:
    """[K, L] slowest GPU's time per sample and layer with the best split over copies
    (:func:`placement.dispatch.best_split`). ``loads`` is [K, L, E]."""
    from placement.dispatch import TimeModel, best_split

    model = TimeModel(problem.cluster)
    K, L = loads.shape[:2]
    out = np.empty((K, L))
    for k in range(K):
        for layer in range(L):
            split = best_split(table[layer], loads[k, layer], model, problem.slots_per_gpu)
            out[k, layer] = split.time
    return out


def layer_objective(
    table: IntArray, problem: Problem, hedge: str, dispatch: str = "even"
) -> FloatArray:
    """[L] per-layer objective: hedged straggler time (under ``dispatch``) + migration term
    (no traffic)."""
    loads = scenarios(problem)
    strag = (
        best_straggler(table, problem, loads)
        if dispatch == "best"
        else even_straggler(table, problem, loads)
    )
    hedged = strag.max(axis=0) if hedge == "robust" else strag.mean(axis=0)
    return np.asarray(hedged + problem.weights.migration * moved_copies(table, problem))


def objective(
    table: IntArray, problem: Problem, hedge: str = "expected", dispatch: str = "even"
) -> float:
    """The cpsat objective of a [L, P] table in the problem's time unit (traffic counted as
    under even split)."""
    total = float(layer_objective(table, problem, hedge, dispatch).sum())
    if problem.weights.traffic > 0:
        total += problem.weights.traffic * float(traffic_tokens(table, problem).sum())
    return total


def _fluid(cluster: Cluster, loads: FloatArray) -> FloatArray:
    """[...] fluid lower bound on the straggler time for loads [..., E]."""
    from placement.evaluate import fluid_bound

    return np.asarray(fluid_bound(cluster, loads), dtype=np.float64)


def _hedged_fluid(problem: Problem, hedge: str) -> FloatArray:
    """[L] lower bound on the hedged straggler term of each layer, valid for every placement:
    per sample the larger of the fluid bound and the copy bound (the heaviest expert has at
    most ``min(G, 1 + redundant)`` copies, so one copy carries at least its load over that,
    on the fastest GPU's monotone hull)."""
    from placement.evaluate import replica_bound

    loads = scenarios(problem)  # [K, L, E]
    f = _fluid(problem.cluster, loads)  # [K, L]
    most = min(problem.cluster.size, 1 + problem.redundant)
    counts = np.full(loads.shape[1:], most, dtype=np.int64)
    f = np.maximum(f, replica_bound(problem.cluster, loads, counts))
    S = problem.slots_per_gpu
    if problem.redundant == 0 and S > 1:
        # one copy each: the GPU of the heaviest expert also holds S - 1 others, at least the
        # S - 1 lightest ones
        srt = np.sort(loads, axis=-1)
        least = srt[..., -1:] + srt[..., : S - 1].sum(-1, keepdims=True)  # [K, L, 1]
        f = np.maximum(
            f, replica_bound(problem.cluster, least, np.ones((loads.shape[1], 1), dtype=np.int64))
        )
    return np.asarray(f.max(axis=0) if hedge == "robust" else f.mean(axis=0))


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


@dataclass
class _LayerVars:
    """CP-SAT variables of one layer: c[(e, g, r)], y[(e, r)], the straggler term."""

    c: dict[tuple[int, int, int], cp_model.IntVar] = field(default_factory=dict)
    y: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    cands: list[list[int]] = field(default_factory=list)
    straggler: list[cp_model.IntVar] = field(default_factory=list)  # per sample T[k]
    straggler_max: int = 1  # upper bound of the T[k] domains
    objective_terms: list[cp_model.LinearExprT] = field(default_factory=list)

    def x(self, e: int, g: int) -> cp_model.LinearExprT:
        return cp_model.LinearExpr.sum([self.c[(e, g, r)] for r in self.cands[e]])


def _candidates(
    w: FloatArray, hint_counts: IntArray, P: int, G: int, free: bool
) -> list[list[int]]:
    """Replica-count candidates per expert: greedy's, and floor/ceil of the proportional rule."""
    E = w.shape[0]
    if not free:
        return [[int(hint_counts[e])] for e in range(E)]
    total = float(w.sum())
    ideal = (w / total * P) if total > 0 else np.full(E, P / E)
    out = []
    for e in range(E):
        cand = {int(hint_counts[e]), math.floor(ideal[e]), math.ceil(ideal[e])}
        out.append(sorted({min(max(r, 1), G) for r in cand}))
    return out


def _add_layer(
    m: cp_model.CpModel,
    problem: Problem,
    w: FloatArray,
    hint_row: IntArray,
    current_row: IntArray | None,
    scale: float,
    hedge: str,
    free_counts: bool,
) -> _LayerVars:
    """Add one layer's variables and constraints; w is [K, E] (this layer's samples)."""
    K, E = w.shape
    G, S = problem.cluster.size, problem.slots_per_gpu
    P = G * S
    hint_counts = np.bincount(hint_row, minlength=E)
    hint_gpus = [set((np.nonzero(hint_row == e)[0] // S).tolist()) for e in range(E)]
    v = _LayerVars()
    v.cands = _candidates(w.mean(axis=0), hint_counts, P, G, free_counts)

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
        else:
            for g in range(G):
                _add_curve_time(m, problem, g, w[k], v, tk, scale, t_max)
        m.add_hint(tk, round(float(hint_times.max()) * scale))
    if current_row is not None and problem.weights.migration > 0:
        cur = set(zip(current_row.tolist(), (np.arange(P) // S).tolist(), strict=True))
        moved = cp_model.LinearExpr.sum(
            [v.x(e, g) for e in range(E) for g in range(G) if (e, g) not in cur]
        )
        mig = round(problem.weights.migration * scale)
        v.objective_terms.append(mig * (K if hedge != "robust" else 1) * moved)
    return v


def _add_curve_time(
    m: cp_model.CpModel,
    problem: Problem,
    g: int,
    wk: FloatArray,
    v: _LayerVars,
    tk: cp_model.IntVar,
    scale: float,
    t_max: int,
) -> None:
    """time_g >= curve_g(load_g), exact piecewise-linear with one boolean per segment.

    Load is in tokens (integer-rounded per copy), time in units of ``1/scale`` µs."""
    curve = problem.cluster.gpus[g].curve
    assert curve is not None
    E = wk.shape[0]
    terms = [(round(wk[e] / r), v.c[(e, g, r)]) for e in range(E) for r in v.cands[e] if wk[e] > 0]
    max_load = sum(coef for coef, _ in terms)
    load = m.new_int_var(0, max(max_load, 1), "")
    m.add(load == sum(coef * var for coef, var in terms))
    xs = [0, *curve.tokens]
    ys = [curve.micros[0], *curve.micros]
    last_slope = (curve.micros[-1] - curve.micros[-2]) / (curve.tokens[-1] - curve.tokens[-2])
    segs: list[tuple[int, int, float, float]] = []  # lo, hi, y_lo, slope
    for s in range(len(xs) - 1):
        lo, hi = xs[s], xs[s + 1]
        if lo > max_load:
            break
        slope = (ys[s + 1] - ys[s]) / (hi - lo) if s > 0 else 0.0
        segs.append((lo, hi, ys[s], slope))
    if xs[-1] < max_load:
        segs.append((xs[-1], max_load, ys[-1], last_slope))
    q = 1000
    bools = []
    for lo, hi, y_lo, slope in segs:
        b = m.new_bool_var("")
        bools.append(b)
        m.add(load >= lo).only_enforce_if(b)
        m.add(load <= hi).only_enforce_if(b)
        # q * t >= q*scale*(y_lo + slope*(load - lo)), coefficients rounded up (safe side)
        p = math.ceil(slope * scale * q)
        const = math.ceil(q * scale * y_lo) - p * lo
        m.add(q * tk >= p * load + const).only_enforce_if(b)
    m.add_exactly_one(bools)
    del t_max


# --------------------------------------------------------------------------------------------
# Local search (polishes the warm start before CP-SAT)
# --------------------------------------------------------------------------------------------


def _polish(
    w: FloatArray,
    row: IntArray,
    cluster: Cluster,
    S: int,
    hedge: str,
    current_row: IntArray | None,
    migration: float,
    deadline: float = math.inf,
    relocate: bool = True,
    max_moves: int | None = None,
    work_s: float = math.inf,
) -> IntArray:
    """Local search on one layer's [P] slot row; ``w`` is [K, E] (this layer's samples).

    Two neighbourhoods, best improvement, until ``deadline`` (``time.monotonic()``),
    ``max_moves`` moves (default 20 P) or ``work_s`` seconds of estimated work (a fixed cost
    model per move, so that the bound is deterministic):
    swaps of two copies on different GPUs (among swaps that touch a GPU that is the slowest
    in some sample), and, when no swap helps, relocations (a redundant copy of one expert
    becomes a copy of another expert, which changes both experts' per-copy loads). A move is
    taken when it lowers (hedged straggler time + migration term, sum of squared GPU times)
    lexicographically, so plateaus are crossed and the search terminates."""
    state = _LocalState(w, row, cluster, S, hedge, current_row, migration)
    moves = 0
    limit = max_moves if max_moves is not None else 20 * row.size
    K, E = w.shape
    G = row.size // S
    spent = 0.0  # estimated seconds by the cost model (deterministic, unlike the clock)

    def go_on() -> bool:
        return time.monotonic() < deadline and moves < limit and spent < work_s

    while go_on():
        while go_on() and state.best_swap():
            moves += 1
            spent += _SWAP_S_PER_UNIT * S * row.size * K
        if not relocate or not go_on():
            break
        candidates = int((state.counts[state.row] >= 2).sum()) * E
        spent += _RELOCATE_S_PER_UNIT * candidates * K * G
        if not state.best_relocation():
            break
        moves += 1
    return state.row


class _LocalState:
    """Incremental state of :func:`_polish`: slot row, copy counts, per-GPU loads and times."""

    def __init__(
        self,
        w: FloatArray,
        row: IntArray,
        cluster: Cluster,
        S: int,
        hedge: str,
        current_row: IntArray | None,
        migration: float,
    ) -> None:
        self.w, self.cluster, self.S, self.hedge = w, cluster, S, hedge
        self.K, self.E = w.shape
        self.P = row.size
        self.G = self.P // S
        self.row = row.copy()
        self.gpu_of = np.arange(self.P) // S
        cur = np.zeros((self.E, self.G), dtype=bool)
        if current_row is not None:
            cur[current_row, self.gpu_of] = True
        self.notcur = (~cur).astype(np.float64) * migration  # cost of holding (e, g)
        self._refresh()

    def _refresh(self) -> None:
        self.counts = np.bincount(self.row, minlength=self.E).astype(np.float64)
        self.per_copy = self.w / np.maximum(self.counts, 1.0)  # [K, E]
        self.held = np.zeros((self.E, self.G), dtype=bool)
        self.held[self.row, self.gpu_of] = True
        self.loads = self.per_copy[:, self.row].reshape(self.K, self.G, self.S).sum(-1)
        self.times = self.cluster.times(self.loads)

    def _hedge(self, per_sample_max: FloatArray, axis: int) -> FloatArray:
        if self.hedge == "robust":
            return np.asarray(per_sample_max.max(axis), dtype=np.float64)
        return np.asarray(per_sample_max.mean(axis), dtype=np.float64)

    def best_swap(self) -> bool:
        """Apply the best improving swap; False if there is none."""
        K, P, _G = self.K, self.P, self.G
        times, row, gpu_of, held = self.times, self.row, self.gpu_of, self.held
        padded = np.concatenate([times, np.full((K, 3), -np.inf)], axis=1)
        order = np.argsort(-padded, axis=1)[:, :3]  # [K, 3] (index >= G: padding)
        top_v = np.take_along_axis(padded, order, axis=1)
        bottleneck = np.unique(order[:, 0])
        a = np.nonzero(np.isin(gpu_of, bottleneck))[0]  # slots on bottleneck GPUs
        aa, bb = (m.ravel() for m in np.meshgrid(a, np.arange(P), indexing="ij"))
        ga, gb = gpu_of[aa], gpu_of[bb]
        ea, eb = row[aa], row[bb]
        ok = (ga != gb) & (ea != eb) & ~held[ea, gb] & ~held[eb, ga]
        aa, bb, ga, gb, ea, eb = aa[ok], bb[ok], ga[ok], gb[ok], ea[ok], eb[ok]
        if aa.size == 0:
            return False
        d = self.per_copy[:, eb] - self.per_copy[:, ea]  # [K, N] load change on ga
        ta = _time_at(self.cluster, self.loads[:, ga] + d, ga)
        tb = _time_at(self.cluster, self.loads[:, gb] - d, gb)
        # slowest time among the other GPUs, per sample and candidate, from the top three
        hit1 = (order[:, 0][:, None] == ga) | (order[:, 0][:, None] == gb)  # [K, N]
        hit2 = (order[:, 1][:, None] == ga) | (order[:, 1][:, None] == gb)
        rest = np.where(hit1, np.where(hit2, top_v[:, 2:3], top_v[:, 1:2]), top_v[:, 0:1])
        strag = self._hedge(np.maximum(rest, np.maximum(ta, tb)), 0)
        nc = self.notcur
        strag = strag + (nc[ea, gb] + nc[eb, ga] - nc[ea, ga] - nc[eb, gb])
        base = float(self._hedge(top_v[:, 0], 0))
        dsq = ((ta**2 + tb**2) - (times[:, ga] ** 2 + times[:, gb] ** 2)).sum(0)
        best = _pick(strag, dsq, base)
        if best < 0:
            return False
        i, j = int(aa[best]), int(bb[best])
        gi, gj, ei, ej = int(ga[best]), int(gb[best]), int(ea[best]), int(eb[best])
        row[i], row[j] = ej, ei
        held[ei, gi] = held[ej, gj] = False
        held[ei, gj] = held[ej, gi] = True
        self.loads[:, gi] += d[:, best]
        self.loads[:, gj] -= d[:, best]
        times[:, gi] = self.cluster.gpus[gi].time(self.loads[:, gi])
        times[:, gj] = self.cluster.gpus[gj].time(self.loads[:, gj])
        return True

    def best_relocation(self) -> bool:
        """Apply the best improving relocation of a redundant copy; False if there is none."""
        K, E, G = self.K, self.E, self.G
        slots = np.nonzero(self.counts[self.row] >= 2)[0]
        if slots.size == 0:
            return False
        ss, bb = (m.ravel() for m in np.meshgrid(slots, np.arange(E), indexing="ij"))
        gs, ea = self.gpu_of[ss], self.row[ss]
        ok = ~self.held[bb, gs] & (self.counts[bb] < G)
        ss, bb, gs, ea = ss[ok], bb[ok], gs[ok], ea[ok]
        if ss.size == 0:
            return False
        base = float(self._hedge(self.times.max(1), 0))
        base_sq = float((self.times**2).sum())
        best_val, best_sq, best_n = math.inf, math.inf, -1
        chunk = max(1, 2**21 // (K * G))
        ra, rb = self.counts[ea], self.counts[bb]
        for lo in range(0, ss.size, chunk):
            sl = slice(lo, lo + chunk)
            n = ss[sl].size
            wa, wb = self.w[:, ea[sl]].T, self.w[:, bb[sl]].T  # [n, K]
            on_g = np.zeros((n, G), dtype=bool)
            on_g[np.arange(n), gs[sl]] = True
            ha = self.held[ea[sl]] & ~on_g  # other GPUs holding a
            hb = self.held[bb[sl]]
            da = wa * (1.0 / (ra[sl] - 1) - 1.0 / ra[sl])[:, None]  # [n, K]
            db = wb * (1.0 / (rb[sl] + 1) - 1.0 / rb[sl])[:, None]
            dg = wb / (rb[sl] + 1)[:, None] - wa / ra[sl][:, None]
            delta = (
                ha[:, None, :] * da[:, :, None]
                + hb[:, None, :] * db[:, :, None]
                + on_g[:, None, :] * dg[:, :, None]
            )  # [n, K, G]
            t = self.cluster.times(self.loads[None] + delta)
            strag = self._hedge(t.max(2), 1)
            strag = strag + self.notcur[bb[sl], gs[sl]] - self.notcur[ea[sl], gs[sl]]
            sq = (t**2).sum((1, 2)) - base_sq
            k = _pick(strag, sq, base)
            if k >= 0 and (strag[k], sq[k]) < (best_val, best_sq):
                best_val, best_sq, best_n = float(strag[k]), float(sq[k]), lo + k
        if best_n < 0:
            return False
        self.row[ss[best_n]] = bb[best_n]
        self._refresh()
        return True


def _pick(value: FloatArray, dsq: FloatArray, base: float) -> int:
    """Index of the best candidate that lowers (value, dsq) against (base, 0), or -1."""
    tol = 1e-12 * max(abs(base), 1.0)
    better = (value < base - tol) | ((value <= base + tol) & (dsq < -tol * abs(base)))
    if not better.any():
        return -1
    cand = np.nonzero(better)[0]
    return int(cand[np.lexsort((dsq[cand], value[cand]))[0]])


def _flex_polish(
    w: FloatArray, row: IntArray, speeds: FloatArray, S: int, deadline: float, max_moves: int
) -> IntArray:
    """Swap local search for a speed-aware dispatcher (best split over copies), speed factors.

    With the best split, a layer's time for sample k is ``max_H W_k(H) / speed(H)`` over GPU
    sets H, where ``W_k(H)`` is the work of the experts whose copies all lie in H (max-flow
    min-cut). This search minimises the mean over samples of that maximum restricted to single
    GPUs and pairs of GPUs (and the fluid bound): one-copy experts pin work to their GPU, and
    two-copy experts to their pair. Copy counts stay fixed. ``w`` [K, E], ``row`` [P]."""
    K, E = w.shape
    P = row.size
    G = P // S
    row = row.copy()
    gpu_of = np.arange(P) // S
    counts = np.bincount(row, minlength=E)
    fluid = w.sum(1) / speeds.sum()  # [K]
    ssum = speeds[:, None] + speeds[None, :]
    off = ~np.eye(G, dtype=bool)

    def state() -> tuple[FloatArray, FloatArray, IntArray]:
        single = np.zeros((K, G))
        shared = np.zeros((K, G, G))
        partner = np.full(P, -1)  # GPU of the other copy of a two-copy expert
        for e in np.nonzero(counts == 1)[0]:
            g = gpu_of[row == e][0]
            single[:, g] += w[:, e]
        for e in np.nonzero(counts == 2)[0]:
            s1, s2 = np.nonzero(row == e)[0]
            g1, g2 = gpu_of[s1], gpu_of[s2]
            shared[:, g1, g2] += w[:, e]
            shared[:, g2, g1] += w[:, e]
            partner[s1], partner[s2] = g2, g1
        return single, shared, partner

    def value(single: FloatArray, shared: FloatArray) -> tuple[FloatArray, FloatArray]:
        one = single / speeds  # [K, G]
        two = np.where(off, (single[:, :, None] + single[:, None, :] + shared) / ssum, 0.0)
        per = np.maximum(np.maximum(one.max(1), two.max((1, 2))), fluid)
        return per, two

    single, shared, partner = state()
    for _ in range(max_moves):
        if time.monotonic() >= deadline:
            break
        per, two = value(single, shared)
        base = float(per.mean())
        # GPUs that set the maximum in some sample (single or pair)
        one = single / speeds
        hot: set[int] = set()
        for k in range(K):
            if one[k].max() >= two[k].max():
                hot.add(int(one[k].argmax()))
            else:
                g, h = np.unravel_index(int(two[k].argmax()), (G, G))
                hot.update((int(g), int(h)))
        a = np.nonzero(np.isin(gpu_of, list(hot)))[0]
        aa, bb = (m.ravel() for m in np.meshgrid(a, np.arange(P), indexing="ij"))
        ga, gb, ea, eb = gpu_of[aa], gpu_of[bb], row[aa], row[bb]
        held = np.zeros((E, G), dtype=bool)
        held[row, gpu_of] = True
        ok = (ga != gb) & (ea != eb) & ~held[ea, gb] & ~held[eb, ga]
        aa, bb, ga, gb, ea, eb = aa[ok], bb[ok], ga[ok], gb[ok], ea[ok], eb[ok]
        if aa.size == 0:
            break
        n = aa.size
        idx = np.arange(n)
        # pairs and singles untouched by the swap: best among those avoiding ga and gb
        iu, ju = np.triu_indices(G, 1)
        tv = two[:, iu, ju]  # [K, M]
        top = np.argsort(-tv, axis=1)[:, : 2 * G + 2]  # [K, T]
        tg, th, tval = iu[top], ju[top], np.take_along_axis(tv, top, axis=1)
        clear = (
            (tg[None] != ga[:, None, None])
            & (tg[None] != gb[:, None, None])
            & (th[None] != ga[:, None, None])
            & (th[None] != gb[:, None, None])
        )  # [n, K, T]
        rest_two = np.where(clear, tval[None], 0.0).max(2)  # [n, K]
        o3 = np.argsort(-one, axis=1)[:, :3]
        ov = np.take_along_axis(one, o3, axis=1)
        clear1 = (o3[None] != ga[:, None, None]) & (o3[None] != gb[:, None, None])
        rest_one = np.where(clear1, ov[None], 0.0).max(2)  # [n, K]
        wa, wb = w[:, ea].T, w[:, eb].T  # [n, K]
        a1, b1 = counts[ea] == 1, counts[eb] == 1
        a2, b2 = counts[ea] == 2, counts[eb] == 2
        pa, pb = partner[aa], partner[bb]
        sa = single[:, ga].T - np.where(a1[:, None], wa, 0) + np.where(b1[:, None], wb, 0)
        sb = single[:, gb].T + np.where(a1[:, None], wa, 0) - np.where(b1[:, None], wb, 0)
        sg_all = np.broadcast_to(single.T[None], (n, G, K)).transpose(0, 2, 1).copy()
        sg_all[idx, :, ga] = sa
        sg_all[idx, :, gb] = sb  # [n, K, G]
        row_a = shared[:, ga, :].transpose(1, 0, 2).copy()  # [n, K, G]
        row_b = shared[:, gb, :].transpose(1, 0, 2).copy()
        m2 = idx[a2]
        row_a[m2, :, pa[a2]] -= wa[a2]
        row_b[m2, :, pa[a2]] += wa[a2]
        m2 = idx[b2]
        row_b[m2, :, pb[b2]] -= wb[b2]
        row_a[m2, :, pb[b2]] += wb[b2]
        pv_a = (sa[:, :, None] + sg_all + row_a) / (speeds[ga][:, None, None] + speeds)
        pv_b = (sb[:, :, None] + sg_all + row_b) / (speeds[gb][:, None, None] + speeds)
        pv_a[idx, :, ga] = 0.0
        pv_b[idx, :, gb] = 0.0
        new_two = np.maximum(rest_two, np.maximum(pv_a.max(2), pv_b.max(2)))
        new_one = np.maximum(
            rest_one, np.maximum(sa / speeds[ga][:, None], sb / speeds[gb][:, None])
        )
        val = np.maximum(np.maximum(new_one, new_two), fluid[None]).mean(1)  # [n]
        best_n = int(np.argmin(val))
        if val[best_n] >= base * (1 - 1e-9):
            best_n = -1
        if best_n < 0:
            break
        i, j = int(aa[best_n]), int(bb[best_n])
        row[i], row[j] = row[j], row[i]
        single, shared, partner = state()
    return row


def _time_at(cluster: Cluster, loads: FloatArray, gpus: IntArray) -> FloatArray:
    """Time of GPU ``gpus[n]`` at load ``loads[k, n]``: [K, N] -> [K, N]."""
    if not cluster.has_curves:
        return np.asarray(loads / cluster.speeds[gpus][None, :], dtype=np.float64)
    out = np.empty_like(loads)
    for g in np.unique(gpus):
        sel = gpus == g
        out[:, sel] = cluster.gpus[int(g)].time(loads[:, sel])
    return out


# --------------------------------------------------------------------------------------------
# Solving
# --------------------------------------------------------------------------------------------


def _params(options: SolveOptions, time_s: float, workers: int) -> cp_model.CpSolver:
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
    p.relative_gap_limit = _GAP_LIMIT
    p.log_search_progress = False
    return solver


def _threads(options: SolveOptions) -> int:
    return options.threads if options.threads > 0 else (os.cpu_count() or 1)


def _layer_scale(problem: Problem, loads: FloatArray) -> float:
    """Integer units per time unit so that a layer's fluid bound is about 1e5 units."""
    f = float(np.max(_fluid(problem.cluster, loads)))
    return _TARGET_UNITS / f if f > 0 else 1.0


@dataclass
class _LayerResult:
    row: IntArray
    bound: float  # lower bound on the layer's objective (problem units)
    optimal: bool
    improved: bool


def _table_from_vars(solver: cp_model.CpSolver, v: _LayerVars, E: int, G: int, S: int) -> IntArray:
    """[P] slot row from a solved layer."""
    row = np.empty(G * S, dtype=np.int64)
    fill = [0] * G
    for e in range(E):
        for g in range(G):
            if any(solver.value(v.c[(e, g, r)]) for r in v.cands[e]):
                row[g * S + fill[g]] = e
                fill[g] += 1
    return row


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
    dispatch: str,
) -> _LayerResult:
    """One layer: the even-split pipeline, then (``dispatch="best"``) the dispatcher-aware
    polish and the choice by the exact best-split objective."""
    if dispatch != "best":
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
            unit = _SWAP_S_PER_UNIT * 2 * problem.cluster.size * S * hint_row.size * len(loads)
            moves = max(5, min(moves, int(_FLEX_SHARE * budget_s / unit)))
        candidates.append(_flex_polish(loads, even.row, problem.cluster.speeds, S, deadline, moves))
    objs = [float(layer_objective(r[None, :], sub, options.hedge, "best")[0]) for r in candidates]
    pick = int(np.argmin(objs))  # first of equals: greedy's row is kept unless beaten
    bound = min(float(_hedged_fluid(sub, options.hedge)[0]), objs[pick])
    return _LayerResult(candidates[pick], bound, objs[pick] <= bound * (1 + _GAP_LIMIT), pick > 0)


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
    fluid = float(_hedged_fluid(sub, hedge)[0])
    greedy_obj = float(layer_objective(hint_row[None, :], sub, hedge)[0])
    row = _polish(
        loads,
        hint_row,
        problem.cluster,
        S,
        hedge,
        current,
        problem.weights.migration,
        deadline=math.inf if deterministic else start + _POLISH_SHARE * budget_s,
        work_s=_POLISH_SHARE * budget_s if deterministic else math.inf,
    )
    obj = float(layer_objective(row[None, :], sub, hedge)[0])
    if obj > greedy_obj:  # cannot happen (the search only accepts improvements); be safe
        row, obj = hint_row.copy(), greedy_obj
    improved = obj < greedy_obj - 1e-9 * max(greedy_obj, 1.0)
    if obj <= fluid * (1.0 + _GAP_LIMIT):  # provably optimal already
        return _LayerResult(row, min(fluid, obj), True, improved)
    # CP-SAT, if the model can be built and searched in what is left of the budget
    free = E * G <= _FREE_COUNTS_MAX
    terms = K * G * E * (3 if free else 1)
    if deterministic:  # by the cost model only, never by the clock
        left = (1 - _POLISH_SHARE) * budget_s
        variables = G * E * (3 if free else 1)
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
    scale = _layer_scale(problem, loads)
    m = cp_model.CpModel()
    v = _add_layer(m, problem, loads, row, current, scale, hedge, free)
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
    solver = _params(options, max(left, _MIN_SOLVE_S), workers)
    status = solver.solve(m)
    bound = fluid
    optimal = False
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # the integer model rounds coefficients; allow for that before trusting its bound
        bound = max(fluid, solver.best_objective_bound / div * (1.0 - 1e-4))
        optimal = status == cp_model.OPTIMAL
        cand = _table_from_vars(solver, v, E, G, S)
        cand_obj = float(layer_objective(cand[None, :], sub, hedge)[0])
        if cand_obj < obj - 1e-9 * max(obj, 1.0):
            row, obj, improved = cand, cand_obj, True
    return _LayerResult(row, min(bound, obj), optimal, improved)


def _solve_independent(
    problem: Problem, options: SolveOptions, hint: IntArray, t0: float, dispatch: str
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
    scale = _layer_scale(problem, loads)
    m = cp_model.CpModel()
    layers: list[_LayerVars] = []
    for layer in range(L):
        cur = problem.current.table[layer] if problem.current is not None else None
        layers.append(
            _add_layer(m, problem, loads[:, layer], hint[layer], cur, scale, hedge, False)
        )
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
    solver = _params(options, left, _threads(options))
    status = solver.solve(m)
    hint_obj = objective(hint, problem, hedge)
    bound = float(_hedged_fluid(problem, hedge).sum())
    details: dict[str, float] = {"coupled": 1.0}
    if options.progress is not None:
        options.progress(1.0)
    # the model counts traffic only for the heaviest pairs: never claim optimality for it
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        table = np.stack([_table_from_vars(solver, v, E, G, S) for v in layers])
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
    evenly over its copies; ``"best"``, for a speed-aware dispatcher that splits each batch
    optimally over the copies; the objective is then the hedged best-split straggler time and
    the reported bound the fluid/copy bound."""
    from placement.solvers.greedy import greedy_table

    dispatch = options.dispatch
    if options.hedge not in ("expected", "robust"):
        raise ValueError(f"hedge must be 'expected' or 'robust', got {options.hedge!r}")
    if dispatch not in ("even", "best"):
        raise ValueError(f"dispatch must be 'even' or 'best', got {dispatch!r}")
    t0 = time.monotonic()
    # greedy's own swap refinement is what _polish does first; it is skipped where it would
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
    if dispatch == "best":
        bound = min(bound, float(_hedged_fluid(problem, options.hedge).sum()))
    if hint_obj < obj:  # never worse than the warm start
        table, obj = hint, hint_obj
    details["greedy_objective"] = hint_obj
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
        status="OPTIMAL" if status == "OPTIMAL" or obj <= bound * (1 + _GAP_LIMIT) else status,
        details=details,
    )
