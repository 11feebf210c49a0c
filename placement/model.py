"""Problem model: the MoE model shape, the GPUs and their performance, the placement.

Shapes used throughout the library:
    L  MoE layers, E routed experts per layer, G GPUs, P physical slots (P = E + redundant),
    S  slots per GPU (P = G * S). Slot ``s`` lives on GPU ``s // S`` (EPLB/SGLang convention).

Units: token counts are tokens; times are microseconds when a GPU has a latency curve and
"nominal token-times" (tokens / speed) when it only has a speed factor. A problem never mixes
the two: either every GPU has a curve or none does.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cached_property
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

PLACEMENT_API_VERSION: Literal["moeplace.io/v1alpha1"] = "moeplace.io/v1alpha1"
PositiveInt = Annotated[int, Field(gt=0)]
MAX_EXPERT_ID = 2**31 - 1  # int32, as the engines' expert maps hold them


class Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, alias_generator=to_camel
    )


class MoEModelShape(Frozen):
    """The model's MoE shape; ``dense_layers_before`` pads SGLang's per-hidden-layer map."""

    name: str = "model"
    moe_layers: PositiveInt
    experts: PositiveInt
    top_k: PositiveInt = 1
    expert_bytes: int = Field(default=0, ge=0)
    dense_layers_before: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEModelShape:
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class LatencyCurve(Frozen):
    """Measured latency of one expert FFN batch on one GPU, as a function of tokens.

    Sampled at tile boundaries; evaluated by piecewise-linear interpolation, and linearly
    extrapolated past the last sample (cost per token of the last segment).
    """

    tokens: list[int] = Field(min_length=2)
    micros: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _check(self) -> LatencyCurve:
        if len(self.tokens) != len(self.micros):
            raise ValueError("tokens and micros must have the same length")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)):
            raise ValueError("curve token counts must be strictly increasing")
        if self.tokens[0] < 0 or not all(0 <= m < math.inf for m in self.micros):
            raise ValueError("curve token counts and latencies must be finite and non-negative")
        return self

    def time(self, tokens: npt.ArrayLike) -> FloatArray:
        """Latency in µs for ``tokens`` (any shape), zero for zero tokens."""
        x = np.asarray(tokens, dtype=np.float64)
        xs = np.asarray(self.tokens, dtype=np.float64)
        ys = np.asarray(self.micros, dtype=np.float64)
        y = np.interp(x, xs, ys)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        y = np.where(x > xs[-1], ys[-1] + (x - xs[-1]) * slope, y)
        return np.asarray(np.where(x <= 0, 0.0, y), dtype=np.float64)


class GPU(Frozen):
    """One GPU of the expert-parallel group. ``speed``: 1.0 nominal, higher is faster."""

    node: str
    speed: float = Field(default=1.0, gt=0)
    curve: LatencyCurve | None = None

    def time(self, tokens: npt.ArrayLike) -> FloatArray:
        """Time to process ``tokens`` on this GPU (µs with a curve, token-times otherwise)."""
        if self.curve is not None:
            return self.curve.time(tokens)
        return np.asarray(np.asarray(tokens, dtype=np.float64) / self.speed, dtype=np.float64)


class Cluster(Frozen):
    """The GPUs of one EP group in slot order (GPU g holds slots g*S .. g*S+S-1)."""

    gpus: list[GPU] = Field(min_length=1)

    @model_validator(mode="after")
    def _curves_all_or_none(self) -> Cluster:
        with_curve = sum(g.curve is not None for g in self.gpus)
        if 0 < with_curve < len(self.gpus):
            raise ValueError("either every GPU has a latency curve or none does")
        return self

    @property
    def size(self) -> int:
        return len(self.gpus)

    @property
    def has_curves(self) -> bool:
        return self.gpus[0].curve is not None

    @cached_property
    def speeds(self) -> FloatArray:
        """[G] relative speed factors (from curves: inverse of the marginal cost at scale)."""
        if not self.has_curves:
            return np.array([g.speed for g in self.gpus], dtype=np.float64)
        probe = 4096.0
        per_token = np.array([float(g.time(probe)) / probe for g in self.gpus])
        return np.asarray(per_token.mean() / per_token, dtype=np.float64)

    @cached_property
    def nodes(self) -> list[str]:
        """Distinct node names in first-seen order."""
        return list(dict.fromkeys(g.node for g in self.gpus))

    @cached_property
    def node_of_gpu(self) -> IntArray:
        """[G] index into ``nodes`` of each GPU's node."""
        order = {n: i for i, n in enumerate(self.nodes)}
        return np.array([order[g.node] for g in self.gpus], dtype=np.int64)

    def times(self, loads: npt.ArrayLike) -> FloatArray:
        """Per-GPU time for ``loads`` of shape [..., G] (tokens per GPU)."""
        arr = np.asarray(loads, dtype=np.float64)
        return np.stack([g.time(arr[..., i]) for i, g in enumerate(self.gpus)], axis=-1)

    @classmethod
    def uniform(
        cls, num_gpus: int, gpus_per_node: int = 8, speeds: list[float] | None = None
    ) -> Cluster:
        """``num_gpus`` GPUs, ``gpus_per_node`` to a node, with optional speed factors."""
        speeds = speeds if speeds is not None else [1.0] * num_gpus
        if len(speeds) != num_gpus:
            raise ValueError(f"got {len(speeds)} speeds for {num_gpus} GPUs")
        return cls(
            gpus=[GPU(node=f"node-{g // gpus_per_node}", speed=s) for g, s in enumerate(speeds)]
        )


class Placement(Frozen):
    """Which logical expert each physical slot holds, per MoE layer.

    ``phy2log[l][s]`` = logical expert in slot ``s`` of layer ``l``; slot ``s`` is on GPU
    ``s // slots_per_gpu``. Shape [L, P]. Validity is checked by :func:`placement.validate`.
    """

    api_version: Literal["moeplace.io/v1alpha1"] = PLACEMENT_API_VERSION
    kind: Literal["ExpertPlacement"] = "ExpertPlacement"
    model: MoEModelShape
    num_gpus: PositiveInt
    slots_per_gpu: PositiveInt
    phy2log: list[list[int]] = Field(alias="phy2log")
    strategy: str = "unknown"
    metadata: dict[str, str | float | int] = Field(default_factory=dict)

    @field_validator("phy2log")
    @classmethod
    def _rectangular(cls, v: list[list[int]]) -> list[list[int]]:
        if not v or len({len(row) for row in v}) != 1:
            raise ValueError("phy2log must be a non-empty rectangular [layers][slots] table")
        # numpy holds the table as int64: a larger value (from a hand-edited file) must be
        # refused here, not overflow later
        if not all(0 <= e <= MAX_EXPERT_ID for row in v for e in row):
            raise ValueError(f"phy2log entries must be expert ids in 0..{MAX_EXPERT_ID}")
        return v

    def __eq__(self, other: object) -> bool:
        # field-wise: the cached ``table`` array must not take part (arrays have no truth value)
        if not isinstance(other, Placement):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(self.content_hash())

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    @cached_property
    def table(self) -> IntArray:
        """[L, P] phy2log as an array."""
        return np.asarray(self.phy2log, dtype=np.int64)

    def replica_counts(self) -> IntArray:
        """[L, E] number of copies of each logical expert."""
        t = self.table
        out = np.zeros((t.shape[0], self.model.experts), dtype=np.int64)
        for layer in range(t.shape[0]):
            np.add.at(out[layer], t[layer], 1)
        return out

    def gpu_of_slot(self) -> IntArray:
        """[P] GPU index of each slot."""
        return np.arange(self.num_slots, dtype=np.int64) // self.slots_per_gpu

    def content_hash(self) -> str:
        """Stable hash of what serving needs (shape + table), independent of metadata."""
        body = json.dumps(
            {"model": self.model.model_dump(), "gpus": self.num_gpus, "phy2log": self.phy2log},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """Canonical placement JSON (camelCase keys, versioned)."""
        return self.model_dump_json(by_alias=True, indent=None)

    @classmethod
    def from_table(
        cls,
        table: npt.ArrayLike,
        model: MoEModelShape,
        num_gpus: int,
        strategy: str,
        **metadata: str | float | int,
    ) -> Placement:
        arr = np.asarray(table, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] % num_gpus:
            raise ValueError(f"table of shape {arr.shape} does not split over {num_gpus} GPUs")
        return cls(
            model=model,
            num_gpus=num_gpus,
            slots_per_gpu=arr.shape[1] // num_gpus,
            phy2log=arr.tolist(),
            strategy=strategy,
            metadata=dict(metadata),
        )
