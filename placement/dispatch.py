"""Token dispatch over expert copies, and the per-GPU performance model in vectorised form.

Two dispatch rules decide how a logical expert's tokens are split over its copies:

- ``even``: every copy gets ``load / copies`` (what vLLM and SGLang do);
- ``speed-aware``: per layer and batch, the split that minimises the layer's slowest GPU time
  (:func:`best_split`, what a speed-aware runtime dispatcher can reach).

GPU time is a function of the GPU's total tokens in the layer (``Cluster.times``): tokens /
speed, or the GPU's latency curve. Curves need not be monotone (tile effects); bounds and the
best split work on the curve's *monotone hull* ``h(x) = min_{y >= x} t(y)`` (the least time in
which a GPU can finish at least ``x`` tokens), and ``capacity(T) = sup {x : h(x) <= T}`` is the
most tokens a GPU can finish within time ``T``. Every actual time is ``t(x) >= h(x)``, so bounds
built on the hull are valid for the real curves.

Shapes: L layers, E experts, G GPUs, S slots per GPU, P = G * S slots; ``table`` [L, P] or
[P] is phy2log.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from placement.model import Cluster, FloatArray, IntArray

BoolArray = npt.NDArray[np.bool_]


class TimeModel:
    """Vectorised per-GPU time ``t_g(x)`` and capacity ``cap_g(T)`` for a cluster.

    Speed factors: ``t_g(x) = x / s_g``, ``cap_g(T) = s_g T``. Latency curves: piecewise-linear
    interpolation (flat left of the first sample, linear extrapolation right of the last, zero
    at zero tokens; exactly :meth:`LatencyCurve.time`), capacity on the monotone hull.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.num_gpus = cluster.size
        self.curves = cluster.has_curves
        self.speeds = np.array([g.speed for g in cluster.gpus], dtype=np.float64)
        if not self.curves:
            return
        curves = [g.curve for g in cluster.gpus]
        n = max(len(c.tokens) for c in curves if c is not None)
        G = self.num_gpus
        # raw curve, padded to n points with the last point repeated (gathers stay in range)
        self._xs = np.zeros((G, n))
        self._ys = np.zeros((G, n))
        self._npts = np.zeros(G, dtype=np.int64)
        self._slope = np.zeros(G)
        hulls: list[tuple[FloatArray, FloatArray]] = []
        for g, c in enumerate(curves):
            assert c is not None
            xs = np.asarray(c.tokens, dtype=np.float64)
            ys = np.asarray(c.micros, dtype=np.float64)
            k = xs.size
            self._xs[g, :k], self._xs[g, k:] = xs, xs[-1]
            self._ys[g, :k], self._ys[g, k:] = ys, ys[-1]
            self._npts[g] = k
            self._slope[g] = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            hulls.append(_monotone_hull(xs, ys, float(self._slope[g])))
        m = max(h[0].size for h in hulls)
        # hull breakpoints padded with level +inf (never <= T)
        self._hx = np.zeros((G, m))
        self._hy = np.full((G, m), np.inf)
        self._hn = np.zeros(G, dtype=np.int64)
        for g, (hx, hy) in enumerate(hulls):
            self._hx[g, : hx.size], self._hx[g, hx.size :] = hx, hx[-1]
            self._hy[g, : hy.size] = hy
            self._hn[g] = hx.size

    def time(self, loads: FloatArray) -> FloatArray:
        """[..., G] tokens per GPU -> [..., G] time (µs with curves, token-times otherwise)."""
        if not self.curves:
            return np.asarray(np.asarray(loads, dtype=np.float64) / self.speeds, dtype=np.float64)
        return self.time_on(loads, np.arange(self.num_gpus))

    def time_on(self, loads: FloatArray, gpu: IntArray) -> FloatArray:
        """Time of ``loads`` [...] tokens on GPUs ``gpu`` (int array broadcast to ``loads``)."""
        x = np.asarray(loads, dtype=np.float64)
        gi = np.broadcast_to(np.asarray(gpu), x.shape)
        if not self.curves:
            return np.asarray(x / self.speeds[gi], dtype=np.float64)
        out = np.empty(x.shape)
        for g in np.unique(gi).tolist():
            sel = gi == g
            k = int(self._npts[g])
            xs, ys = self._xs[g, :k], self._ys[g, :k]
            xg = x[sel]
            t = np.interp(xg, xs, ys)
            t = np.where(xg > xs[-1], ys[-1] + (xg - xs[-1]) * self._slope[g], t)
            out[sel] = np.where(xg <= 0, 0.0, t)
        return out

    def hull_time(self, loads: FloatArray) -> FloatArray:
        """[..., G] tokens -> [..., G] monotone-hull time ``h_g(x) <= t_g(x)``."""
        x = np.asarray(loads, dtype=np.float64)
        if not self.curves:
            return x / self.speeds
        hx, hy, last = self._hx, self._hy, self._hn - 1
        G = np.arange(self.num_gpus)
        j = np.clip((hx <= x[..., None]).sum(-1) - 1, 0, None)
        at_end = j >= last
        jc = np.minimum(j, np.maximum(last - 1, 0))
        x0, x1 = hx[G, jc], hx[G, jc + 1]
        y0, y1 = hy[G, jc], np.where(at_end, hy[G, jc], hy[G, jc + 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            inner = y0 + (x - x0) * np.where(x1 > x0, (y1 - y0) / (x1 - x0), 0.0)
        right = hy[G, last] + (x - hx[G, last]) * np.maximum(self._slope, 0.0)
        t = np.where(at_end, right, inner)
        return np.asarray(np.where(x <= 0, 0.0, t), dtype=np.float64)

    def capacity(self, T: FloatArray) -> FloatArray:
        """[...] time budgets -> [..., G] most tokens each GPU finishes within ``T``."""
        t = np.asarray(T, dtype=np.float64)
        if not self.curves:
            return t[..., None] * self.speeds
        hx, hy, last = self._hx, self._hy, self._hn - 1
        G = np.arange(self.num_gpus)
        tt = t[..., None]
        j = (hy <= tt[..., None]).sum(-1) - 1  # last hull breakpoint with level <= T
        jc = np.clip(j, 0, None)
        jn = np.minimum(jc + 1, last)
        x0, y0 = hx[G, jc], hy[G, jc]
        x1, y1 = hx[G, jn], hy[G, jn]
        with np.errstate(invalid="ignore", divide="ignore"):
            inner = x0 + (tt - y0) * (x1 - x0) / (y1 - y0)
            slope = self._slope
            right = np.where(slope > 0, hx[G, last] + (tt - hy[G, last]) / slope, np.inf)
        cap = np.where(j < 0, 0.0, np.where(jc >= last, right, inner))
        return np.asarray(np.maximum(cap, 0.0), dtype=np.float64)

    def level(self, demand: FloatArray, mask: BoolArray | None = None) -> FloatArray:
        """Least ``T`` with ``sum_{g in mask} cap_g(T) >= demand``; ``demand`` [...] -> [...].

        Closed form for speed factors. For curves the total capacity is piecewise linear
        between the hull levels of the GPUs (jumping at plateau levels): a binary search over
        the sorted levels finds the interval, where ``T`` follows by linear interpolation.
        Exact up to rounding; O(log(levels)) capacity evaluations.
        """
        d = np.asarray(demand, dtype=np.float64)
        sel = np.ones(self.num_gpus, dtype=bool) if mask is None else mask
        if not self.curves:
            return np.asarray(d / self.speeds[sel].sum(), dtype=np.float64)
        hy = self._hy[sel]
        levels = np.unique(hy[np.isfinite(hy)])
        n = levels.size

        def total(t: FloatArray) -> FloatArray:
            return np.asarray(self.capacity(t)[..., sel].sum(-1), dtype=np.float64)

        lo = np.zeros(d.shape, dtype=np.int64)
        hi = np.full(d.shape, n, dtype=np.int64)
        while np.any(lo < hi):  # smallest i with total(levels[i]) >= d (n if none)
            mid = (lo + hi) // 2
            ok = total(levels[np.minimum(mid, n - 1)]) >= d
            active = lo < hi
            hi = np.where(active & ok, mid, hi)
            lo = np.where(active & ~ok, mid + 1, lo)
        a = levels[np.clip(lo - 1, 0, n - 1)]
        b = np.where(lo < n, levels[np.minimum(lo, n - 1)], a + np.maximum(1.0, np.abs(a)))
        ca, probe = total(a), 0.5 * (a + b)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (total(probe) - ca) / (probe - a)
            t = a + (d - ca) / slope
        t = np.where(lo < n, np.minimum(np.nan_to_num(t, nan=np.inf), b), t)
        t = np.where(lo == 0, levels[0], t)
        return np.asarray(np.where(d <= 0, 0.0, t), dtype=np.float64)


def _monotone_hull(xs: FloatArray, ys: FloatArray, slope: float) -> tuple[FloatArray, FloatArray]:
    """Breakpoints of ``h(x) = min_{y >= x} t(y)`` for x > 0 (the value at 0+ is at x = 0).

    ``t`` is flat ``ys[0]`` left of ``xs[0]``, linear between samples and extrapolated with
    ``slope`` to the right (a non-positive last slope makes the tail flat for the hull).
    """
    px = [0.0, *xs.tolist()] if xs[0] > 0 else xs.tolist()
    py = [float(ys[0]), *ys.tolist()] if xs[0] > 0 else ys.tolist()
    out_x = [px[-1]]
    out_y = [py[-1]]
    m = py[-1]  # suffix minimum
    for i in range(len(px) - 2, -1, -1):
        x0, y0, x1, y1 = px[i], py[i], px[i + 1], py[i + 1]
        if y0 <= m:
            if y1 > m:  # t crosses level m inside the segment: h = t left of it, m right
                xc = x0 + (m - y0) * (x1 - x0) / (y1 - y0)
                if xc < out_x[-1]:
                    out_x.append(xc)
                    out_y.append(m)
            out_x.append(x0)
            out_y.append(y0)
            m = y0
        # else: h == m on the whole segment; the breakpoint at x0 is implied
    if out_x[-1] > 0.0:  # flat from 0+
        out_x.append(0.0)
        out_y.append(m)
    hx = np.array(out_x[::-1])
    hy = np.array(out_y[::-1])
    keep = np.concatenate([[True], np.diff(hx) > 0])
    return hx[keep], hy[keep]


def even_split(table: IntArray, load: FloatArray, num_gpus: int) -> tuple[FloatArray, FloatArray]:
    """Even dispatch. ``table`` [L, P], ``load`` [..., L, E] -> (slot_load [..., L, P],
    gpu_load [..., L, G]): each copy of expert e gets ``load[e] / copies(e)``."""
    L, P = table.shape
    E = load.shape[-1]
    counts = np.zeros((L, E), dtype=np.float64)
    for layer in range(L):
        np.add.at(counts[layer], table[layer], 1.0)
    per_copy = load / np.maximum(counts, 1.0)
    slot = np.take_along_axis(per_copy, np.broadcast_to(table, (*load.shape[:-1], P)), axis=-1)
    gpu = slot.reshape(*slot.shape[:-1], num_gpus, P // num_gpus).sum(-1)
    return slot, gpu


@dataclass(frozen=True)
class _Layout:
    """What :func:`best_split` needs of one layer's ``row`` [P], whatever the batch.

    ``gpu_of_slot`` [P]; ``copies`` [P] copies of each slot's expert; ``single`` [P] whether
    the slot's expert has one copy, ``single_gpu`` / ``single_expert`` [n_single] its GPU and
    expert; ``replicated`` the experts with more than one copy, ascending; ``nbr[e]`` the
    distinct GPUs holding expert e, ascending, and ``slot_of[e][g]`` e's first slot on GPU g
    (both empty for experts with one copy).
    """

    gpu_of_slot: IntArray
    copies: IntArray
    single: BoolArray
    single_gpu: IntArray
    single_expert: IntArray
    replicated: list[int]
    nbr: list[tuple[int, ...]]
    slot_of: list[dict[int, int]]


def _layout(row: IntArray, slots_per_gpu: int, num_gpus: int, experts: int) -> _Layout:
    """The :class:`_Layout` of ``row`` [P], memoised by content (the serving side asks for the
    same rows every step)."""
    return _layout_of(row.tobytes(), row.dtype.str, slots_per_gpu, num_gpus, experts)


@functools.lru_cache(maxsize=4096)
def _layout_of(
    row_bytes: bytes, dtype: str, slots_per_gpu: int, num_gpus: int, experts: int
) -> _Layout:
    row = np.frombuffer(row_bytes, dtype=dtype).astype(np.int64)
    gpu_of_slot = np.arange(row.size) // slots_per_gpu
    counts = np.bincount(row, minlength=experts)
    copies = counts[row]
    single = copies == 1
    nbr: list[list[int]] = [[] for _ in range(experts)]
    slot_of: list[dict[int, int]] = [{} for _ in range(experts)]
    for s, (e, g) in enumerate(zip(row.tolist(), gpu_of_slot.tolist(), strict=True)):
        if counts[e] > 1 and g not in slot_of[e]:
            nbr[e].append(g)
            slot_of[e][g] = s
    return _Layout(
        gpu_of_slot=gpu_of_slot,
        copies=copies,
        single=single,
        single_gpu=gpu_of_slot[single],
        single_expert=row[single],
        replicated=np.flatnonzero(counts > 1).tolist(),
        nbr=[tuple(sorted(n)) for n in nbr],
        slot_of=slot_of,
    )


@dataclass(frozen=True)
class Split:
    """One layer's dispatch: ``slot_load`` [P] tokens per slot, ``gpu_load`` [G], ``time`` the
    slowest GPU's time, ``bound`` the optimum on the monotone hull (== time for speeds)."""

    slot_load: FloatArray
    gpu_load: FloatArray
    time: float
    bound: float


def best_split(row: IntArray, load: FloatArray, model: TimeModel, slots_per_gpu: int) -> Split:
    """Split each expert's tokens over its copies to minimise the layer's slowest GPU time.

    ``row`` [P] phy2log of one layer, ``load`` [E] tokens of one batch. Exact (for speed
    factors; on the monotone hull for curves) by a Newton/Dinkelbach iteration on the time
    level ``T``: experts with one copy fix a base load per GPU; the replicated experts'
    tokens are a bipartite flow (expert -> GPUs holding a copy -> sink, GPU capacity
    ``cap_g(T) - base_g``). Start at a lower bound of ``T``; while the max flow falls short,
    its min cut names a GPU set H and the experts confined to H, whose total work forces
    ``T >= level(H)``: raise ``T`` to that and augment further (capacities only grow, so the
    flow is kept). ``T`` never passes the optimum and each step fixes a new cut, so it ends at
    the optimum, typically in 1-3 steps. The returned split is then compared with the even
    split and the better one (by real time) is kept, so ``best`` never loses to ``even``.
    """
    G = model.num_gpus
    E = load.shape[0]
    w = np.asarray(load, dtype=np.float64)
    lay = _layout(row, slots_per_gpu, G, E)
    base = _fbincount(lay.single_gpu, w[lay.single_expert], G)
    # even split, the fallback and upper end
    even_slot = w[row] / lay.copies
    even_gpu = _fbincount(lay.gpu_of_slot, even_slot, G)
    even_time = float(model.time(even_gpu).max())
    wl = w.tolist()
    rep = [e for e in lay.replicated if wl[e] > 0]
    if not rep:
        t = even_time
        return Split(even_slot, even_gpu, t, float(model.hull_time(even_gpu).max()))
    # adjacency: replicated expert index r -> distinct GPUs holding a copy (and their slot)
    nbr = [lay.nbr[e] for e in rep]
    slot_of = [lay.slot_of[e] for e in rep]
    supply = [wl[e] for e in rep]
    order_key = [(len(n), -s) for n, s in zip(nbr, supply, strict=True)]
    fill_order = sorted(range(len(rep)), key=order_key.__getitem__)
    total = float(w.sum())
    T = max(float(model.level(np.array(total))), float(model.hull_time(base).max()))
    flow: list[dict[int, float]] = [dict.fromkeys(n, 0.0) for n in nbr]
    out = [0.0] * len(rep)
    gin = [0.0] * G
    users: list[set[int]] = [set() for _ in range(G)]
    tol = 1e-12 * max(total, 1.0)
    for _ in range(4 * G + 8):
        capv = (model.capacity(np.array(T)) - base).tolist()
        # greedy fill: experts with fewest copies first, then the most tokens; each into its
        # GPUs with the most room first
        for r in fill_order:
            need = supply[r] - out[r]
            if need <= tol:
                continue
            gpus = nbr[r]
            if len(gpus) == 2:  # the common case, without sorted()'s per-call cost
                a, b = gpus
                if gin[b] - capv[b] < gin[a] - capv[a]:
                    gpus = (b, a)
            else:
                gpus = tuple(sorted(gpus, key=lambda h: gin[h] - capv[h]))
            for g in gpus:
                if need <= tol:
                    break
                room = capv[g] - gin[g]
                if room > tol:
                    d = min(room, need)
                    flow[r][g] += d
                    gin[g] += d
                    out[r] += d
                    users[g].add(r)
                    need -= d
        # augmenting paths (BFS over expert -> gpu -> expert via reverse flow)
        reach_r, reach_g = _augment(supply, out, nbr, flow, gin, capv, users, tol)
        short = sum(supply) - sum(out)
        if short <= 1e-9 * max(total, 1.0):
            break
        mask = np.zeros(G, dtype=bool)
        mask[list(reach_g)] = True
        demand = sum(supply[r] for r in reach_r) + float(base[mask].sum())
        T_new = float(model.level(np.array(demand), mask))
        T = max(T_new, T * (1.0 + 1e-12))
    # any rounding shortfall goes to the expert's copy on the least loaded GPU
    for r in range(len(rep)):
        rest = supply[r] - out[r]
        if rest > 0:
            g = min(nbr[r], key=lambda h: gin[h])
            flow[r][g] += rest
            gin[g] += rest
            out[r] += rest
    slots = np.where(lay.single, w[row], 0.0).tolist()
    for r in range(len(rep)):
        for g, f in flow[r].items():
            slots[slot_of[r][g]] = f
    slot_load = np.array(slots)
    gpu_load = _fbincount(lay.gpu_of_slot, slot_load, G)
    t = float(model.time(gpu_load).max())
    if t > even_time:
        return Split(even_slot, even_gpu, even_time, min(T, even_time))
    return Split(slot_load, gpu_load, t, T)


def _fbincount(index: IntArray, weights: FloatArray, size: int) -> FloatArray:
    return np.asarray(np.bincount(index, weights=weights, minlength=size), dtype=np.float64)


def _augment(
    supply: list[float],
    out: list[float],
    nbr: list[tuple[int, ...]],
    flow: list[dict[int, float]],
    gin: list[float],
    capv: list[float],
    users: list[set[int]],
    tol: float,
) -> tuple[set[int], set[int]]:
    """Augment along shortest paths until none is left; return the experts and GPUs still
    reachable from the source (the source side of a min cut)."""
    R, G = len(supply), len(capv)
    starts = [r for r in range(R) if supply[r] - out[r] > tol]  # experts short of supply
    while True:
        prev_g = [-1] * G  # gpu -> expert it was reached from
        prev_r = [-1] * R  # expert -> gpu it was reached from (reverse edge)
        queue = starts.copy()
        seen_r = [False] * R
        for r in queue:
            seen_r[r] = True
        end = -1
        for r in queue:  # grows while it is walked: breadth first
            for g in nbr[r]:
                if prev_g[g] >= 0:
                    continue
                prev_g[g] = r
                if capv[g] - gin[g] > tol:
                    end = g
                    break
                for r2 in users[g]:
                    if not seen_r[r2] and flow[r2][g] > tol:
                        seen_r[r2] = True
                        prev_r[r2] = g
                        queue.append(r2)
            if end >= 0:
                break
        if end < 0:
            return set(queue), {g for g in range(G) if prev_g[g] >= 0}
        # bottleneck
        delta = capv[end] - gin[end]
        g = end
        r = prev_g[g]
        while prev_r[r] >= 0:
            g2 = prev_r[r]
            delta = min(delta, flow[r][g2])
            g = g2
            r = prev_g[g]
        delta = min(delta, supply[r] - out[r])
        # apply
        g = end
        gin[g] += delta
        r = prev_g[g]
        while True:
            flow[r][g] += delta
            users[g].add(r)
            g2 = prev_r[r]
            if g2 < 0:
                out[r] += delta
                if supply[r] - out[r] <= tol:
                    starts.remove(r)
                break
            flow[r][g2] -= delta
            if flow[r][g2] <= tol:
                users[g2].discard(r)
            g = g2
            r = prev_g[g]
