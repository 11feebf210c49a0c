"""Act: the writes of one pass. Placement and proposal ConfigMaps (one atomic call each), the
rollout target's pod-template annotation, node re-profile requests, Events (de-duplicated:
one per cause), and the status patch (sent only when it changes something)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import kopf

from moeplace_operator import metrics
from moeplace_operator.build import (
    Body,
    Published,
    configmap_body,
    placement_configmap_name,
    published_version,
    read_published,
    rfc3339,
    target_patch,
)
from moeplace_operator.faultpoints import crash_point
from moeplace_operator.kube import ForbiddenError, InvalidObjectError, MissingObjectError
from moeplace_operator.loadsource import MetricsUnavailableError
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.runtime import Context, DegradedError
from moeplace_operator.spec import (
    ConditionType,
    MoEDeploymentSpec,
    MoEDeploymentStatus,
    PlacementSummary,
)
from moeplace_operator.status import (
    ConditionUpdate,
    already_applied,
    false,
    merge_conditions,
    status_patch,
)
from placement.model import Placement
from placement.names import OWNER_LABEL, REPROFILE_ANNOTATION
from placement.policy import Decision

REFUSALS_WORTH_AN_EVENT = {"CooldownActive", "TooManyMoves", "GainBelowThreshold"}
TRANSITIONS_UNAVAILABLE = "TransitionsUnavailable"
SPEED_DRIFT = "SpeedDrift"
REPROFILE_REQUESTED = "ReprofileRequested"  # not an Event: the node annotation, once per set
MAX_CONFIGMAP_BYTES = 1024 * 1024  # the API server's limit on a ConfigMap's data


def configmap_size(body: Body) -> int:
    """Bytes the API server counts against a ConfigMap's limit: keys and values of data
    (UTF-8) and binaryData (base64-decoded)."""
    text = body.get("data") or {}
    binary = body.get("binaryData") or {}
    return sum(len(k) + len(v.encode()) for k, v in text.items()) + sum(
        len(k) + len(base64.b64decode(v)) for k, v in binary.items()
    )


def check_size(name: str, body: Body) -> None:
    """DegradedError(PlacementTooLarge) for a ConfigMap the API server would refuse (its
    1 MiB limit), before the write: the placement in service stays, status says why."""
    size = configmap_size(body)
    if size > MAX_CONFIGMAP_BYTES:
        message = (
            f"ConfigMap {name} would hold {size} bytes, over the {MAX_CONFIGMAP_BYTES}-byte "
            "limit (the canonical placement and SGLang's map, a row per hidden layer: fewer "
            "layers or slots make it fit)"
        )
        update = false(ConditionType.ROLLED_OUT, "PlacementTooLarge", message)
        raise DegradedError("PlacementTooLarge", message, [update])


async def publish(
    ctx: Context, name: str, role: str, placement: Placement, group: GPUGroup
) -> Published:
    """Write ``placement`` (solved for ``group``) to ConfigMap ``name`` unless it already
    holds it for the same nodes; an unreadable map is replaced in the same single call
    (guarded by its resourceVersion)."""
    kube = ctx.runtime.kube
    raw = await ctx.runtime.io(kube.read_configmap, ctx.namespace, name)
    existing = read_published(raw)
    nodes = tuple(group.nodes)
    same = existing if existing and existing.hash == placement.content_hash() else None
    if same and same.nodes == nodes:
        return same
    # the same placement for other nodes (a node replaced in its ranks, or a map written
    # before the group was recorded): version and rollout time stay, nothing to reload
    version = same.version if same else published_version(raw) + 1
    rolled_out_at = same.rolled_out_at if same and same.rolled_out_at else ctx.now
    body = configmap_body(
        name=name,
        namespace=ctx.namespace,
        role=role,
        owner=ctx.body,
        placement=placement,
        version=version,
        rolled_out_at=rolled_out_at,
        resource_version=raw["metadata"].get("resourceVersion") if raw else None,
        hidden_layers=ctx.hidden_layers,
        nodes=nodes,
    )
    check_size(name, body)
    try:
        await ctx.runtime.io(kube.write_configmap, body)
    except ForbiddenError as error:  # e.g. a ConfigMap of that name that we did not write
        message = f"ConfigMap {name} not written: {error}"
        update = false(ConditionType.ROLLED_OUT, "ConfigMapForbidden", message)
        raise DegradedError("ConfigMapForbidden", message, [update]) from error
    except InvalidObjectError as error:  # e.g. refused by a cluster admission policy
        message = f"ConfigMap {name} refused by the API server: {error}"
        update = false(ConditionType.ROLLED_OUT, "ConfigMapInvalid", message)
        raise DegradedError("ConfigMapInvalid", message, [update]) from error
    return Published(placement, placement.content_hash(), version, rolled_out_at, None, nodes)


async def roll_out(
    ctx: Context, placement: Placement, group: GPUGroup, decision: Decision
) -> Published:
    name = placement_configmap_name(ctx.name)
    published = await publish(ctx, name, "placement", placement, group)
    crash_point("after-configmap-write")
    metrics.ROLLOUTS.labels(decision.reason).inc()
    message = f"v{published.version}: {decision.message}"
    kopf.event(ctx.body, type="Normal", reason="RolledOut", message=message)
    return published


async def record_group(
    ctx: Context, in_service: Published | None, group: GPUGroup
) -> Published | None:
    """The placement in service republished with ``group``'s nodes when they changed without
    a rollout (a node replaced, the new one in the old one's ranks): the next pass keeps
    this group, not the one before."""
    if in_service is None or in_service.nodes == tuple(group.nodes):
        return in_service
    name = placement_configmap_name(ctx.name)
    return await publish(ctx, name, "placement", in_service.placement, group)


def note_refusal(ctx: Context, decision: Decision, proposed_hash: str) -> None:
    """One Event per refused proposal, not one per tick."""
    if decision.reason not in REFUSALS_WORTH_AN_EVENT:
        return
    metrics.REFUSALS.labels(decision.reason).inc()
    if ctx.events.should_emit(ctx.key, decision.reason, proposed_hash):
        kopf.event(ctx.body, type="Normal", reason="RolloutRefused", message=decision.message)


async def sync_target(ctx: Context, spec: MoEDeploymentSpec, content_hash: str) -> None:
    """Level-based: the workload's pod template carries the hash in service, whatever
    happened before (a restart between ConfigMap write and this patch included)."""
    target = spec.rollout.target
    assert target is not None
    kube = ctx.runtime.kube
    try:
        current = await ctx.runtime.io(
            kube.read_target_hash, ctx.namespace, target.kind, target.name
        )
        if current != content_hash:
            patch = target_patch(["spec", "template"], content_hash)
            await ctx.runtime.io(kube.patch_target, ctx.namespace, target.kind, target.name, patch)
            kopf.event(
                ctx.body,
                type="Normal",
                reason="TargetRolled",
                message=f"{target.kind}/{target.name} pods roll to placement {content_hash}",
            )
    except MissingObjectError as error:
        message = f"{target.kind}/{target.name} not found"
        raise DegradedError(
            "TargetMissing",
            message,
            [false(ConditionType.ROLLED_OUT, "TargetMissing", message)],
        ) from error
    except ForbiddenError as error:  # the chart's policy: label the target for us
        message = (
            f"{target.kind}/{target.name} not patched (label it "
            f"{OWNER_LABEL}={ctx.name} to allow it): {error}"
        )
        raise DegradedError(
            "TargetForbidden",
            message,
            [false(ConditionType.ROLLED_OUT, "TargetForbidden", message)],
        ) from error


def announce_degradation(
    ctx: Context, status: MoEDeploymentStatus, degraded: DegradedError
) -> None:
    """A Warning Event when the object becomes degraded or the reason changes (the stored
    Degraded condition is the memory here: it survives an operator restart)."""
    before = next((c for c in status.conditions if c.type == ConditionType.DEGRADED), None)
    if before and before.status == "True" and before.reason == degraded.reason:
        return
    kopf.event(ctx.body, type="Warning", reason=degraded.reason, message=str(degraded))


def announce_missing_transitions(
    ctx: Context, spec: MoEDeploymentSpec, missing: MetricsUnavailableError
) -> None:
    """A Warning Event when transitions go missing or the reason changes, not every tick
    (the condition messages carry the latest detail)."""
    if not ctx.events.should_emit(ctx.key, TRANSITIONS_UNAVAILABLE, missing.reason):
        return
    message = (
        f"trafficWeight {spec.placement.traffic_weight:g} is set but transitions are "
        f"unavailable ({missing.reason}: {missing}); solving without the traffic term"
    )
    kopf.event(ctx.body, type="Warning", reason=TRANSITIONS_UNAVAILABLE, message=message)


async def announce_drift(ctx: Context, group: GPUGroup, drifting: list[int], message: str) -> str:
    """Once per change of the drifting set: a Warning Event, and the affected Nodes
    annotated (a failed annotation is retried on the next pass, the Event is not). Returns
    what became of the re-profile request, for the condition message."""
    signature = ",".join(f"{n}/{i}" for n, i in sorted(map(group.gpu_name, drifting)))
    if ctx.events.should_emit(ctx.key, SPEED_DRIFT, signature):
        kopf.event(ctx.body, type="Warning", reason=SPEED_DRIFT, message=message)
    if ctx.events.seen(ctx.key, REPROFILE_REQUESTED, signature):
        return "re-profile requested"
    stamp = {REPROFILE_ANNOTATION: rfc3339(ctx.now)}
    nodes = sorted({group.gpu_name(gpu)[0] for gpu in drifting})
    try:
        for node in nodes:
            await ctx.runtime.io(ctx.runtime.kube.annotate_node, node, stamp)
    except Exception as error:  # RBAC without patch on nodes, API trouble: report, go on
        # info, not warning: kopf turns warnings into Events, and this is retried every pass
        ctx.logger.info("re-profile request on %s failed: %s", ", ".join(nodes), error)
        return f"re-profile request failed (patch nodes allowed?): {error}"
    ctx.events.remember(ctx.key, REPROFILE_REQUESTED, signature)
    ctx.logger.info("re-profile requested on %s", ", ".join(nodes))
    return "re-profile requested"


def drift_gone(ctx: Context) -> None:
    """No GPU drifts any more: the next drift is announced and requested again."""
    ctx.events.clear(ctx.key, SPEED_DRIFT)
    ctx.events.clear(ctx.key, REPROFILE_REQUESTED)


def last_status(ctx: Context) -> MoEDeploymentStatus:
    """The status this operator last wrote for the object, else the body's. Under load the
    watch that refreshes the body lags by seconds: a pass merging onto a stale status would
    move lastTransitionTimes back and forth and rewrite status every pass."""
    written = ctx.runtime.statuses.get(ctx.key)
    stored = written["status"] if written is not None else ctx.body.get("status")
    return MoEDeploymentStatus.model_validate(stored or {})


async def write_status(
    ctx: Context,
    status: MoEDeploymentStatus,
    generation: int,
    updates: Sequence[ConditionUpdate],
    summary: PlacementSummary | None,
) -> None:
    """The status patch, unless it would change nothing: neither the body's status nor the
    last one written (the body may not show it yet)."""
    conditions = merge_conditions(status.conditions, updates, generation, ctx.now)
    patch = status_patch(generation=generation, conditions=conditions, summary=summary)
    if patch == ctx.runtime.statuses.get(ctx.key):
        return
    if not already_applied(patch, {"status": dict(ctx.body.get("status") or {})}):
        crash_point("before-status")
        await ctx.runtime.io(ctx.runtime.kube.patch_status, ctx.namespace, ctx.name, patch)
    ctx.runtime.statuses[ctx.key] = patch
