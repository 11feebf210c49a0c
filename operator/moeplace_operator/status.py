"""The status projection, pure like ``build``: condition updates and how they merge, the
placement summary, and the status merge patch, all from what a pass observed and decided
(``now`` passed in)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from moeplace_operator.build import (
    Body,
    Published,
    placement_configmap_name,
    proposal_configmap_name,
    rfc3339,
)
from moeplace_operator.loadsource import MetricsUnavailableError
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.planning import Plan
from moeplace_operator.spec import (
    Condition,
    ConditionStatus,
    ConditionType,
    MoEDeploymentSpec,
    PlacementSummary,
)
from placement.drift import SpeedDrift
from placement.evaluate import Evaluation
from placement.policy import Decision, RolloutMode

# summary fields a merge patch removes (null) when unknown now: transitions come and go
CLEARED_SUMMARY_FIELDS = ("trafficSharePercent", "eplbTrafficSharePercent")


@dataclass(frozen=True)
class ConditionUpdate:
    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str = ""


def merge_conditions(
    previous: Sequence[Condition],
    updates: Sequence[ConditionUpdate],
    generation: int,
    now: datetime,
) -> list[Condition]:
    """Apply updates; lastTransitionTime moves only when a condition's status changes. Types
    without an update are kept as they were (e.g. MetricsAvailable when nodes are missing)."""
    merged = {c.type: c for c in previous}
    for update in updates:
        before = merged.get(update.type.value)
        changed = before is None or before.status != update.status
        merged[update.type.value] = Condition(
            type=update.type.value,
            status=update.status,
            reason=update.reason,
            message=update.message,
            last_transition_time=rfc3339(now) if changed else before.last_transition_time,  # type: ignore[union-attr]
            observed_generation=generation,
        )
    order = [t.value for t in ConditionType]
    return sorted(merged.values(), key=lambda c: order.index(c.type) if c.type in order else 99)


def true(kind: ConditionType, reason: str, message: str = "") -> ConditionUpdate:
    return ConditionUpdate(kind, ConditionStatus.TRUE, reason, message)


def false(kind: ConditionType, reason: str, message: str = "") -> ConditionUpdate:
    return ConditionUpdate(kind, ConditionStatus.FALSE, reason, message)


def degraded_updates(reason: str, message: str, kept_hash: str | None) -> list[ConditionUpdate]:
    """Degraded and not Ready; the message says which placement stays in service."""
    kept = f"; keeping placement {kept_hash}" if kept_hash else "; no placement in service yet"
    return [
        true(ConditionType.DEGRADED, reason, message + kept),
        false(ConditionType.READY, reason, message + kept),
    ]


def status_patch(
    *,
    generation: int,
    conditions: Sequence[Condition],
    summary: PlacementSummary | None,
) -> Body:
    """Merge patch for the status subresource (declared fields only: the schema prunes the
    rest)."""
    patch: Body = {
        "observedGeneration": generation,
        "conditions": [c.model_dump(by_alias=True, mode="json") for c in conditions],
    }
    if summary is not None:
        placement = summary.model_dump(by_alias=True, mode="json", exclude_none=True)
        for key in CLEARED_SUMMARY_FIELDS:  # null removes a share no longer known
            placement.setdefault(key, None)
        patch["placement"] = placement
    return {"status": patch}


def already_applied(patch: Any, current: Any) -> bool:
    """Whether a merge patch would change nothing (then it is not sent: no write, no watch
    event, no resourceVersion churn for GitOps tools)."""
    if isinstance(patch, dict):
        return isinstance(current, dict) and all(
            already_applied(v, current.get(k)) for k, v in patch.items()
        )
    return bool(patch == current)


def ratio_text(value: float) -> str:
    return f"{value:.3f}"


def percent_text(value: float) -> str:
    return f"{value:.1f}%"


def share_text(share: float) -> str | None:
    """A traffic share (0..1, NaN without transitions) as a percentage, or None."""
    return percent_text(100 * share) if math.isfinite(share) else None


def build_gpus_profiled(group: GPUGroup) -> ConditionUpdate:
    """GPUsProfiled from the group's labels (speed drift may override it later)."""
    if group.profiled:
        source = "LatencyCurves" if group.cluster.has_curves else "SpeedLabels"
        return true(
            ConditionType.GPUS_PROFILED,
            source,
            f"{group.cluster.size} GPUs on {len(group.nodes)} nodes",
        )
    missing = ", ".join(group.unprofiled[:4]) + (" ..." if len(group.unprofiled) > 4 else "")
    return false(
        ConditionType.GPUS_PROFILED, "SpeedLabelsMissing", f"assuming speed 1.0 for {missing}"
    )


def build_drift_message(
    spec: MoEDeploymentSpec, group: GPUGroup, found: SpeedDrift, drifting: list[int]
) -> str:
    shown = []
    for gpu in drifting[:4]:
        node, index = group.gpu_name(gpu)
        shown.append(
            f"{node}/{index} measured {found.measured[gpu]:.2f}x vs label "
            f"{found.labelled[gpu]:.2f}x ({100 * found.drift[gpu]:+.1f}%)"
        )
    more = f" and {len(drifting) - 4} more" if len(drifting) > 4 else ""
    window = spec.load.prometheus.window if spec.load.prometheus else "?"
    return (
        f"speed drift beyond {spec.gpus.speed_drift_threshold_percent:g}% on "
        f"{len(drifting)} GPU(s): {', '.join(shown)}{more} (relative tokens/s per rank over "
        f"{window})"
    )


def build_summary(
    *,
    name: str,
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    result: Plan,
    in_service: Published | None,
    shown: Evaluation | None,
    window: str,
    gain: float,
    solved_at: datetime,
) -> PlacementSummary:
    """Figures of the placement in service (of the proposal in Propose mode, where
    nothing is in service) and of the last solve."""
    proposing = spec.rollout.mode is RolloutMode.PROPOSE
    config_map = proposal_configmap_name(name) if proposing else None
    if in_service and not proposing:
        config_map = placement_configmap_name(name)
    serving = in_service if not proposing else None
    solution = result.solution
    return PlacementSummary(
        config_map=config_map,
        hash=serving.hash if serving else None,
        version=serving.version if serving else None,
        strategy=serving.placement.strategy if serving else solution.placement.strategy,
        straggler=round(shown.straggler, 3) if shown else None,
        fluid_bound=round(shown.fluid_bound, 3) if shown else None,
        straggler_over_bound=ratio_text(shown.ratio) if shown else None,
        gain_percent=percent_text(gain),
        gain_over_eplb_percent=percent_text(result.gain_over_eplb),
        traffic_share_percent=share_text(shown.traffic_share) if shown else None,
        eplb_traffic_share_percent=share_text(result.eplb.traffic_share),
        moved_experts=result.proposal.moved,
        proposed_hash=solution.placement.content_hash(),
        solver_gap=percent_text(100 * solution.gap),
        solved_at=rfc3339(solved_at),
        rolled_out_at=rfc3339(serving.rolled_out_at) if serving and serving.rolled_out_at else None,
        load_window=window,
        gpus=group.cluster.size,
    )


def build_solved(
    spec: MoEDeploymentSpec, result: Plan, no_traffic: MetricsUnavailableError | None
) -> ConditionUpdate:
    """PlacementSolved; ``no_traffic`` says why transitions were missing when wanted."""
    s = result.solution
    message = (
        f"{s.placement.strategy} {s.status} in {s.wall_s:.2f}s, gap {100 * s.gap:.2f}%, "
        f"straggler/bound {result.proposal.ratio:.3f}, {result.gain_over_eplb:.1f}% over EPLB"
    )
    share, eplb_share = (
        share_text(result.proposal.traffic_share),
        share_text(result.eplb.traffic_share),
    )
    if share is not None:
        message += f", tokens changing GPU between layers {share} (EPLB {eplb_share})"
    if no_traffic is not None:
        weight = spec.placement.traffic_weight
        message = (
            f"trafficWeight {weight:g} ignored, transitions unavailable "
            f"({no_traffic.reason}: {no_traffic}): {message}"
        )
        return true(ConditionType.PLACEMENT_SOLVED, "SolvedWithoutTraffic", message)
    return true(ConditionType.PLACEMENT_SOLVED, "Solved", message)


def build_rolled_out(in_service: Published | None, decision: Decision) -> ConditionUpdate:
    if in_service is None:
        return false(ConditionType.ROLLED_OUT, decision.reason, decision.message)
    return true(ConditionType.ROLLED_OUT, decision.reason, decision.message)


def build_ready(
    spec: MoEDeploymentSpec, in_service: Published | None, decision: Decision
) -> ConditionUpdate:
    if spec.rollout.mode is RolloutMode.PROPOSE:
        return true(ConditionType.READY, "ProposalPublished", decision.message)
    if in_service is None:
        return false(ConditionType.READY, decision.reason, decision.message)
    return true(
        ConditionType.READY,
        "PlacementInService",
        f"placement {in_service.hash} v{in_service.version}",
    )
