"""Local search on one layer's slot row under the exact objective (even split): polishes the
warm start before CP-SAT."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from placement.dispatch import TimeModel
from placement.model import Cluster, FloatArray, IntArray

# cost model of the local search (deterministic mode): seconds per swap, per S * P * K, and
# per relocation, per candidate x K x G (measured on the benchmark machine, rounded up)
SWAP_S_PER_UNIT = 2.5e-7
_RELOCATE_S_PER_UNIT = 5e-8


def polish(
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
    stopped: Callable[[], bool] = lambda: False,
) -> IntArray:
    """Local search on one layer's [P] slot row; ``w`` is [K, E] (this layer's samples).

    Two neighbourhoods, best improvement, until ``stopped()``, ``deadline`` (``time.monotonic()``),
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
        return time.monotonic() < deadline and moves < limit and spent < work_s and not stopped()

    while go_on():
        while go_on() and state.best_swap():
            moves += 1
            spent += SWAP_S_PER_UNIT * S * row.size * K
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
        self.time_model = TimeModel(cluster)
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
        ta = self.time_model.time_on(self.loads[:, ga] + d, ga)
        tb = self.time_model.time_on(self.loads[:, gb] - d, gb)
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
