"""Publish a GPU profile on its Kubernetes node.

What the operator reads (``moeplace_operator.nodes``):
- labels ``gpu.moeplace.io/speed-<index>`` = relative speed as a decimal string (1.0 nominal,
  higher faster), one per GPU of the node, ``<index>`` the GPU's index on the node;
- annotation ``gpu.moeplace.io/latency-curves`` = compact JSON ``{"<index>": {"tokens": [...],
  "micros": [...]}}``;
- annotation ``gpu.moeplace.io/profiled-at`` = when the curves were taken (ISO 8601, UTC), and
  ``gpu.moeplace.io/expert-shape`` = what was timed (``name:HIDDENxINTERMEDIATE:dtype``).

What it reads back: annotation ``gpu.moeplace.io/reprofile-requested-at`` (RFC 3339, set by the
operator when a GPU's measured speed drifts from its label); newer than ``profiled-at`` means
"profile again now" (:func:`reprofile_requested`).

All annotations of an object share a 256 KiB limit; the curves stay under
:data:`CURVES_BUDGET_BYTES` by rounding and, if needed, thinning interior points (never the
first or last count). Labels of GPU indices the node no longer has are removed (``null`` in the
merge patch). The body is built by pure functions; :func:`publish` only sends it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from placement.gpus import GPUProfile, ProfiledGPU
from placement.names import (
    CURVES_ANNOTATION,
    PROFILED_AT_ANNOTATION,
    REPROFILE_ANNOTATION,
    SHAPE_ANNOTATION,
    SPEED_LABEL_PREFIX,
    speed_label,
)

CURVES_BUDGET_BYTES = 64 * 1024


class PublishError(RuntimeError):
    """Publication failed; the message says why (no node name, API refused, ...)."""


def node_gpus(profile: GPUProfile, node: str) -> list[ProfiledGPU]:
    """The profile's GPUs on ``node`` in index order (their position is the node-local index)."""
    return sorted((g for g in profile.gpus if g.node == node), key=lambda g: g.gpu)


def speed_value(speed: float) -> str:
    """A label value: plain decimal, 4 places (``1.0213``), no exponent."""
    return f"{speed:.4f}"


def speed_labels(profile: GPUProfile, node: str) -> dict[str, str]:
    return {speed_label(i): speed_value(g.speed) for i, g in enumerate(node_gpus(profile, node))}


def _curves_json(curves: Mapping[str, tuple[list[int], list[float]]], digits: int) -> str:
    body = {
        k: {"tokens": t, "micros": [round(m, digits) if digits else round(m) for m in ms]}
        for k, (t, ms) in curves.items()
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def curves_annotation(
    profile: GPUProfile, node: str, budget_bytes: int = CURVES_BUDGET_BYTES
) -> str | None:
    """Compact JSON of the node's curves within ``budget_bytes``; None when no curves."""
    gpus = node_gpus(profile, node)
    if not gpus or any(g.curve is None for g in gpus):
        return None
    curves = {
        str(i): (list(g.curve.tokens), list(g.curve.micros))
        for i, g in enumerate(gpus)
        if g.curve is not None
    }
    for digits in (2, 1, 0):
        text = _curves_json(curves, digits)
        if len(text.encode()) <= budget_bytes:
            return text
    while True:  # thin interior points until it fits
        thinner = {}
        for k, (t, ms) in curves.items():
            if len(t) <= 2:
                raise PublishError(f"curves do not fit in {budget_bytes} bytes")
            keep = [0, *range(2, len(t) - 1, 2), len(t) - 1]
            thinner[k] = ([t[i] for i in keep], [ms[i] for i in keep])
        curves = thinner
        text = _curves_json(curves, 0)
        if len(text.encode()) <= budget_bytes:
            return text


def patch_body(
    profile: GPUProfile,
    node: str,
    existing_labels: Mapping[str, str] | None = None,
    budget_bytes: int = CURVES_BUDGET_BYTES,
) -> dict[str, Any]:
    """Merge-patch body for the Node: speed labels (stale ones set to null) and annotations."""
    if not node_gpus(profile, node):
        raise PublishError(f"the profile has no GPU on node {node!r}")
    labels: dict[str, str | None] = dict(speed_labels(profile, node))
    for key in existing_labels or {}:
        if key.startswith(SPEED_LABEL_PREFIX) and key not in labels:
            labels[key] = None
    annotations: dict[str, str | None] = {
        CURVES_ANNOTATION: curves_annotation(profile, node, budget_bytes)
    }
    if profile.taken_at is not None:
        annotations[PROFILED_AT_ANNOTATION] = profile.taken_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if profile.expert_shape is not None:
        s = profile.expert_shape
        annotations[SHAPE_ANNOTATION] = f"{s.name}:{s.hidden}x{s.intermediate}:{s.dtype}"
    return {"metadata": {"labels": labels, "annotations": annotations}}


def node_name_from_env(env: Mapping[str, str] | None = None) -> str:
    """The node this pod runs on, from the Downward API (``NODE_NAME`` = spec.nodeName)."""
    name = (env if env is not None else os.environ).get("NODE_NAME", "").strip()
    if not name:
        raise PublishError(
            "NODE_NAME is not set: give the pod env NODE_NAME from fieldRef spec.nodeName "
            "(the Helm chart's profiler DaemonSet does), or pass the node name"
        )
    return name


def core_api(kubeconfig: str | None = None) -> Any:
    """A CoreV1Api: in-cluster config in a pod, else ``kubeconfig`` (or the default one)."""
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return client.CoreV1Api()


def publish(
    profile: GPUProfile,
    node: str | None = None,
    api: Any = None,
    kubeconfig: str | None = None,
) -> dict[str, Any]:
    """Patch the node's labels and annotations with ``profile``; returns the body sent."""
    from kubernetes.client.exceptions import ApiException

    name = node or node_name_from_env()
    api = api or core_api(kubeconfig)
    try:
        current = api.read_node(name)
        existing = dict(current.metadata.labels or {})
        body = patch_body(profile, name, existing)
        api.patch_node(name, body)
    except ApiException as err:
        raise PublishError(f"node {name}: API refused ({err.status} {err.reason})") from err
    return body


def _moment(text: str | None) -> datetime | None:
    """An RFC 3339 / ISO 8601 timestamp (``Z`` or an offset; naive means UTC), or None."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def reprofile_requested(node: Any) -> bool:
    """Whether ``node`` (a V1Node, or anything with ``metadata.annotations``) asks for a new
    profile: ``reprofile-requested-at`` set and newer than ``profiled-at`` (or no profile
    published yet). An unparsable request is ignored; an unparsable ``profiled-at`` counts as
    none."""
    metadata = getattr(node, "metadata", None)
    annotations: Mapping[str, str] = getattr(metadata, "annotations", None) or {}
    requested = _moment(annotations.get(REPROFILE_ANNOTATION))
    if requested is None:
        return False
    profiled = _moment(annotations.get(PROFILED_AT_ANNOTATION))
    return profiled is None or requested > profiled
