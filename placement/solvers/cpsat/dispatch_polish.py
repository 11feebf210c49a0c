"""Swap local search for a speed-aware dispatcher (``dispatch="speed-aware"``), speed factors."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from placement.model import FloatArray, IntArray


def flex_polish(
    w: FloatArray,
    row: IntArray,
    speeds: FloatArray,
    S: int,
    deadline: float,
    max_moves: int,
    stopped: Callable[[], bool] = lambda: False,
) -> IntArray:
    """Swap local search for a speed-aware dispatcher (best split over copies), speed factors;
    until ``deadline`` (``time.monotonic()``), ``max_moves`` moves or ``stopped()``.

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
        if time.monotonic() >= deadline or stopped():
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
