"""The exact (float) objective of a slot table and its lower bounds, per layer: straggler
time from :mod:`placement.evaluate` (the evaluator every strategy is scored with), hedged
over the problem's load samples, plus the migration and traffic terms."""

from __future__ import annotations

import numpy as np

from placement.evaluate import (
    Dispatch,
    fluid_bound,
    layer_times,
    moved_per_layer,
    replica_bound,
    traffic_changes,
)
from placement.model import FloatArray, IntArray
from placement.problem import Problem


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


def traffic_tokens(table: IntArray, problem: Problem) -> FloatArray:
    """[L-1] tokens that change GPU between layer l and l+1 (even split); zeros if no
    transitions."""
    L = problem.model.moe_layers
    if problem.transitions is None or L < 2:
        return np.zeros(max(L - 1, 0), dtype=np.float64)
    return traffic_changes(table, problem.transitions, problem.cluster.size)


def moved_copies(table: IntArray, problem: Problem) -> IntArray:
    """[L] copies (e, g) present in ``table`` but not in ``problem.current`` (zeros if none)."""
    if problem.current is None:
        return np.zeros(problem.model.moe_layers, dtype=np.int64)
    return moved_per_layer(table, problem.current.table, problem.cluster.size)


def layer_objective(
    table: IntArray, problem: Problem, hedge: str, dispatch: Dispatch = "even"
) -> FloatArray:
    """[L] per-layer objective: hedged straggler time (under ``dispatch``) + migration term
    (no traffic)."""
    strag = layer_times(table, problem.cluster, scenarios(problem), dispatch)
    hedged = strag.max(axis=0) if hedge == "robust" else strag.mean(axis=0)
    return np.asarray(hedged + problem.weights.migration * moved_copies(table, problem))


def objective(
    table: IntArray, problem: Problem, hedge: str = "expected", dispatch: Dispatch = "even"
) -> float:
    """The cpsat objective of a [L, P] table in the problem's time unit (traffic counted as
    under even split)."""
    total = float(layer_objective(table, problem, hedge, dispatch).sum())
    if problem.weights.traffic > 0:
        total += problem.weights.traffic * float(traffic_tokens(table, problem).sum())
    return total


def hedged_fluid(problem: Problem, hedge: str) -> FloatArray:
    """[L] lower bound on the hedged straggler term of each layer, valid for every placement:
    per sample the larger of the fluid bound and the copy bound (the heaviest expert has at
    most ``min(G, 1 + redundant)`` copies, so one copy carries at least its load over that,
    on the fastest GPU's monotone hull)."""
    loads = scenarios(problem)  # [K, L, E]
    f = np.asarray(fluid_bound(problem.cluster, loads), dtype=np.float64)  # [K, L]
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
