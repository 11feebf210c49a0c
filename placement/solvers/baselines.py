"""What engines do without balancing: ``linear`` and ``round-robin`` placements.

- ``linear``: expert e in slot e; the redundant slots E..P-1 take the hottest experts (one
  extra copy each, hottest first, cycling if there are more redundant slots than experts),
  skipping an expert the slot's GPU already holds.
- ``round-robin``: expert e on GPU e % G (slots of a GPU in increasing expert order); the
  remaining slots of each GPU take the hottest experts it does not hold yet.

Both ignore GPU speed; with a load they still use it to choose the redundant copies.
"""

from __future__ import annotations

import time

import numpy as np

from placement.model import FloatArray, IntArray
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions, heuristic_solution, register


def _fill_redundant(row: IntArray, free: list[int], load: FloatArray, slots_per_gpu: int) -> None:
    """Fill slots ``free`` of ``row`` [P] (in order) with the hottest experts, one extra copy
    each in turn, never putting an expert twice on one GPU."""
    E = load.shape[0]
    order = np.argsort(-load, kind="stable").tolist()
    queue = order * (len(free) // E + 2)
    for s in free:
        g = s // slots_per_gpu
        held = set(row[g * slots_per_gpu : (g + 1) * slots_per_gpu].tolist())
        for i, e in enumerate(queue):
            if e not in held:
                row[s] = e
                del queue[i]
                break
        else:  # pragma: no cover - S <= E guarantees a candidate
            raise RuntimeError("no expert left for a redundant slot")


def linear_table(problem: Problem) -> IntArray:
    """[L, P]: expert e in slot e, redundant slots to the hottest experts."""
    L, E, P, S = (
        problem.model.moe_layers,
        problem.model.experts,
        problem.num_slots,
        problem.slots_per_gpu,
    )
    table = np.full((L, P), -1, dtype=np.int64)
    for layer in range(L):
        table[layer, :E] = np.arange(E)
        _fill_redundant(table[layer], list(range(E, P)), problem.load[layer], S)
    return table


def round_robin_table(problem: Problem) -> IntArray:
    """[L, P]: expert e on GPU e % G, remaining slots to the hottest experts."""
    L, E, G, S = (
        problem.model.moe_layers,
        problem.model.experts,
        problem.cluster.size,
        problem.slots_per_gpu,
    )
    table = np.full((L, G * S), -1, dtype=np.int64)
    for layer in range(L):
        row = table[layer]
        free: list[int] = []
        for g in range(G):
            mine = list(range(g, E, G))
            row[g * S : g * S + len(mine)] = mine
            free.extend(range(g * S + len(mine), g * S + S))
        _fill_redundant(row, free, problem.load[layer], S)
    return table


@register("linear")
def solve_linear(problem: Problem, options: SolveOptions) -> Solution:
    start = time.perf_counter()
    return heuristic_solution(problem, linear_table(problem), "linear", start)


@register("round-robin")
def solve_round_robin(problem: Problem, options: SolveOptions) -> Solution:
    start = time.perf_counter()
    return heuristic_solution(problem, round_robin_table(problem), "round-robin", start)
