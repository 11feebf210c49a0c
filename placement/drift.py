"""When to profile again (ViBE: GPU speeds drift with thermals, power caps, co-located work).

Per-GPU speed drift (:func:`speed_drift`, what the operator checks on every reconcile; the
schedule is the profiler's own interval): each rank of the EP group reports the expert compute
time and the token-expert pairs it processed (serving's ``moe_layer_compute_seconds_total`` and
``moe_layer_tokens_total``, summed over layers and over a window). Rank ``r`` is GPU ``r`` of
the group (the operator's slot order: nodes by name, GPU index within the node). A rank's
throughput ``tokens_r / seconds_r`` (token-expert pairs per second), normalised to mean 1 over
the group, is its measured relative speed; the published speed labels normalised to mean 1 over
the same GPUs are the predicted ones; ``drift_r = measured_r / label_r - 1`` (dimensionless:
-0.2 means 20% slower than its label says relative to the others). Only relative speeds are
compared, so a change that slows every GPU alike (a bigger batch, a new model version) is not
drift: placement depends on the ratios only.

Caveat of the throughput measure: time per token also depends on how many tokens a GPU gets
(a latency curve is not linear at small batches), so ranks with very different loads differ
a little in throughput at equal speed; the threshold (10% by default in the operator) is well
above that on balanced placements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from placement.model import FloatArray

MIN_TOKENS_PER_RANK = 1000.0  # token-expert pairs in the window: fewer is too little to judge
MIN_RANKS = 2  # a relative speed needs at least two GPUs


@dataclass(frozen=True)
class SpeedDrift:
    """Per-GPU comparison of measured and published relative speeds; arrays are [G] in the
    group's slot order, NaN for GPUs without enough data (``valid`` False)."""

    measured: FloatArray  # tokens/s normalised to mean 1 over the valid GPUs
    labelled: FloatArray  # speed labels normalised to mean 1 over the valid GPUs
    drift: FloatArray  # measured / labelled - 1
    valid: npt.NDArray[np.bool_]

    def beyond(self, threshold: float) -> list[int]:
        """GPU indices with ``|drift| > threshold`` (a fraction: 0.1 is 10%), worst first."""
        if threshold <= 0:
            return []
        over = np.flatnonzero(self.valid & (np.abs(np.nan_to_num(self.drift)) > threshold))
        return sorted((int(g) for g in over), key=lambda g: -abs(float(self.drift[g])))

    @property
    def largest(self) -> float:
        """The drift of largest magnitude (signed); NaN when no GPU is valid."""
        if not self.valid.any():
            return math.nan
        values = self.drift[self.valid]
        return float(values[int(np.argmax(np.abs(values)))])


def speed_drift(
    labels: npt.ArrayLike,
    seconds: npt.ArrayLike,
    tokens: npt.ArrayLike,
    min_tokens: float = MIN_TOKENS_PER_RANK,
) -> SpeedDrift | None:
    """Measured vs labelled relative speed per GPU.

    ``labels`` [G]: published relative speeds (> 0); ``seconds`` [G]: expert compute seconds of
    each rank over the window; ``tokens`` [G]: token-expert pairs each rank computed in the same
    window. A GPU counts when it has ``tokens >= min_tokens``, ``seconds > 0`` and a positive
    label (all finite); both sides are normalised over the GPUs that count. Returns None when
    fewer than :data:`MIN_RANKS` count (no drift claim: too little data)."""
    lab = np.asarray(labels, dtype=np.float64)
    sec = np.asarray(seconds, dtype=np.float64)
    tok = np.asarray(tokens, dtype=np.float64)
    if not (lab.shape == sec.shape == tok.shape) or lab.ndim != 1:
        raise ValueError(
            f"labels, seconds and tokens must be [G] of one length: {lab.shape}, {sec.shape}, "
            f"{tok.shape}"
        )
    with np.errstate(invalid="ignore"):
        valid = (
            np.isfinite(lab) & np.isfinite(sec) & np.isfinite(tok)
            & (lab > 0) & (sec > 0) & (tok >= min_tokens) & (tok > 0)
        )  # fmt: skip
    if int(valid.sum()) < MIN_RANKS:
        return None
    nan = np.full(lab.shape, np.nan)
    throughput = np.where(valid, tok / np.where(valid, sec, 1.0), np.nan)
    measured = np.where(valid, throughput / np.nanmean(throughput), nan)
    labelled = np.where(valid, lab / lab[valid].mean(), nan)
    drift = np.where(valid, measured / np.where(valid, labelled, 1.0) - 1.0, nan)
    return SpeedDrift(
        np.asarray(measured, dtype=np.float64),
        np.asarray(labelled, dtype=np.float64),
        np.asarray(drift, dtype=np.float64),
        valid,
    )
