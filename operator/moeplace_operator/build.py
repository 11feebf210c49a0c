"""Pure builders: manifests and the ConfigMaps placements are published in (the "roll out or
not" rules are ``placement.policy``, the status they end in is ``status``). No I/O, no clocks,
so every rule here is a unit test away."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from moeplace_operator.spec import GROUP, KIND, VERSION, ModelSpec
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


def target_patch(kind_template_path: Sequence[str], content_hash: str) -> Body:
    """Merge patch setting the pod-template annotation that rolls a workload's pods."""
    patch: Body = {"metadata": {"annotations": {HASH_ANNOTATION: content_hash}}}
    for key in reversed(kind_template_path):
        patch = {key: patch}
    return patch
