"""Loaders for the GPUs input: a ``GPUS.csv`` of speed factors or a versioned GPU-profile JSON
with measured latency curves, plus builders for the shared measurement sets (PAL speed factors,
H200 expert-FFN curves).

``GPUS.csv`` has one row per GPU, columns ``gpu,node,speed`` (extra columns are ignored):
``gpu`` is the GPU's index in the expert-parallel group (0..G-1, each once; slot ``s`` lives
on GPU ``s // S``), ``node`` its node name, ``speed`` its relative speed (1.0 nominal, higher
is faster)::

    gpu,node,speed
    0,node-0,1.00
    1,node-0,0.95

The GPU profile (``apiVersion: moeplace.io/v1alpha1``, ``kind: GPUProfile``; camelCase keys)::

    {"apiVersion": "moeplace.io/v1alpha1", "kind": "GPUProfile",
     "takenAt": "2026-11-22T05:00:00Z",                          # optional, ISO 8601
     "expertShape": {"name": "mixtral-8x7b", "hidden": 4096,      # optional: what was timed
                     "intermediate": 14336, "dtype": "bf16"},
     "gpus": [{"gpu": 0, "node": "n0", "speed": 1.02,             # speed optional (1.0)
               "curve": {"tokens": [8, 16, ...], "micros": [97.1, 97.4, ...]}}]}

``curve`` (µs for one expert FFN over ``tokens`` tokens, piecewise-linear) is optional, but
either every GPU has one or none does (then times are token-times, tokens / speed).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from placement.model import GPU, PLACEMENT_API_VERSION, Cluster, Frozen, LatencyCurve

GPU_PROFILE_KIND: Literal["GPUProfile"] = "GPUProfile"
GPUS_CSV_COLUMNS = ("gpu", "node", "speed")
PAL_CLASSES = ("A", "B", "C", "D")
H200_SHAPES = {
    "deepseek-v2-lite": (2048, 1408),
    "mixtral-8x7b": (4096, 14336),
    "deepseek-v3": (7168, 2048),
}


class GPUInputError(ValueError):
    """A GPUs file that cannot be used; the message names the file and what is wrong."""


class ExpertShape(Frozen):
    """The expert FFN that was timed (SwiGLU: hidden x intermediate)."""

    name: str = "expert"
    hidden: int = Field(default=0, ge=0)
    intermediate: int = Field(default=0, ge=0)
    dtype: str = "bf16"


class ProfiledGPU(Frozen):
    """One GPU of a profile: its index in the EP group, node, speed and optional curve."""

    gpu: int = Field(ge=0)
    node: str = Field(min_length=1)
    speed: float = Field(default=1.0, gt=0)
    curve: LatencyCurve | None = None


class GPUProfile(Frozen):
    """A versioned, measured description of the GPUs of one expert-parallel group."""

    api_version: Literal["moeplace.io/v1alpha1"] = PLACEMENT_API_VERSION
    kind: Literal["GPUProfile"] = GPU_PROFILE_KIND
    taken_at: datetime | None = None
    expert_shape: ExpertShape | None = None
    gpus: list[ProfiledGPU] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> GPUProfile:
        _check_indices([g.gpu for g in self.gpus])
        with_curve = sum(g.curve is not None for g in self.gpus)
        if 0 < with_curve < len(self.gpus):
            raise ValueError("either every GPU has a latency curve or none does")
        return self

    def to_cluster(self) -> Cluster:
        """The cluster, GPUs in index order."""
        ordered = sorted(self.gpus, key=lambda g: g.gpu)
        return Cluster(gpus=[GPU(node=g.node, speed=g.speed, curve=g.curve) for g in ordered])

    @classmethod
    def from_cluster(
        cls,
        cluster: Cluster,
        expert_shape: ExpertShape | None = None,
        taken_at: datetime | None = None,
    ) -> GPUProfile:
        gpus = [
            ProfiledGPU(gpu=i, node=g.node, speed=g.speed, curve=g.curve)
            for i, g in enumerate(cluster.gpus)
        ]
        return cls(gpus=gpus, expert_shape=expert_shape, taken_at=taken_at)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)


def _check_indices(indices: Sequence[int]) -> None:
    if sorted(indices) != list(range(len(indices))):
        raise ValueError(
            f"gpu indices must be 0..{len(indices) - 1}, each once; got {sorted(indices)[:10]}"
        )


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def load_profile(path: str | Path) -> GPUProfile:
    """Read and validate a GPU-profile JSON."""
    p = Path(path)
    try:
        return GPUProfile.model_validate_json(p.read_bytes())
    except ValidationError as err:
        raise GPUInputError(f"{p}: not a valid GPU profile: {_first_error(err)}") from err
    except OSError as err:
        raise GPUInputError(f"{p}: cannot read: {err.strerror}") from err


def _parse_row(row: dict[str, str], line: int, p: Path) -> tuple[int, str, float]:
    try:
        gpu, node, speed = int(row["gpu"]), row["node"].strip(), float(row["speed"])
    except (TypeError, ValueError) as err:
        raise GPUInputError(f"{p}:{line}: gpu must be an integer and speed a number") from err
    if not node:
        raise GPUInputError(f"{p}:{line}: empty node name")
    if not (math.isfinite(speed) and speed > 0):
        raise GPUInputError(f"{p}:{line}: speed must be a positive number, got {speed}")
    return gpu, node, speed


def read_gpus_csv(path: str | Path) -> Cluster:
    """Read ``GPUS.csv`` (columns ``gpu,node,speed``) into a cluster in GPU-index order."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in GPUS_CSV_COLUMNS if c not in header]
            if missing:
                raise GPUInputError(
                    f"{p}: missing column(s) {', '.join(missing)}; "
                    f"expected {','.join(GPUS_CSV_COLUMNS)}"
                )
            reader.fieldnames = header
            rows = [_parse_row(r, i + 2, p) for i, r in enumerate(reader)]
    except OSError as err:
        raise GPUInputError(f"{p}: cannot read: {err.strerror}") from err
    if not rows:
        raise GPUInputError(f"{p}: no GPUs listed")
    try:
        _check_indices([r[0] for r in rows])
    except ValueError as err:
        raise GPUInputError(f"{p}: {err}") from err
    rows.sort()
    return Cluster(gpus=[GPU(node=node, speed=speed) for _, node, speed in rows])


def write_gpus_csv(cluster: Cluster, path: str | Path) -> None:
    """Write a cluster's speed factors as ``GPUS.csv`` (curves are not kept: use a profile)."""
    with Path(path).open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(GPUS_CSV_COLUMNS)
        for i, g in enumerate(cluster.gpus):
            out.writerow([i, g.node, repr(g.speed)])


def _is_json(p: Path) -> bool:
    if p.suffix.lower() == ".json":
        return True
    try:
        with p.open("rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False


def load_cluster(path: str | Path) -> Cluster:
    """The cluster from a GPUs file: a GPU-profile JSON (``.json`` or content starting with
    ``{``) or a ``GPUS.csv``."""
    p = Path(path)
    if not p.is_file():
        raise GPUInputError(f"{p}: no such file")
    if _is_json(p):
        return load_profile(p).to_cluster()
    return read_gpus_csv(p)


# --- builders for the shared measurement sets -------------------------------------------------


def pal_cluster(path: str | Path, perf_class: str = "A", num_gpus: int | None = None) -> Cluster:
    """Cluster from PAL's ``32gpu-variability.csv``: speed = 1 / PerfVar_class<X>, one node per
    ``Node_ID`` (named ``node-<id>``), GPUs in ``GPU_ID`` order; the first ``num_gpus`` if given.
    """
    p = Path(path)
    if perf_class not in PAL_CLASSES:
        raise GPUInputError(f"PAL class must be one of {PAL_CLASSES}, got {perf_class!r}")
    column = f"PerfVar_class{perf_class}"
    try:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
        parsed = sorted(
            (int(r["GPU_ID"]), f"node-{int(r['Node_ID'])}", 1.0 / float(r[column])) for r in rows
        )
    except OSError as err:
        raise GPUInputError(f"{p}: cannot read: {err.strerror}") from err
    except (KeyError, ValueError, ZeroDivisionError) as err:
        raise GPUInputError(f"{p}: not a PAL variability file ({err})") from err
    if num_gpus is not None:
        if not 0 < num_gpus <= len(parsed):
            raise GPUInputError(f"{p}: has {len(parsed)} GPUs, asked for {num_gpus}")
        parsed = parsed[:num_gpus]
    return Cluster(gpus=[GPU(node=node, speed=speed) for _, node, speed in parsed])


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def h200_curves(path: str | Path, shape: str = "mixtral-8x7b") -> list[LatencyCurve]:
    """Per-GPU latency curves (median over rounds) from ``expert_ffn_latency_graphs.json``."""
    p = Path(path)
    if shape not in H200_SHAPES:
        raise GPUInputError(f"expert shape must be one of {sorted(H200_SHAPES)}, got {shape!r}")
    try:
        data = json.loads(p.read_bytes())
        tokens: list[int] = [int(t) for t in data["tokens"]]
        rounds = [r["us"] for r in data["rounds"]]
        return [
            LatencyCurve(
                tokens=tokens,
                micros=[_median([float(r[f"{g}|{shape}|{t}"]) for r in rounds]) for t in tokens],
            )
            for g in range(len(data["gpus"]))
        ]
    except OSError as err:
        raise GPUInputError(f"{p}: cannot read: {err.strerror}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise GPUInputError(f"{p}: not an H200 latency-graphs file ({err})") from err


def h200_profile(
    path: str | Path,
    shape: str = "mixtral-8x7b",
    num_gpus: int | None = None,
    gpus_per_node: int = 8,
) -> GPUProfile:
    """GPU profile with the measured H200 curves. With ``num_gpus`` larger than the GPUs
    measured, the measured curves repeat in turn (GPU g gets curve g mod measured): a stand-in
    for a larger cluster, not a measurement of one."""
    curves = h200_curves(path, shape)
    count = num_gpus if num_gpus is not None else len(curves)
    if count <= 0 or gpus_per_node <= 0:
        raise GPUInputError("num_gpus and gpus_per_node must be positive")
    hidden, intermediate = H200_SHAPES[shape]
    gpus = [
        ProfiledGPU(gpu=g, node=f"node-{g // gpus_per_node}", curve=curves[g % len(curves)])
        for g in range(count)
    ]
    return GPUProfile(
        expert_shape=ExpertShape(name=shape, hidden=hidden, intermediate=intermediate),
        gpus=gpus,
    )
