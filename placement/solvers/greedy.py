"""Speed-aware greedy placement (ViBE/GEM style), one layer at a time.

1. Replica counts: start with one copy per expert and give each redundant slot to the expert
   with the largest load per copy (at most G copies, one per GPU); with load samples the
   load is hedged (mean + z * std over samples).
2. Copies, heaviest per-copy load first, go to the GPU where they raise the layer's time least,
   by each GPU's own performance model (speed factor or latency curve). With load samples
   ([K, L, E]) a copy is a vector of K loads and the criterion is the increase of the expected
   (mean over samples) slowest-GPU time, ties broken by the smaller mean finish time on the
   GPU; without samples that is longest-processing-time-first on heterogeneous machines.
   Only GPUs with a free slot and without a copy of the expert are candidates; if none is left,
   a copy already placed elsewhere is moved into a free slot to make room.

3. Local search (:func:`refine_layer`): best-improvement swaps of two copies on different
   GPUs while the expected slowest-GPU time drops.

With ``weights.traffic`` (and transitions) or ``weights.migration`` (and a current placement)
both steps add those costs per copy (:func:`extra_cost`), so the greedy minimises the same
kind of objective as ``cpsat``.

Every GPU ends with exactly S = P/G slots. Deterministic. Cost: O(L * P * K * G) numpy work
for the greedy, O(L * swaps * S * P * K) for the local search (at most 2P swaps per layer).
"""

from __future__ import annotations

import time

import numpy as np

from placement.dispatch import BoolArray, TimeModel
from placement.evaluate import evaluate, fluid_bound
from placement.model import FloatArray, IntArray, Placement
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions, register


def replica_counts(load: FloatArray, num_slots: int, num_gpus: int) -> IntArray:
    """[E] mean load -> [E] copies summing to ``num_slots``: each extra copy goes to the expert
    with the largest load per copy, at most ``num_gpus`` copies per expert."""
    E = load.shape[0]
    counts = np.ones(E, dtype=np.int64)
    for _ in range(num_slots - E):
        per_copy = np.where(counts < num_gpus, load / counts, -np.inf)
        counts[int(np.argmax(per_copy))] += 1
    return counts


def _place_layer(
    counts: IntArray,
    loads: FloatArray,
    model: TimeModel,
    slots_per_gpu: int,
    extra: FloatArray | None = None,
) -> IntArray:
    """Place copies of one layer. ``counts`` [E], ``loads`` [K, E] per-sample expert loads,
    ``extra`` [E, G] cost of a copy of e on GPU g (traffic, migration; see
    :func:`extra_cost`). Returns the layer's phy2log row [P]."""
    K, E = loads.shape
    G, S = model.num_gpus, slots_per_gpu
    per_copy = loads / counts  # [K, E]
    experts = np.repeat(np.arange(E), counts)
    order = np.argsort(-per_copy.mean(0)[experts], kind="stable")
    gpu_load = np.zeros((K, G))
    layer_t = np.zeros(K)
    held: list[list[int]] = [[] for _ in range(G)]
    has = np.zeros((G, E), dtype=bool)
    nheld = np.zeros(G, dtype=np.int64)
    inv_k = 1.0 / K
    for e in experts[order].tolist():
        v = per_copy[:, e]
        free = nheld < S
        allowed = free & ~has[:, e]
        if not allowed.any():
            _make_room(e, held, has, free, per_copy, gpu_load)
            nheld = np.array([len(h) for h in held], dtype=np.int64)
            free = nheld < S
            allowed = free & ~has[:, e]
        new_t = model.time(gpu_load + v[:, None])  # [K, G]
        incr = (np.maximum(new_t, layer_t[:, None]) - layer_t[:, None]).sum(0) * inv_k
        if extra is not None:
            incr = incr + extra[e]
        incr = np.where(allowed, incr, np.inf)
        scale = max(float(layer_t.sum()) * inv_k, 1e-300)
        near = allowed & (incr <= incr.min() + 1e-12 * scale)
        g = int(np.argmin(np.where(near, new_t.sum(0), np.inf)))
        held[g].append(e)
        nheld[g] += 1
        has[g, e] = True
        gpu_load[:, g] += v
        layer_t = np.maximum(layer_t, new_t[:, g])
    return np.array([e for h in held for e in h], dtype=np.int64)


def _make_room(
    e: int,
    held: list[list[int]],
    has: BoolArray,
    free: BoolArray,
    per_copy: FloatArray,
    gpu_load: FloatArray,
) -> None:
    """Every GPU with a free slot already holds ``e``: move the lightest copy x from a GPU h
    without ``e`` to a free GPU g without x, so that ``e`` can go on h."""
    best: tuple[float, int, int, int] | None = None
    for g in np.flatnonzero(free).tolist():
        for h in np.flatnonzero(~has[:, e]).tolist():
            for i, x in enumerate(held[h]):
                if not has[g, x]:
                    w = float(per_copy[:, x].mean())
                    if best is None or w < best[0]:
                        best = (w, g, h, i)
    if best is None:  # pragma: no cover - impossible while S <= E
        raise RuntimeError(f"no room for a copy of expert {e}")
    _, g, h, i = best
    x = held[h].pop(i)
    has[h, x] = False
    held[g].append(x)
    has[g, x] = True
    gpu_load[:, h] -= per_copy[:, x]
    gpu_load[:, g] += per_copy[:, x]


def refine_layer(
    row: IntArray,
    loads: FloatArray,
    model: TimeModel,
    slots_per_gpu: int,
    max_swaps: int,
    min_gain: float = 1e-9,
    extra: FloatArray | None = None,
) -> IntArray:
    """Best-improvement swaps of two copies on different GPUs, while the expected (mean over
    the K samples) slowest-GPU time of the layer drops by more than ``min_gain`` (relative).
    ``row`` [P], ``loads`` [K, E], ``extra`` [E, G] per-copy costs added to the objective.

    Only swaps touching a bottleneck GPU (the slowest in some sample) can help; each round
    scores all of them at once (bottleneck slots x all slots x K) and applies the best.
    Copy counts never change, no GPU gets two copies of one expert.
    """
    out = row.copy()
    K, E = loads.shape
    G, S = model.num_gpus, slots_per_gpu
    P = out.size
    gpu_of = np.arange(P) // S
    counts = np.bincount(out, minlength=E)
    per_copy = loads / np.maximum(counts, 1)  # [K, E]
    for _ in range(max_swaps):
        v = per_copy[:, out]  # [K, P]
        gload = v.reshape(K, G, S).sum(-1)
        times = model.time(gload)  # [K, G]
        current = float(times.max(-1).mean())
        if current <= 0:
            break
        top = np.argsort(-times, axis=-1)[:, :3]  # [K, <=3]
        top_t = np.take_along_axis(times, top, -1)
        hot = np.unique(top[:, 0])
        src = (hot[:, None] * S + np.arange(S)).ravel()  # [A] slots on bottleneck GPUs
        a, b = gpu_of[src][:, None], gpu_of[None, :]  # [A, 1], [1, P]
        ea, eb = out[src][:, None], out[None, :]
        has = np.zeros((G, E), dtype=bool)
        has[gpu_of, out] = True
        ok = (a != b) & (ea != eb) & ~has[b, ea] & ~has[a, eb]
        if not ok.any():
            break
        ia, jb = np.nonzero(ok)
        sa, sb = src[ia], jb
        ga, gb = gpu_of[sa], gpu_of[sb]
        d = v[:, sb] - v[:, sa]  # [K, M] tokens moved onto ga
        ta = model.time_on(gload[:, ga] + d, ga[None, :])
        tb = model.time_on(gload[:, gb] - d, gb[None, :])
        # slowest GPU other than ga, gb per sample: first of the top 3 not in {ga, gb}
        rest = np.zeros_like(ta)
        found = np.zeros(ta.shape, dtype=bool)
        for r in range(top.shape[1]):
            idx = top[:, r : r + 1]
            use = ~found & (idx != ga[None, :]) & (idx != gb[None, :])
            rest = np.where(use, top_t[:, r : r + 1], rest)
            found |= use
        score = np.maximum(np.maximum(ta, tb), rest).mean(0)
        if extra is not None:
            x, y = out[sa], out[sb]
            score = score + extra[x, gb] + extra[y, ga] - extra[x, ga] - extra[y, gb]
        best = int(np.argmin(score))
        if score[best] >= current * (1 - min_gain):
            break
        i, j = int(sa[best]), int(sb[best])
        out[i], out[j] = out[j], out[i]
    return out


def extra_cost(
    problem: Problem, layer: int, counts: IntArray, prev_row: IntArray | None
) -> FloatArray | None:
    """[E, G] objective cost of one copy of expert e on GPU g in ``layer`` beyond time, in the
    problem's time unit (the cpsat objective's terms), or None when both weights are 0:

    - traffic: ``weights.traffic`` x tokens into this copy from the previous layer that come
      from another GPU, ``(in_e - sum_i T[l-1, i, e] * share_{l-1}(g | i)) / copies_e``
      (layers are placed in order, so each layer pays for its incoming side);
    - migration: ``weights.migration`` if GPU g did not hold e in ``problem.current``.
    """
    E, G = problem.model.experts, problem.cluster.size
    w = problem.weights
    out = np.zeros((E, G))
    used = False
    if w.traffic > 0 and problem.transitions is not None and prev_row is not None and layer > 0:
        S = problem.slots_per_gpu
        share = np.zeros((E, G))
        np.add.at(share, (prev_row, np.arange(prev_row.size) // S), 1.0)
        share /= np.maximum(share.sum(1, keepdims=True), 1.0)
        trans = problem.transitions[layer - 1]  # [E_prev, E]
        stay = trans.T @ share  # [E, G] tokens into e that were on g
        out += w.traffic * (trans.sum(0)[:, None] - stay) / np.maximum(counts, 1)[:, None]
        used = True
    if w.migration > 0 and problem.current is not None:
        cur = problem.current.table[layer]
        had = np.zeros((E, G), dtype=bool)
        had[cur, np.arange(cur.size) // problem.current.slots_per_gpu] = True
        out += w.migration * ~had
        used = True
    return out if used else None


def greedy_table(problem: Problem, refine: bool = True, hedge_z: float = 1.0) -> IntArray:
    """[L, P] speed-aware greedy placement of ``problem``, improved by :func:`refine_layer`
    swaps unless ``refine`` is False.

    With samples ([K, L, E], K >= 2) the replica counts hedge against drift: they follow
    ``mean + hedge_z * std`` of the samples (an expert whose load swings gets a copy earlier;
    on DeepSeek-V2-Lite held-out windows z = 1 lowered the straggler time by ~1%), and copies
    are placed and refined on the samples. Without samples everything uses ``problem.load``.
    """
    model = TimeModel(problem.cluster)
    L, P, G = problem.model.moe_layers, problem.num_slots, problem.cluster.size
    samples = problem.samples if problem.samples is not None else problem.load[None]
    hedged = samples.shape[0] >= 2
    basis = samples.mean(0) + hedge_z * samples.std(0) if hedged else problem.load
    table = np.zeros((L, P), dtype=np.int64)
    S = problem.slots_per_gpu
    for layer in range(L):
        counts = replica_counts(basis[layer], P, G)
        prev = table[layer - 1] if layer > 0 else None
        extra = extra_cost(problem, layer, counts, prev)
        row = _place_layer(counts, samples[:, layer], model, S, extra)
        if refine:
            row = refine_layer(row, samples[:, layer], model, S, 2 * P, 1e-6, extra)
        table[layer] = row
    return table


@register("greedy")
def solve_greedy(problem: Problem, options: SolveOptions) -> Solution:
    """Greedy placement. Objective (as cpsat's): expected straggler time (even split) over
    the samples, or on the mean load without samples, plus ``weights.traffic`` x tokens that
    change GPU between layers plus ``weights.migration`` x copies moved."""
    start = time.perf_counter()
    table = greedy_table(problem)
    placement = Placement.from_table(table, problem.model, problem.cluster.size, "greedy")
    basis = problem.samples if problem.samples is not None else problem.load
    ev = evaluate(
        placement,
        problem.cluster,
        basis,
        transitions=problem.transitions,
        previous=problem.current,
    )
    w = problem.weights
    cross = 0.0
    if problem.transitions is not None and not np.isnan(ev.traffic_share):
        cross = ev.traffic_share * float(problem.transitions.sum())
    objective = ev.straggler + w.traffic * cross + w.migration * ev.moved
    return Solution(
        placement=placement,
        objective=objective,
        bound=float(fluid_bound(problem.cluster, basis).sum(-1).mean()),
        wall_s=time.perf_counter() - start,
        status="HEURISTIC",
        details={"straggler": ev.straggler, "cross_tokens": cross, "moved": float(ev.moved)},
    )
