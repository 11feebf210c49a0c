"""Pure builders and decisions: manifests, "roll out or not" (the status they end in is
``status``). No I/O, no clocks (``now`` is passed in), so every rule here is a unit test
away."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from moeplace_operator.spec import (
    GROUP,
    KIND,
    VERSION,
    ModelSpec,
    RolloutMode,
    RolloutSpec,
)
from placement.engine_flags import engine_flags
from placement.formats import parse_canonical, to_sglang
from placement.model import MoEModelShape, Placement
from placement.names import (
    ENGINE_FLAGS_KEY,
    GROUP_NODES_ANNOTATION,
    HASH_ANNOTATION,
    HASH_KEY,
    OWNER_LABEL,
    PLACEMENT_KEY,
    ROLE_LABEL,
    ROLLED_OUT_AT_ANNOTATION,
    SGLANG_KEY,
    VERSION_ANNOTATION,
    VERSION_KEY,
)

Body = dict[str, Any]


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")


def placement_configmap_name(name: str) -> str:
    return f"{name}-placement"


def proposal_configmap_name(name: str) -> str:
    return f"{name}-proposal"


def model_shape(spec: ModelSpec) -> MoEModelShape:
    return MoEModelShape(
        name=spec.name,
        moe_layers=spec.moe_layers,
        experts=spec.experts_per_layer,
        top_k=spec.top_k,
        expert_bytes=spec.expert_bytes,
        dense_layers_before=spec.layout().dense_layers_before,
    )


def owner_reference(owner: Mapping[str, Any]) -> Body:
    """Controller reference so deleting the MoEDeployment garbage-collects its ConfigMaps.
    blockOwnerDeletion stays off: it would need update rights on the owner's finalizers."""
    meta = owner["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


@dataclass(frozen=True)
class Published:
    """What a placement ConfigMap holds, as read back."""

    placement: Placement
    hash: str
    version: int
    rolled_out_at: datetime | None
    resource_version: str | None
    nodes: tuple[str, ...] = ()  # the EP group it was solved for, in rank order


def configmap_body(
    *,
    name: str,
    namespace: str,
    role: str,
    owner: Mapping[str, Any],
    placement: Placement,
    version: int,
    rolled_out_at: datetime,
    resource_version: str | None,
    hidden_layers: int,
    nodes: Sequence[str] = (),
) -> Body:
    """Complete ConfigMap written in one create/replace call (never half-written): canonical
    placement, SGLang map (``hidden_layers`` rows), the engine flags that must match it,
    version and hash both as keys (for mounted files) and annotations (for watchers);
    ``resourceVersion`` makes a concurrent writer fail instead of interleave; ``nodes``, the
    EP group in rank order, keeps the ranks' nodes in place on the next pass."""
    content_hash = placement.content_hash()
    metadata: Body = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/managed-by": "moeplace",
            OWNER_LABEL: owner["metadata"]["name"],
            ROLE_LABEL: role,
        },
        "annotations": {
            HASH_ANNOTATION: content_hash,
            VERSION_ANNOTATION: str(version),
            ROLLED_OUT_AT_ANNOTATION: rfc3339(rolled_out_at),
            GROUP_NODES_ANNOTATION: ",".join(nodes),
        },
        "ownerReferences": [owner_reference(owner)],
    }
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {
            PLACEMENT_KEY: placement.to_json(),
            SGLANG_KEY: json.dumps(to_sglang(placement, hidden_layers), separators=(",", ":")),
            ENGINE_FLAGS_KEY: json.dumps(engine_flags(placement, hidden_layers), indent=2),
            HASH_KEY: content_hash,
            VERSION_KEY: str(version),
        },
    }


def published_version(configmap: Mapping[str, Any] | None) -> int:
    """The version a ConfigMap we wrote carries (0 when absent), read even when its placement is
    unreadable, so a republished map never goes backwards for serving's "newer only" check."""
    if not configmap:
        return 0
    data = configmap.get("data") or {}
    annotations = configmap.get("metadata", {}).get("annotations") or {}
    for raw in (data.get(VERSION_KEY), annotations.get(VERSION_ANNOTATION)):
        if isinstance(raw, str) and raw.isdigit():
            return int(raw)
    return 0


def read_published(configmap: Mapping[str, Any] | None) -> Published | None:
    """The placement in a ConfigMap we wrote, or None when absent or unreadable (a corrupt or
    hand-edited map is treated as no placement, never loaded half-valid)."""
    if not configmap:
        return None
    data = configmap.get("data") or {}
    annotations = configmap.get("metadata", {}).get("annotations") or {}
    try:
        # ours, solved and validated before it was written: EPLB's may hold two copies of an
        # expert on one GPU, as the engines run it
        placement = parse_canonical(data[PLACEMENT_KEY], allow_duplicates=True)
        version = int(data.get(VERSION_KEY, annotations.get(VERSION_ANNOTATION, "0")))
        stamp = annotations.get(ROLLED_OUT_AT_ANNOTATION)
        rolled_out_at = parse_rfc3339(stamp.replace("Z", "+0000")) if stamp else None
    except (KeyError, ValueError):
        return None
    return Published(
        placement=placement,
        hash=placement.content_hash(),
        version=version,
        rolled_out_at=rolled_out_at,
        resource_version=configmap.get("metadata", {}).get("resourceVersion"),
        nodes=tuple(filter(None, annotations.get(GROUP_NODES_ANNOTATION, "").split(","))),
    )


def fits(placement: Placement, shape: MoEModelShape, num_gpus: int, slots_per_gpu: int) -> bool:
    """Whether a placement is for this model shape and EP group (else it must be replaced)."""
    return (
        placement.model == shape
        and placement.num_gpus == num_gpus
        and placement.slots_per_gpu == slots_per_gpu
    )


def gain_percent(before: float, after: float) -> float:
    """Predicted straggler-time improvement of ``after`` over ``before``, in percent."""
    return 0.0 if before <= 0 else 100.0 * (before - after) / before


@dataclass(frozen=True)
class Decision:
    roll: bool
    reason: str
    message: str


def decide_rollout(
    *,
    rollout: RolloutSpec,
    cooldown: timedelta,
    current_hash: str | None,
    proposed_hash: str,
    gain: float,
    moved: int,
    last_rollout: datetime | None,
    now: datetime,
) -> Decision:
    """Whether the proposed placement replaces the one in service.

    ``current_hash`` is None when nothing valid for this shape and EP group is in service:
    then the proposal goes out whatever the gain (except in Propose mode). In Pinned mode the
    "proposal" is the pinned placement, which goes out whenever it differs."""
    if rollout.mode is RolloutMode.PROPOSE:
        return Decision(False, "ProposeMode", f"proposal {proposed_hash} published, not rolled out")
    if current_hash == proposed_hash:
        return Decision(False, "UpToDate", f"placement {proposed_hash} is in service")
    if current_hash is None:
        return Decision(True, "InitialPlacement", f"first placement {proposed_hash} for this group")
    if rollout.mode is RolloutMode.PINNED:
        return Decision(True, "PinnedChanged", f"pinned placement {proposed_hash} rolled out")
    if gain <= rollout.min_improvement_percent:
        return Decision(
            False,
            "GainBelowThreshold",
            f"predicted gain {gain:.2f}% <= minImprovementPercent "
            f"{rollout.min_improvement_percent:g}%: keeping {current_hash}",
        )
    if last_rollout is not None and now - last_rollout < cooldown:
        wait = cooldown - (now - last_rollout)
        return Decision(
            False,
            "CooldownActive",
            f"gain {gain:.2f}% but the last rollout was "
            f"{int((now - last_rollout).total_seconds())}s ago; next possible in "
            f"{int(wait.total_seconds())}s",
        )
    if rollout.max_moved_experts is not None and moved > rollout.max_moved_experts:
        return Decision(
            False,
            "TooManyMoves",
            f"gain {gain:.2f}% needs {moved} moved expert copies > maxMovedExperts "
            f"{rollout.max_moved_experts}",
        )
    return Decision(
        True, "GainAboveThreshold", f"predicted gain {gain:.2f}%: rolling out {proposed_hash}"
    )


def target_patch(kind_template_path: Sequence[str], content_hash: str) -> Body:
    """Merge patch setting the pod-template annotation that rolls a workload's pods."""
    patch: Body = {"metadata": {"annotations": {HASH_ANNOTATION: content_hash}}}
    for key in reversed(kind_template_path):
        patch = {key: patch}
    return patch
