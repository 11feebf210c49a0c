"""Nodes as the operator sees them: GPU speeds from labels, latency curves from an annotation,
and the EP group a MoEDeployment's nodeSelector picks out of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from moeplace_operator.spec import GPUSpec
from placement.model import GPU, Cluster, LatencyCurve
from placement.names import CURVES_ANNOTATION, SPEED_LABEL_PREFIX

# Speeds are relative to the pool's nominal GPU (spreads of 1-20% are what is measured); a
# value outside (0, 100] is a unit or publishing error, not a GPU 1e300 times faster.
MAX_RELATIVE_SPEED = 100.0
_SPEED = TypeAdapter(Annotated[float, Field(gt=0, le=MAX_RELATIVE_SPEED, allow_inf_nan=False)])
_SPEED_LABEL = re.compile(re.escape(SPEED_LABEL_PREFIX) + r"(\d+)$")


class NodeGPUs(BaseModel):
    """What the operator keeps of a Node: its labels and the per-GPU measurements."""

    model_config = ConfigDict(frozen=True)

    name: str
    labels: dict[str, str]
    speeds: dict[int, float]
    curves: dict[int, LatencyCurve] = {}
    usable: bool = True  # Ready and not cordoned: only such nodes join an EP group

    def fingerprint(self) -> str:
        """Changes exactly when what placement depends on changes (not on heartbeats)."""
        return self.model_dump_json()


def has_gpu_labels(labels: Mapping[str, str]) -> bool:
    return any(_SPEED_LABEL.match(key) for key in labels)


def parse_speeds(labels: Mapping[str, str]) -> dict[int, float]:
    """GPU index -> relative speed from ``gpu.moeplace.io/speed-<index>`` labels; values that
    are not a finite number in (0, MAX_RELATIVE_SPEED] are skipped (that GPU then counts as
    unprofiled, which status reports)."""
    speeds: dict[int, float] = {}
    for key, value in labels.items():
        match = _SPEED_LABEL.match(key)
        if not match:
            continue
        try:
            speeds[int(match.group(1))] = _SPEED.validate_python(value)
        except ValidationError:
            continue
    return speeds


def parse_curves(annotation: str | None) -> dict[int, LatencyCurve]:
    """``{"<gpu index>": {"tokens": [...], "micros": [...]}}``; malformed input yields none
    (falling back to speed labels beats failing the whole EP group)."""
    if not annotation:
        return {}
    try:
        raw = json.loads(annotation)
        return {int(k): LatencyCurve.model_validate(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError, ValidationError):
        return {}


def is_usable(spec: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """Not cordoned (``spec.unschedulable``) and its Ready condition True."""
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ready and not spec.get("unschedulable", False)


def node_gpus(
    name: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    usable: bool = True,
) -> NodeGPUs:
    return NodeGPUs(
        name=name,
        labels=dict(labels),
        speeds=parse_speeds(labels),
        curves=parse_curves(annotations.get(CURVES_ANNOTATION)),
        usable=usable,
    )


class NodesUnavailableError(Exception):
    """The EP group cannot be formed now; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class GPUGroup:
    cluster: Cluster
    nodes: list[str]
    unprofiled: list[str]  # "node/gpu" without a speed label

    @property
    def profiled(self) -> bool:
        return not self.unprofiled

    def gpu_name(self, gpu: int) -> tuple[str, int]:
        """(node, GPU index on the node) of GPU ``gpu`` of the group (= serving rank ``gpu``)."""
        per_node = self.cluster.size // len(self.nodes)
        return self.nodes[gpu // per_node], gpu % per_node


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def build_gpu_group(
    nodes: Iterable[NodeGPUs], spec: GPUSpec, current: Sequence[str] = ()
) -> GPUGroup:
    """``nodeCount`` selected, usable (Ready, not cordoned) nodes, ``gpusPerNode`` GPUs each,
    in slot order. Ranks are stable: ``current`` (the group of the placement in service, in
    rank order) keeps its nodes in their places; only a node that left or became unusable is
    replaced, by the first spare one by name (a new node that sorts earlier shifts nothing).
    Without a placement in service: the first ``nodeCount`` by name.

    Latency curves are used only when every GPU has one (a Cluster never mixes units)."""
    selected = [n for n in nodes if selects(spec.node_selector, n.labels)]
    usable = {n.name: n for n in selected if n.usable}
    if len(usable) < spec.node_count:
        unusable = len(selected) - len(usable)
        raise NodesUnavailableError(
            "NotEnoughNodes",
            f"{len(selected)} node(s) match nodeSelector {spec.node_selector}"
            + (f", {unusable} of them NotReady or cordoned" if unusable else "")
            + f", need {spec.node_count} usable",
        )
    kept = list(dict.fromkeys(current))[: spec.node_count]  # a repeated name counts once
    places = [name if name in usable else None for name in kept]
    places += [None] * (spec.node_count - len(places))
    spare = iter(sorted(set(usable) - set(places)))
    chosen = [usable[name if name is not None else next(spare)] for name in places]
    indices = range(spec.gpus_per_node)
    use_curves = all(i in n.curves for n in chosen for i in indices)
    gpus = [
        GPU(
            node=n.name,
            speed=n.speeds.get(i, 1.0),
            curve=n.curves[i] if use_curves else None,
        )
        for n in chosen
        for i in indices
    ]
    unprofiled = [f"{n.name}/{i}" for n in chosen for i in indices if i not in n.speeds]
    return GPUGroup(Cluster(gpus=gpus), [n.name for n in chosen], unprofiled)
