"""Which token counts to time: a tile-boundary sampling plan (GEM).

A GEMM kernel covers the M = tokens dimension in tiles (64 or 128 rows on Hopper for bf16) and
runs its tiles in waves over the SMs, so latency is a staircase in the token count: flat inside
a tile, a step at each multiple of the tile, a larger step where a new wave starts. Timing every
count wastes the budget; timing at the multiples of the tile catches every step's value (a count
of ``n`` tokens costs what the next multiple costs: the kernel pads the last tile).

Step heights shrink relative to the latency as counts grow (one tile more is 1/n of the work),
so the spacing widens geometrically: every 64 up to 256, every 128 to 512, every 256 to 1024,
then 512 and 1024. Below one tile the curve is flat (launch- and weight-read-bound); 1, 16 and 32
anchor it. The default plan to 4096 has 15 counts, which fits the 60 s per GPU budget with
CUDA-graph timing and several rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TILE = 64
DEFAULT_SMALL: tuple[int, ...] = (1, 16, 32)


def tile_plan(
    max_tokens: int = 4096,
    tile: int = DEFAULT_TILE,
    small: Sequence[int] = DEFAULT_SMALL,
    steps_per_octave: int = 2,
) -> list[int]:
    """Token counts at tile multiples, spacing doubling every octave above 4 tiles.

    With ``steps_per_octave=2`` and ``tile=64``: 1, 16, 32, 64, 128, 192, 256, 384, 512, 768,
    1024, 1536, 2048, 3072, 4096. ``max_tokens`` is always the last count.
    """
    if max_tokens < 1 or tile < 1 or steps_per_octave < 1:
        raise ValueError("max_tokens, tile and steps_per_octave must be positive")
    counts = {t for t in small if 0 < t < min(tile, max_tokens)}
    t, step = tile, tile
    while t <= max_tokens:
        counts.add(t)
        if t >= 4 * tile and t >= step * 2 * steps_per_octave:
            step *= 2
        t += step
    counts.add(max_tokens)
    return sorted(counts)


def window_plan(
    center: int,
    lo: int = 0,
    hi: int | None = None,
    tile: int = 128,
    points: int = 16,
) -> list[int]:
    """Counts for a whole-GPU (layer) curve, dense where the GPU's load will be.

    Half of the points are spread evenly (tile multiples) over ``[center/2, 3*center/2]``,
    the rest geometrically over ``[tile, lo..hi]`` so extrapolation is anchored at both ends.
    """
    if center < tile:
        raise ValueError("center must be at least one tile")
    hi = hi if hi is not None else 2 * center
    dense = max(points // 2, 2)
    a, b = max(center // 2, tile), min(3 * center // 2, hi)
    out = {max(tile, round((a + (b - a) * i / (dense - 1)) / tile) * tile) for i in range(dense)}
    t = tile
    while t < hi:
        out.add(t)
        t *= 2
    out.add(round(hi / tile) * tile)
    if lo > 0:
        out.add(max(tile, round(lo / tile) * tile))
    return sorted(x for x in out if x > 0)


def split_tokens(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` tokens over experts proportionally to ``weights`` (largest remainder),
    so a layer-curve measurement sees a realistic per-expert spread. Sum is exactly ``total``."""
    if total < 0:
        raise ValueError("total must be non-negative")
    wsum = float(sum(weights))
    if not weights or wsum <= 0 or any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative with a positive sum")
    exact = [total * w / wsum for w in weights]
    base = [int(x) for x in exact]
    rest = total - sum(base)
    order = sorted(range(len(weights)), key=lambda i: (base[i] - exact[i], i))
    for i in order[:rest]:
        base[i] += 1
    return base
