"""When to profile again (ViBE: speeds drift with thermals, power caps, co-located work).

Two triggers, both pure functions of what the operator already knows:
- **schedule**: the last profile is older than ``max_age_s``;
- **drift**: measured per-layer times (from the serving metrics) depart from the placement
  library's predictions for the same loads by more than ``threshold`` (relative), persistently:
  the median relative error over the last ``window`` observations, so one slow step (a GC pause,
  a preemption) does not trigger a re-profile. A ``cooldown_s`` after any profile keeps a
  flapping signal from re-profiling back to back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RecalibrationPolicy:
    max_age_s: float = 24 * 3600.0
    threshold: float = 0.10
    window: int = 20
    min_observations: int = 10
    cooldown_s: float = 600.0


@dataclass(frozen=True)
class Decision:
    reprofile: bool
    reason: str  # "schedule", "drift", "cooldown", "insufficient-data", "ok"
    drift: float  # median relative error (measured - predicted) / predicted; nan if unknown
    age_s: float


def relative_drift(
    measured: Sequence[float], predicted: Sequence[float], window: int
) -> tuple[float, int]:
    """Median of ``(measured - predicted) / predicted`` over the last ``window`` valid pairs."""
    m = np.asarray(measured, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if m.shape != p.shape:
        raise ValueError("measured and predicted must have the same length")
    ok = np.isfinite(m) & np.isfinite(p) & (p > 0)
    rel = ((m[ok] - p[ok]) / p[ok])[-window:] if window > 0 else np.empty(0)
    if rel.size == 0:
        return math.nan, 0
    return float(np.median(rel)), int(rel.size)


def decide(
    now_s: float,
    profiled_at_s: float,
    measured: Sequence[float],
    predicted: Sequence[float],
    policy: RecalibrationPolicy | None = None,
) -> Decision:
    """Should this GPU group be profiled again now? Times in seconds (any common epoch)."""
    pol = policy or RecalibrationPolicy()
    age = max(0.0, now_s - profiled_at_s)
    drift, n = relative_drift(measured, predicted, pol.window)
    if age >= pol.max_age_s:
        return Decision(True, "schedule", drift, age)
    if age < pol.cooldown_s:
        return Decision(False, "cooldown", drift, age)
    if n < pol.min_observations:
        return Decision(False, "insufficient-data", drift, age)
    if abs(drift) > pol.threshold:
        return Decision(True, "drift", drift, age)
    return Decision(False, "ok", drift, age)
