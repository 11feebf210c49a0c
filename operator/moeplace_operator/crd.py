"""Generate the MoEDeployment CRD from the pydantic models in ``spec.py``.

``python -m moeplace_operator.crd`` rewrites ``crds/moedeployment.yaml`` and the chart's copy;
a unit test fails when the committed files differ from what this module generates.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

from moeplace_operator.spec import (
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    MoEDeploymentSpec,
    MoEDeploymentStatus,
)

Schema = dict[str, Any]

# Keys of pydantic's JSON Schema that a structural OpenAPI v3 schema accepts as they are.
_KEPT = {
    "type", "description", "default", "enum", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "format", "required", "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "minProperties", "maxProperties",
}  # fmt: skip


def column(name: str, json_path: str, kind: str = "string", description: str = "") -> Schema:
    entry: Schema = {"name": name, "type": kind, "jsonPath": json_path}
    if description:
        entry["description"] = description
    return entry


PRINTER_COLUMNS = [
    column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
    column("Mode", ".spec.rollout.mode"),
    column("Straggler/Bound", ".status.placement.stragglerOverBound"),
    column(
        "Gain",
        ".status.placement.gainPercent",
        description="Predicted gain of the last solve over the placement in service",
    ),
    column("Age", ".metadata.creationTimestamp", kind="date"),
]


def to_structural(node: Schema, defs: Schema) -> Schema:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 node: refs inlined,
    ``X | None`` collapsed to ``X``, titles dropped, exclusive bounds in OpenAPI v3 form."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return to_structural(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express union {node['anyOf']} structurally")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return to_structural({**branches[0], **rest}, defs)
    # copies: a model used twice shares its lists, which YAML would print as &id anchors
    out: Schema = {k: copy.deepcopy(v) for k, v in node.items() if k in _KEPT}
    if out.get("default", 0) is None:
        del out["default"]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in out:
            out[bound.replace("exclusive", "").lower()] = out[bound]
            out[bound] = True
    if isinstance(out.get("default"), dict):
        # explicit (not {}): the API server checks a default against CEL rules as written
        out["default"] = {k: v for k, v in out["default"].items() if v is not None}
    if node.get("type") == "object":
        if "properties" in node:
            out["properties"] = {k: to_structural(v, defs) for k, v in node["properties"].items()}
        elif "additionalProperties" in node:
            out["additionalProperties"] = to_structural(node["additionalProperties"], defs)
    if node.get("type") == "array":
        out["items"] = to_structural(node["items"], defs)
    return dict(sorted(out.items()))


def model_schema(model: type[Any]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


def build_crd() -> Schema:
    spec = model_schema(MoEDeploymentSpec)
    status = model_schema(MoEDeploymentStatus)
    root = {
        "type": "object",
        "description": "A Mixture-of-Experts inference deployment whose expert-to-GPU placement "
        "moeplace keeps near optimal.",
        "required": ["spec"],
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters: it is "
                "the value of the placement ConfigMaps' owner label",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version."},
            "kind": {"type": "string", "description": "Kind."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["moeplace"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated by `python -m moeplace_operator.crd` from moeplace_operator/spec.py.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


CRD_PATHS = [Path("crds/moedeployment.yaml"), Path("helm/moeplace/crds/moedeployment.yaml")]


def main(root: Path) -> None:
    text = render_crd()
    for relative in CRD_PATHS:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m moeplace_operator.crd",
        description="Write the MoEDeployment CRD, generated from the spec models, to "
        + " and ".join(str(p) for p in CRD_PATHS),
    )
    parser.add_argument("root", nargs="?", type=Path, default=Path.cwd(), help="repository root")
    main(parser.parse_args().root)
