"""Robust statistics for latency measurements (numpy only; runs on the GPU machine too).

Shapes: a measurement is ``rounds`` repeated passes; each pass gives one median latency per
token count (the median of its timed replays). Across passes we take the median (robust to a
disturbed pass) with a bootstrap confidence interval, or the mean with a t interval.

GPU-to-GPU comparison uses *paired* passes: the GPUs are timed interleaved inside each pass,
so slow drifts (clocks, temperature) hit both alike and the per-pass log-ratio cancels them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# two-sided Student t quantiles for 95% (df 1..30); larger df use the normal 1.96
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (95% two-sided)."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Estimate:
    """A central value with a 95% confidence interval ``[lo, hi]`` and its relative half-width."""

    value: float
    lo: float
    hi: float
    n: int

    @property
    def rel_halfwidth(self) -> float:
        return 0.5 * (self.hi - self.lo) / self.value if self.value else math.inf

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "n": self.n}


def _clean(samples: Sequence[float] | FloatArray) -> FloatArray:
    arr = np.asarray(samples, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ValueError("no finite samples")
    return arr


def mean_t(samples: Sequence[float] | FloatArray, conf_t: float | None = None) -> Estimate:
    """Mean with a t-based 95% interval (exact for normal noise; a single sample gives an
    infinite interval)."""
    arr = _clean(samples)
    m = float(arr.mean())
    if arr.size < 2:
        return Estimate(m, -math.inf, math.inf, 1)
    half = (conf_t or t975(arr.size - 1)) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return Estimate(m, m - half, m + half, int(arr.size))


def median_boot(
    samples: Sequence[float] | FloatArray, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Median with a percentile-bootstrap 95% interval (deterministic for a given seed)."""
    arr = _clean(samples)
    med = float(np.median(arr))
    if arr.size < 2:
        return Estimate(med, -math.inf, math.inf, 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(resamples, arr.size))
    meds = np.median(arr[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return Estimate(med, float(lo), float(hi), int(arr.size))


@dataclass(frozen=True)
class Difference:
    """GPU b relative to GPU a at one token count: ``ratio`` = time_b / time_a (>1: b slower),
    its 95% interval from paired passes, and whether it is outside the noise."""

    ratio: float
    lo: float
    hi: float
    n: int
    significant: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "ratio": self.ratio,
            "lo": self.lo,
            "hi": self.hi,
            "n": self.n,
            "significant": self.significant,
        }


def paired_difference(
    a: Sequence[float] | FloatArray,
    b: Sequence[float] | FloatArray,
    min_effect: float = 0.01,
) -> Difference:
    """Is GPU b's time different from GPU a's beyond the noise?

    ``a[i]`` and ``b[i]`` were timed in the same pass. The per-pass log-ratio's mean gets a t
    interval; the difference is *significant* when that interval excludes 0 **and** the ratio
    differs from 1 by at least ``min_effect`` (a 0.3% difference may be real but is not worth
    moving experts for).
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError("paired samples need the same length")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if not ok.any():
        raise ValueError("no valid pairs")
    est = mean_t(np.log(y[ok] / x[ok]))
    ratio, lo, hi = math.exp(est.value), math.exp(est.lo), math.exp(est.hi)
    significant = (lo > 1.0 or hi < 1.0) and abs(ratio - 1.0) >= min_effect
    return Difference(ratio, lo, hi, est.n, significant)


def suffix_min(micros: Sequence[float] | FloatArray) -> FloatArray:
    """Monotone clean-up for the placement library: ``t*(n) = min over n' >= n of t(n')``.

    A measured curve is not monotone (a count just past a tile boundary can pick a faster
    kernel than the count before it; noise adds wiggles). A runtime can always pad a batch up to
    a count that is faster, so the suffix minimum is attainable and non-decreasing; solvers then
    never see "more tokens, less time"."""
    arr = np.asarray(micros, dtype=np.float64)
    return np.asarray(np.minimum.accumulate(arr[::-1])[::-1], dtype=np.float64)


def clean_curve(
    tokens: Sequence[int], micros: Sequence[float] | FloatArray
) -> tuple[list[int], list[float]]:
    """Sorted, de-duplicated, strictly positive, monotone (suffix-minimum) curve."""
    if len(tokens) != len(micros):
        raise ValueError("tokens and micros differ in length")
    pairs: dict[int, list[float]] = {}
    for t, m in zip(tokens, micros, strict=True):
        if t > 0 and math.isfinite(float(m)) and m > 0:
            pairs.setdefault(int(t), []).append(float(m))
    if len(pairs) < 2:
        raise ValueError("a curve needs at least two valid token counts")
    xs = sorted(pairs)
    ys = suffix_min([float(np.median(pairs[t])) for t in xs])
    return xs, [float(v) for v in ys]


def interp(tokens: Sequence[int], micros: Sequence[float], at: FloatArray) -> FloatArray:
    """Piecewise-linear latency with linear extrapolation past the last sample, 0 at 0 tokens:
    the placement library's curve semantics."""
    xs = np.asarray(tokens, dtype=np.float64)
    ys = np.asarray(micros, dtype=np.float64)
    x = np.asarray(at, dtype=np.float64)
    y = np.interp(x, xs, ys)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    y = np.where(x > xs[-1], ys[-1] + (x - xs[-1]) * slope, y)
    return np.asarray(np.where(x <= 0, 0.0, y), dtype=np.float64)


def load_weights(tokens: Sequence[int], typical: Sequence[float] | None = None) -> FloatArray:
    """Weight of each sampled count in a speed factor: the share of typical per-expert batches
    that fall nearest to it (``typical`` = observed token counts per expert call). Without
    observations, every count weighs the same."""
    xs = np.asarray(tokens, dtype=np.float64)
    if typical is None or len(typical) == 0:
        return np.full(xs.size, 1.0 / xs.size)
    obs = np.asarray(typical, dtype=np.float64)
    obs = obs[obs > 0]
    if obs.size == 0:
        return np.full(xs.size, 1.0 / xs.size)
    nearest = np.abs(np.log(obs[:, None]) - np.log(xs[None, :])).argmin(axis=1)
    w = np.bincount(nearest, minlength=xs.size).astype(np.float64)
    return np.asarray(w / w.sum(), dtype=np.float64)


def speed_factors(
    curves: Sequence[Sequence[float]] | FloatArray, weights: Sequence[float] | FloatArray
) -> FloatArray:
    """Relative speed per GPU from curves on common token counts: the load-weighted work of the
    mean GPU over this GPU's (``sum_t w_t * mean_g c_g(t) / sum_t w_t * c_g(t)``). The mean GPU
    is 1.0; higher is faster; weights say where the typical load is."""
    c = np.asarray(curves, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != w.size:
        raise ValueError(f"curves {c.shape} and weights {w.shape} do not match")
    if (c <= 0).any() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("curves must be positive and weights non-negative")
    work = c @ w
    ref = float(c.mean(axis=0) @ w)
    return np.asarray(ref / work, dtype=np.float64)


def relative_spread(samples: Sequence[float] | FloatArray) -> float:
    """(max - min) / median over passes: how stable one GPU is from pass to pass."""
    arr = _clean(samples)
    med = float(np.median(arr))
    return float((arr.max() - arr.min()) / med) if med else math.inf
