"""Observe: what one pass reads before deciding. The spec, the placement in service, the EP
group from the indexed Nodes, the load (Prometheus or a ConfigMap) and its layer-to-layer
transitions, per-rank speed measurements, a Pinned placement. Missing or bad inputs raise
``DegradedError`` with the condition that says so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from moeplace_operator.build import Published, placement_configmap_name, read_published
from moeplace_operator.loadsource import (
    LoadData,
    MetricsUnavailableError,
    PrometheusSource,
    fetch_prometheus,
    fetch_prometheus_transitions,
    fetch_rank_counters,
    parse_duration,
    parse_load_csv,
    parse_static_transitions,
    resolve_source,
)
from moeplace_operator.nodes import (
    GPUGroup,
    NodeGPUs,
    NodesUnavailableError,
    build_gpu_group,
    check_group_inputs,
)
from moeplace_operator.planning import score_pinned
from moeplace_operator.runtime import CachedTransitions, Context, DegradedError
from moeplace_operator.spec import ConditionType, MoEDeploymentSpec
from moeplace_operator.status import ConditionUpdate, build_gpus_profiled, false, true
from placement.drift import SpeedDrift, speed_drift
from placement.evaluate import Evaluation
from placement.formats import parse_canonical
from placement.model import FloatArray, Placement
from placement.validate import InvalidPlacementError


@dataclass(frozen=True)
class ObservedLoad:
    """The load, its MetricsAvailable condition, and where it came from (the transitions and
    the per-rank measurements are read from the same place)."""

    data: LoadData
    update: ConditionUpdate
    prometheus: PrometheusSource | None = None  # load.prometheus, resolved
    configmap: dict[str, Any] | None = None  # the static load's ConfigMap, as read


def read_spec(ctx: Context) -> MoEDeploymentSpec:
    """The spec, or DegradedError(InvalidSpec) naming what is wrong: an object stored
    before the CRD refused it (a URL with credentials, say). The models hide the input in
    their errors; the chain is dropped so no traceback prints it either."""
    try:
        return MoEDeploymentSpec.model_validate(ctx.body["spec"])
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()[:3]
        )
        raise DegradedError("InvalidSpec", f"spec refused: {problems}", []) from None


async def read_in_service(ctx: Context) -> Published | None:
    kube = ctx.runtime.kube
    name = placement_configmap_name(ctx.name)
    return read_published(await ctx.runtime.io(kube.read_configmap, ctx.namespace, name))


def gpu_group(
    ctx: Context, spec: MoEDeploymentSpec, in_service: Published | None
) -> tuple[GPUGroup, ConditionUpdate]:
    """The EP group from the pass's Nodes, the nodes of the placement in service kept in
    their ranks."""
    current = in_service.nodes if in_service else ()
    try:
        group = build_gpu_group(ctx.nodes, spec.gpus, current)
        check_group_inputs((n for n in ctx.nodes if n.name in group.nodes), spec.gpus)
    except NodesUnavailableError as error:
        update = false(ConditionType.GPUS_PROFILED, error.reason, str(error))
        raise DegradedError(error.reason, str(error), [update]) from error
    return group, build_gpus_profiled(group)


class StaleGroupError(Exception):
    """The EP group changed after the pass read it (a node left, turned NotReady or cordoned,
    was relabelled): a plan solved for the old group must not be published."""

    def __init__(self, nodes: list[NodeGPUs], message: str) -> None:
        super().__init__(message)
        self.nodes = nodes  # the Nodes to try again with


def check_group_unchanged(
    ctx: Context, spec: MoEDeploymentSpec, group: GPUGroup, in_service: Published | None
) -> None:
    """After the solve, before anything is written: the group built from the live Nodes is
    the one the plan was solved for, or StaleGroupError."""
    if ctx.live_nodes is None:
        return
    nodes = ctx.live_nodes()
    current = in_service.nodes if in_service else ()
    try:
        fresh = build_gpu_group(nodes, spec.gpus, current)
    except NodesUnavailableError as error:
        raise StaleGroupError(nodes, f"the EP group fell apart while solving: {error}") from None
    if fresh != group:
        changed = sorted(set(group.nodes) ^ set(fresh.nodes)) or ["speeds or curves"]
        raise StaleGroupError(nodes, f"the EP group changed while solving ({', '.join(changed)})")


async def read_load(ctx: Context, spec: MoEDeploymentSpec) -> ObservedLoad:
    try:
        if spec.load.prometheus is not None:
            prometheus = await ctx.runtime.io(
                resolve_source,
                spec.load.prometheus,
                ctx.namespace,
                ctx.runtime.kube,
                ctx.runtime.prometheus_allowed,
            )
            data = await ctx.runtime.query(
                fetch_prometheus, prometheus, spec.model, ctx.now, spec.placement.dispatch.rule
            )
            update = true(ConditionType.METRICS_AVAILABLE, "Prometheus", data.window)
            return ObservedLoad(data, update, prometheus=prometheus)
        assert spec.load.static is not None  # the CRD's CEL rule: exactly one source
        ref = spec.load.static
        found = await ctx.runtime.io(
            ctx.runtime.kube.read_configmap, ctx.namespace, ref.config_map_name
        )
        text = ((found or {}).get("data") or {}).get(ref.key)
        if text is None:
            raise MetricsUnavailableError(
                "LoadConfigMapMissing",
                f"ConfigMap {ref.config_map_name} key {ref.key} not found",
            )
        window = f"static ConfigMap {ref.config_map_name}"
        update = true(ConditionType.METRICS_AVAILABLE, "StaticConfigMap", window)
        return ObservedLoad(
            LoadData(parse_load_csv(text, spec.model), None, window), update, configmap=found
        )
    except MetricsUnavailableError as error:
        update = false(ConditionType.METRICS_AVAILABLE, error.reason, str(error))
        raise DegradedError(error.reason, str(error), [update]) from error


async def read_transitions(
    ctx: Context,
    spec: MoEDeploymentSpec,
    prometheus: PrometheusSource | None,
    load_configmap: dict[str, Any] | None,
) -> tuple[str, FloatArray]:
    """(where from, raw [L-1, E, E]). Read again only when their source changed: the
    static ConfigMap's version, or for Prometheus the query's spec or one sub-window
    (``window / samples``, the load's own granularity) since the last read."""
    cached = ctx.runtime.transitions.get(ctx.key)
    if spec.load.prometheus is not None:
        query = spec.load.prometheus
        source = "Prometheus"
        version = query.model_dump_json() + spec.model.model_dump_json()
        max_age = parse_duration(query.window) / query.samples
        fresh = cached is not None and ctx.now - cached.read_at < max_age
        if cached is not None and cached.source == version and fresh:
            return source, cached.raw
        assert prometheus is not None  # resolved by ``read_load``, which runs first
        raw = await ctx.runtime.query(fetch_prometheus_transitions, prometheus, spec.model, ctx.now)
    else:
        assert spec.load.static is not None
        item = spec.load.static.transitions_key
        source = f"ConfigMap {spec.load.static.config_map_name} key {item}"
        found = load_configmap or {}
        revision = str(found.get("metadata", {}).get("resourceVersion", ""))
        version = f"{revision}/{item}/{spec.model.model_dump_json()}"
        if cached is not None and cached.source == version and revision:
            return source, cached.raw
        raw = await ctx.runtime.io(parse_static_transitions, found, item, spec.model)
    ctx.runtime.transitions[ctx.key] = CachedTransitions(version, ctx.now, raw)
    return source, raw


async def measure_drift(
    ctx: Context, spec: MoEDeploymentSpec, prometheus: PrometheusSource, group: GPUGroup
) -> SpeedDrift | None:
    """Each GPU's measured relative speed against its label (None: too little data)."""
    seconds, tokens = await ctx.runtime.query(
        fetch_rank_counters, prometheus, spec.model, ctx.now, group.cluster.size
    )
    return speed_drift([gpu.speed for gpu in group.cluster.gpus], seconds, tokens)


async def read_pinned(
    ctx: Context, spec: MoEDeploymentSpec, group: GPUGroup, load: LoadData
) -> tuple[Placement, Evaluation]:
    """The Pinned placement, scored on this group and load, or DegradedError(PinnedInvalid)."""
    assert spec.rollout.pinned is not None  # the CRD's CEL rule for Pinned mode
    ref = spec.rollout.pinned
    found = await ctx.runtime.io(
        ctx.runtime.kube.read_configmap, ctx.namespace, ref.config_map_name
    )
    text = ((found or {}).get("data") or {}).get(ref.key)
    try:
        if text is None:
            raise ValueError(f"ConfigMap {ref.config_map_name} key {ref.key} not found")
        placement = parse_canonical(text)
        return placement, score_pinned(placement, spec, group, load)
    except (ValueError, InvalidPlacementError) as error:
        message = f"pinned placement rejected: {error}"
        raise DegradedError("PinnedInvalid", message, []) from error
