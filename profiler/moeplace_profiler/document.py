"""The versioned GPU-profile document, built from measurements and validated with the
placement library's model (:class:`placement.gpus.GPUProfile`), so what the profiler writes is
exactly what the solvers and the operator read.

A measurement is, per GPU, the per-pass median latency at each token count of the plan
(``passes[p][i]`` µs at ``tokens[i]`` in pass ``p``). The document keeps, per GPU, the median
over passes made monotone (:func:`moeplace_profiler.stats.clean_curve`) and a speed factor
(:func:`moeplace_profiler.stats.speed_factors`, weighted by where the typical load is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from moeplace_profiler.stats import clean_curve, load_weights, speed_factors
from placement.gpus import ExpertShape, GPUProfile, ProfiledGPU, load_profile
from placement.model import LatencyCurve


@dataclass(frozen=True)
class GPUMeasurement:
    """One GPU's timings: ``passes[p][i]`` = median µs at ``tokens[i]`` in pass ``p``."""

    gpu: int
    node: str
    tokens: list[int]
    passes: list[list[float]] = field(default_factory=list)

    def medians(self) -> list[float]:
        arr = np.asarray(self.passes, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(self.tokens) or arr.shape[0] == 0:
            raise ValueError(
                f"GPU {self.gpu}: passes must be [passes][{len(self.tokens)}], got {arr.shape}"
            )
        return [float(v) for v in np.nanmedian(arr, axis=0)]


def build_profile(
    measurements: Sequence[GPUMeasurement],
    expert_shape: ExpertShape | None = None,
    taken_at: datetime | None = None,
    typical_tokens: Sequence[float] | None = None,
) -> GPUProfile:
    """Profile document of ``measurements`` (all on the same token plan)."""
    if not measurements:
        raise ValueError("no GPUs measured")
    plan = measurements[0].tokens
    if any(m.tokens != plan for m in measurements):
        raise ValueError("every GPU must be measured on the same token counts")
    medians = [m.medians() for m in measurements]
    speeds = speed_factors(medians, load_weights(plan, typical_tokens))
    gpus = []
    for m, med, speed in zip(measurements, medians, speeds, strict=True):
        xs, ys = clean_curve(plan, med)
        gpus.append(
            ProfiledGPU(
                gpu=m.gpu,
                node=m.node,
                speed=round(float(speed), 5),
                curve=LatencyCurve(tokens=xs, micros=[round(y, 3) for y in ys]),
            )
        )
    return GPUProfile(
        taken_at=taken_at or datetime.now(UTC).replace(microsecond=0),
        expert_shape=expert_shape,
        gpus=gpus,
    )


def write_profile(profile: GPUProfile, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(profile.to_json() + "\n")
    return p


def read_profile(path: str | Path) -> GPUProfile:
    """Read and validate (raises :class:`placement.gpus.GPUInputError` with the reason)."""
    return load_profile(path)


def profile_from_dict(doc: dict[str, object]) -> GPUProfile:
    """Validate a document produced by the GPU scripts (plain JSON, camelCase)."""
    return GPUProfile.model_validate(doc)
