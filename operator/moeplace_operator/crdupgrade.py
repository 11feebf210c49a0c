"""Bring the cluster's MoEDeployment CRD up to the chart's at start.

Helm installs a chart's ``crds/`` once and never upgrades them. The chart therefore also ships
its CRD in a ConfigMap (``templates/crd-configmap.yaml``) and names it in
``MOEPLACE_CRD_CONFIGMAP``; before kopf starts watching, the operator server-side applies that
CRD, and only when the live one differs from it (no write, no watch event otherwise). Its RBAC
allows ``patch`` on this one CRD by name and ``get`` on this one ConfigMap by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from moeplace_operator.kube import Kube
from moeplace_operator.spec import GROUP, PLURAL

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_KEY = "moedeployment.yaml"
FIELD_MANAGER = "moeplace-operator"

Body = dict[str, Any]


class BundledCRDError(ValueError):
    """The CRD ConfigMap is missing or does not hold the MoEDeployment CRD."""


def covers(live: Any, wanted: Any) -> bool:
    """Whether ``live`` has every value of ``wanted`` (keys the API server added as defaults,
    such as ``conversion`` or ``status``, are ignored)."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and covers(live[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(covers(a, b) for a, b in zip(live, wanted, strict=True))
        )
    return bool(live == wanted)


def bundled_crd(configmap: Body | None, where: str) -> Body:
    """The CRD held by the chart's ConfigMap, checked to be ours."""
    if configmap is None:
        raise BundledCRDError(f"CRD ConfigMap {where} not found")
    text = (configmap.get("data") or {}).get(CRD_KEY)
    if not text:
        raise BundledCRDError(f"CRD ConfigMap {where} has no data key {CRD_KEY!r}")
    try:
        crd = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise BundledCRDError(f"CRD ConfigMap {where}: {CRD_KEY} is not YAML: {error}") from error
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise BundledCRDError(f"CRD ConfigMap {where}: {CRD_KEY} is not a CustomResourceDefinition")
    name = (crd.get("metadata") or {}).get("name")
    if name != CRD_NAME:
        raise BundledCRDError(f"CRD ConfigMap {where}: holds CRD {name!r}, not {CRD_NAME!r}")
    return crd


def parse_location(location: str) -> tuple[str, str]:
    """``namespace/name`` of the CRD ConfigMap."""
    namespace, _, name = location.partition("/")
    if not namespace or not name or "/" in name:
        raise BundledCRDError(
            f"MOEPLACE_CRD_CONFIGMAP must be <namespace>/<name>, got {location!r}"
        )
    return namespace, name


def ensure_crd(kube: Kube, location: str) -> bool:
    """Apply the bundled CRD when the live one differs; returns whether it applied."""
    namespace, name = parse_location(location)
    crd = bundled_crd(kube.read_configmap(namespace, name), location)
    live = kube.read_crd(CRD_NAME)
    if live is not None and covers(live.get("spec"), crd["spec"]):
        return False
    kube.apply_crd(crd, FIELD_MANAGER)
    return True
