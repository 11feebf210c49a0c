"""A placement problem: model shape, GPUs, slot count, load (mean, samples, transitions).

Array shapes: ``load`` [L, E] tokens per expert over the calibration window; ``samples``
[K, L, E] tokens per expert in K load samples, on ``load``'s scale (the spread the expected or
robust objective hedges against: by default bootstrap samples of the mean from
:func:`placement.load.estimate`, or the sub-windows themselves); ``transitions`` [L-1, E, E]
tokens with expert i in layer l and j in layer l+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from placement.model import Cluster, FloatArray, MoEModelShape, Placement


@dataclass(frozen=True)
class Weights:
    """Objective weights. ``traffic``: µs (or token-time) per token that changes GPU between
    consecutive layers; ``migration``: cost of one moved copy in the same unit."""

    traffic: float = 0.0
    migration: float = 0.0


@dataclass(frozen=True)
class Problem:
    model: MoEModelShape
    cluster: Cluster
    slots_per_gpu: int
    load: FloatArray
    samples: FloatArray | None = None
    transitions: FloatArray | None = None
    current: Placement | None = None
    weights: Weights = field(default_factory=Weights)

    def __post_init__(self) -> None:
        L, E, G = self.model.moe_layers, self.model.experts, self.cluster.size
        load = np.asarray(self.load, dtype=np.float64)
        object.__setattr__(self, "load", load)
        if load.shape != (L, E):
            raise ValueError(f"load has shape {load.shape}, expected (layers={L}, experts={E})")
        if (load < 0).any() or not np.isfinite(load).all():
            raise ValueError("load must be finite and non-negative")
        if self.num_slots < E:
            raise ValueError(f"{G} GPUs x {self.slots_per_gpu} slots < {E} experts")
        if self.slots_per_gpu > E:
            raise ValueError(
                f"{self.slots_per_gpu} slots per GPU > {E} experts: some GPU would hold a "
                "duplicate copy"
            )
        if self.samples is not None:
            samples = np.asarray(self.samples, dtype=np.float64)
            object.__setattr__(self, "samples", samples)
            if samples.ndim != 3 or samples.shape[1:] != (L, E):
                raise ValueError(f"samples has shape {samples.shape}, expected (K, {L}, {E})")
        if self.transitions is not None:
            trans = np.asarray(self.transitions, dtype=np.float64)
            object.__setattr__(self, "transitions", trans)
            if trans.shape != (max(L - 1, 0), E, E):
                raise ValueError(
                    f"transitions has shape {trans.shape}, expected ({L - 1}, {E}, {E})"
                )
        if self.current is not None and (
            self.current.num_gpus != G or self.current.slots_per_gpu != self.slots_per_gpu
        ):
            raise ValueError("current placement has a different GPU count or slot count")

    @property
    def num_slots(self) -> int:
        return self.cluster.size * self.slots_per_gpu

    @property
    def redundant(self) -> int:
        return self.num_slots - self.model.experts

    @classmethod
    def build(
        cls,
        model: MoEModelShape,
        cluster: Cluster,
        load: FloatArray,
        redundant: int = 0,
        **kwargs: object,
    ) -> Problem:
        """Problem with ``E + redundant`` slots, which must divide evenly over the GPUs."""
        total = model.experts + redundant
        if redundant < 0 or total % cluster.size:
            raise ValueError(
                f"experts + redundant = {total} slots do not divide over {cluster.size} GPUs"
            )
        return cls(model, cluster, total // cluster.size, load, **kwargs)  # type: ignore[arg-type]
