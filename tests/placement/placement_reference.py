"""Independent references for the solver tests, written from the problem statement and sharing
no code with ``placement.evaluate`` or the solvers:

- :func:`straggler`: a slot table's straggler time under even split, token by token in plain
  Python (each copy of expert e takes ``load_e / copies_e``; a GPU's time is its tokens over
  its speed, or its latency curve read by hand; a layer takes as long as its slowest GPU);
- :func:`optimum`: the least straggler time over *every* valid placement, by enumeration
  (tiny instances only: each GPU holds S distinct experts, every expert at least once);
- :func:`best_split_time`: a layer's time when each batch's tokens are split over an expert's
  copies at best (speed factors): by Gale's condition, the largest ``need(H) / speed(H)``
  over sets H of GPUs, where ``need(H)`` is the work of the experts with every copy in H;
- :func:`lower_bound`: a bound valid for every placement and dispatch, speed factors only:
  per layer and sample the fluid bound ``sum(load) / sum(speed)`` and the copy bound (the
  heaviest expert has at most ``min(G, 1 + redundant)`` copies, one of which carries at
  least its share, on the fastest GPU).

Loads are [L, E] or [K, L, E] (K samples); hedges are "expected" (mean over samples) and
"robust" (the worst sample), summed over layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from placement.model import GPU, Cluster
from placement.problem import Problem


def _samples(load: np.ndarray) -> list[np.ndarray]:
    arr = np.asarray(load, dtype=np.float64)
    return [arr] if arr.ndim == 2 else list(arr)


def _hedge(values: Sequence[float], hedge: str) -> float:
    return max(values) if hedge == "robust" else sum(values) / len(values)


def gpu_time(gpu: GPU, tokens: float) -> float:
    """Time of ``tokens`` on ``gpu``: tokens / speed, or the curve through its samples (flat
    before the first, the last segment's slope after the last, nothing for no tokens)."""
    if tokens <= 0:
        return 0.0
    if gpu.curve is None:
        return tokens / gpu.speed
    xs, ys = gpu.curve.tokens, gpu.curve.micros
    if tokens <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if tokens <= xs[i]:
            return ys[i - 1] + (tokens - xs[i - 1]) * (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1] + (tokens - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])


def layer_time(row: Sequence[int], cluster: Cluster, expert_load: Sequence[float]) -> float:
    """One layer's slowest GPU time for slot row ``row`` (slot p on GPU p // S), even split."""
    gpus = cluster.gpus
    S = len(row) // len(gpus)
    copies = {e: list(row).count(e) for e in set(row)}
    tokens = [0.0] * len(gpus)
    for slot, e in enumerate(row):
        tokens[slot // S] += float(expert_load[e]) / copies[e]
    return max(gpu_time(g, t) for g, t in zip(gpus, tokens, strict=True))


def straggler(
    table: np.ndarray, cluster: Cluster, load: np.ndarray, hedge: str = "expected"
) -> float:
    """Sum over layers of the hedged (over samples) slowest GPU time, even split."""
    total = 0.0
    for layer, row in enumerate(np.asarray(table).tolist()):
        per_sample = [layer_time(row, cluster, w[layer].tolist()) for w in _samples(load)]
        total += _hedge(per_sample, hedge)
    return total


def _rows(experts: int, num_gpus: int, slots: int) -> Iterator[tuple[int, ...]]:
    """Every valid slot row up to the order inside a GPU: S distinct experts per GPU, each
    expert somewhere."""
    for choice in itertools.product(itertools.combinations(range(experts), slots), repeat=num_gpus):
        row = tuple(e for gpu in choice for e in gpu)
        if len(set(row)) == experts:
            yield row


def optimum(problem: Problem, hedge: str = "expected") -> tuple[float, np.ndarray]:
    """(least straggler time, one table reaching it) over every valid placement; layers are
    independent (no traffic, no migration), so each is enumerated on its own."""
    E, G, S = problem.model.experts, problem.cluster.size, problem.slots_per_gpu
    load = problem.samples if problem.samples is not None else problem.load
    best_rows = []
    total = 0.0
    for layer in range(problem.model.moe_layers):
        loads = [w[layer].tolist() for w in _samples(load)]
        best, best_row = float("inf"), None
        for row in _rows(E, G, S):
            value = _hedge([layer_time(row, problem.cluster, w) for w in loads], hedge)
            if value < best:
                best, best_row = value, row
        total += best
        best_rows.append(best_row)
    return total, np.array(best_rows, dtype=np.int64)


def lower_bound(problem: Problem, hedge: str = "expected") -> float:
    """Fluid and copy bound per layer and sample (speed factors), hedged, summed over layers."""
    speeds = [g.speed for g in problem.cluster.gpus]
    most_copies = min(len(speeds), 1 + problem.redundant)
    load = problem.samples if problem.samples is not None else problem.load
    total = 0.0
    for layer in range(problem.model.moe_layers):
        per_sample = []
        for w in _samples(load):
            work = w[layer].tolist()
            fluid = sum(work) / sum(speeds)
            copy = max(work) / most_copies / max(speeds)
            per_sample.append(max(fluid, copy))
        total += _hedge(per_sample, hedge)
    return total


def gpu_sets(num_gpus: int) -> list[set[int]]:
    """Every nonempty set of GPU indices."""
    return [{g for g in range(num_gpus) if bits >> g & 1} for bits in range(1, 2**num_gpus)]


def confined_need(row: Sequence[int], w: Sequence[float], S: int, inside: set[int]) -> float:
    """Tokens of the experts whose copies all lie on the GPUs ``inside``. By Gale's condition
    (transportation with uncapacitated edges) a split with GPU g taking at most cap_g exists
    iff this is <= the capacity of ``inside`` for every set of GPUs: an exact oracle (an LP
    solver's feasibility tolerance once let a 2e-4-token overload through)."""
    gpus_of: dict[int, set[int]] = {}
    for slot, e in enumerate(row):
        gpus_of.setdefault(int(e), set()).add(slot // S)
    return sum(float(w[e]) for e, held in gpus_of.items() if held <= inside)


def best_split_time(row: Sequence[int], speeds: Sequence[float], w: Sequence[float]) -> float:
    """Least slowest-GPU time of one layer over every split of each expert's tokens over its
    copies (speed factors): the largest ``need(H) / speed(H)`` over GPU sets H."""
    S = len(row) // len(speeds)
    return max(
        confined_need(row, w, S, inside) / sum(speeds[g] for g in inside)
        for inside in gpu_sets(len(speeds))
    )


def best_split_straggler(
    table: np.ndarray, cluster: Cluster, load: np.ndarray, hedge: str = "expected"
) -> float:
    """:func:`straggler` with the best split per batch (speed factors)."""
    speeds = [g.speed for g in cluster.gpus]
    total = 0.0
    for layer, row in enumerate(np.asarray(table).tolist()):
        per_sample = [best_split_time(row, speeds, w[layer].tolist()) for w in _samples(load)]
        total += _hedge(per_sample, hedge)
    return total
