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
GPU_RESOURCE = "nvidia.com/gpu"  # the node capacity NVIDIA's device plugin publishes


class NodeGPUs(BaseModel):
    """What the operator keeps of a Node: its labels and the per-GPU measurements."""

    model_config = ConfigDict(frozen=True)

    name: str
    labels: dict[str, str]
    speeds: dict[int, float]
    curves: dict[int, LatencyCurve] = {}
    usable: bool = True  # Ready and not cordoned: only such nodes join an EP group
    # what an EP group refuses the node for (check_group_inputs)
    bad_speeds: dict[int, str] = {}  # GPU index -> the label value that is no speed
    bad_curves: str | None = None  # why the latency-curve annotation is unusable
    gpu_capacity: int | None = None  # nvidia.com/gpu in the node's capacity, when published

    def gpu_facts(self) -> dict[str, Any]:
        """What an EP group takes from the node apart from its labels (which only select)."""
        return self.model_dump(exclude={"labels"})


def has_gpu_labels(labels: Mapping[str, str]) -> bool:
    return any(_SPEED_LABEL.match(key) for key in labels)


def read_speeds(labels: Mapping[str, str]) -> tuple[dict[int, float], dict[int, str]]:
    """(GPU index -> relative speed, GPU index -> refused value) from the
    ``gpu.moeplace.io/speed-<index>`` labels: a value that is not a finite number in
    (0, MAX_RELATIVE_SPEED] is refused (an EP group with that node then degrades with
    BadSpeedLabels), never guessed."""
    speeds: dict[int, float] = {}
    refused: dict[int, str] = {}
    for key, value in labels.items():
        match = _SPEED_LABEL.match(key)
        if not match:
            continue
        try:
            speeds[int(match.group(1))] = _SPEED.validate_python(value)
        except ValidationError:
            refused[int(match.group(1))] = value
    return speeds, refused


def parse_speeds(labels: Mapping[str, str]) -> dict[int, float]:
    """GPU index -> relative speed, the valid speed labels only."""
    return read_speeds(labels)[0]


def read_curves(annotation: str | None) -> tuple[dict[int, LatencyCurve], str | None]:
    """``{"<gpu index>": {"tokens": [...], "micros": [...]}}`` -> (curves, None), or ({}, why)
    for a malformed annotation (an EP group with that node then degrades with
    BadLatencyCurves: a half-read profile must not silently become speed labels)."""
    if not annotation:
        return {}, None
    try:
        raw = json.loads(annotation)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object of GPU index -> curve")
        curves = {int(k): LatencyCurve.model_validate(v) for k, v in raw.items()}
    except ValidationError as error:  # its text quotes the input: name the fields only
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'curve'}: {e['msg']}"
            for e in error.errors()[:2]
        )
        return {}, f"invalid curve ({where})"
    except (ValueError, TypeError, AttributeError, RecursionError) as error:
        return {}, str(error)[:200]
    if any(index < 0 for index in curves):
        return {}, "GPU indices must be >= 0"
    return curves, None


def gpu_capacity(status: Mapping[str, Any]) -> int | None:
    """The node's ``nvidia.com/gpu`` capacity, when the device plugin publishes one."""
    value = (status.get("capacity") or {}).get(GPU_RESOURCE)
    try:
        return int(value) if value is not None else None
    except ValueError:  # a quantity such as "8k": not a GPU count we can compare
        return None


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
    capacity: int | None = None,
) -> NodeGPUs:
    speeds, bad_speeds = read_speeds(labels)
    curves, bad_curves = read_curves(annotations.get(CURVES_ANNOTATION))
    return NodeGPUs(
        name=name,
        labels=dict(labels),
        speeds=speeds,
        curves=curves,
        usable=usable,
        bad_speeds=bad_speeds,
        bad_curves=bad_curves,
        gpu_capacity=capacity,
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


def _listed(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def check_group_inputs(nodes: Iterable[NodeGPUs], spec: GPUSpec) -> None:
    """Refuse an EP group whose nodes publish GPU facts that cannot be right: a GPU count
    other than ``gpusPerNode`` (GPUCountMismatch), speed labels that are no speed
    (BadSpeedLabels), a malformed latency-curve annotation (BadLatencyCurves). Raises
    NodesUnavailableError naming the nodes and values; the placement in service stays."""
    chosen = list(nodes)
    per_node = spec.gpus_per_node
    mismatched = [
        f"{n.name} has {n.gpu_capacity} ({GPU_RESOURCE} capacity)"
        for n in chosen
        if n.gpu_capacity is not None and n.gpu_capacity != per_node
    ] + [
        f"{n.name} has speed labels for GPU {max(n.speeds)}"
        for n in chosen
        if n.gpu_capacity is None and n.speeds and max(n.speeds) >= per_node
    ]
    if mismatched:
        raise NodesUnavailableError(
            "GPUCountMismatch",
            f"gpus.gpusPerNode is {per_node} but {_listed(mismatched)}",
        )
    bad_speeds = [
        f"{n.name} {SPEED_LABEL_PREFIX}{index}={value!r}"
        for n in chosen
        for index, value in sorted(n.bad_speeds.items())
    ]
    if bad_speeds:
        raise NodesUnavailableError(
            "BadSpeedLabels",
            f"speed labels must be finite numbers in (0, {MAX_RELATIVE_SPEED:g}]: "
            f"{_listed(bad_speeds)}",
        )
    bad_curves = [f"{n.name}: {n.bad_curves}" for n in chosen if n.bad_curves]
    if bad_curves:
        raise NodesUnavailableError(
            "BadLatencyCurves", f"{CURVES_ANNOTATION} unusable on {_listed(bad_curves)}"
        )


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def can_change_group(
    selector: Mapping[str, str], before: NodeGPUs | None, after: NodeGPUs | None
) -> bool:
    """Whether a Node going from ``before`` to ``after`` (None: not a GPU node) can change
    the EP group of ``selector``: the node joins or leaves the selection, or a selected
    node's GPU facts or usability change. Labels the selector does not read change nothing
    (the group is built from the selected nodes only)."""
    was = before is not None and selects(selector, before.labels)
    now = after is not None and selects(selector, after.labels)
    if was != now:
        return True
    if not was or before is None or after is None:
        return False
    return before.gpu_facts() != after.gpu_facts()


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
