"""What ``moeplace export NAME`` and ``moeplace status NAME`` do; the CLI package wires these
functions into its commands. Each returns text for stdout and raises ``LookupError`` with a
readable message when the objects are not there."""

from __future__ import annotations

from typing import Any

import yaml
from kubernetes.client import ApiClient

from moeplace_operator.build import (
    placement_configmap_name,
    proposal_configmap_name,
    read_published,
)
from moeplace_operator.kube import Kube, MissingObjectError, load_config
from moeplace_operator.spec import GROUP, MoEDeploymentStatus
from placement.names import OWNER_LABEL, PLACEMENT_KEY, ROLE_LABEL


def _kube(api_client: ApiClient | None) -> Kube:
    if api_client is None:
        load_config()
    return Kube(api_client)


def pinned_manifest(name: str, namespace: str, placement_json: str, source_hash: str) -> str:
    """A ConfigMap to commit to git for Pinned mode (no owner, no server fields)."""
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{name}-pinned",
            "namespace": namespace,
            "labels": {OWNER_LABEL: name, ROLE_LABEL: "pinned"},
            "annotations": {f"{GROUP}/placement-hash": source_hash},
        },
        "data": {PLACEMENT_KEY: placement_json},
    }
    hint = (
        f"# Pinned placement for MoEDeployment {namespace}/{name} (hash {source_hash}).\n"
        f"# Commit this file, then set spec.rollout.mode: Pinned and\n"
        f"# spec.rollout.pinned.configMapName: {name}-pinned\n"
    )
    return hint + yaml.safe_dump(body, sort_keys=False, width=1 << 20)


def export(name: str, namespace: str = "default", api_client: ApiClient | None = None) -> str:
    """``moeplace export NAME``: the current proposal (else the placement in service) as a
    ConfigMap manifest for Pinned mode."""
    kube = _kube(api_client)
    for configmap in (proposal_configmap_name(name), placement_configmap_name(name)):
        published = read_published(kube.read_configmap(namespace, configmap))
        if published is not None:
            return pinned_manifest(name, namespace, published.placement.to_json(), published.hash)
    raise LookupError(
        f"no proposal or placement for MoEDeployment {namespace}/{name} "
        f"(looked for ConfigMaps {proposal_configmap_name(name)}, {placement_configmap_name(name)})"
    )


def format_status(obj: dict[str, Any]) -> str:
    """Readable summary of a MoEDeployment: mode, placement figures, conditions."""
    meta, spec = obj["metadata"], obj.get("spec", {})
    status = MoEDeploymentStatus.model_validate(obj.get("status") or {})
    mode = spec.get("rollout", {}).get("mode", "Auto")
    lines = [
        f"MoEDeployment {meta['namespace']}/{meta['name']}  mode={mode}  "
        f"generation={meta.get('generation')} observed={status.observed_generation}"
    ]
    if status.placement is not None:
        fields = status.placement.model_dump(by_alias=True, exclude_none=True)
        width = max(len(k) for k in fields) if fields else 0
        lines += ["", "placement:"] + [f"  {k:<{width}}  {v}" for k, v in fields.items()]
    if status.conditions:
        lines += ["", "conditions:"]
        width = max(len(c.type) for c in status.conditions)
        for c in status.conditions:
            lines.append(f"  {c.type:<{width}}  {c.status.value:<7} {c.reason}: {c.message}")
    return "\n".join(lines)


def status(name: str, namespace: str = "default", api_client: ApiClient | None = None) -> str:
    """``moeplace status NAME``: the summary of :func:`format_status`."""
    kube = _kube(api_client)
    try:
        return format_status(kube.read_moedeployment(namespace, name))
    except MissingObjectError as error:
        raise LookupError(f"MoEDeployment {namespace}/{name} not found") from error
