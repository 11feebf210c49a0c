"""The CRD is generated from the pydantic models; the committed copies must match."""

from pathlib import Path

import pytest
import yaml
from moeplace_operator.crd import CRD_PATHS, build_crd, render_crd
from moeplace_operator.spec import MoEDeploymentSpec, RolloutMode

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("relative", CRD_PATHS, ids=str)
def test_committed_crd_matches_generated(relative: Path) -> None:
    assert (ROOT / relative).read_text() == render_crd(), (
        "run `python -m moeplace_operator.crd` and commit"
    )


def _walk(node: dict, path: str = ""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural_and_described() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "anyOf" not in text and "title" not in text
    for path, node in _walk(schema["properties"]["spec"], ".spec"):
        assert node.get("description"), f"{path} has no description"
        assert "type" in node, f"{path} has no type"


def test_cel_rules_present() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("% (self.gpus.nodeCount * self.gpus.gpusPerNode)" in r for r in rules)
    model_rules = [r["rule"] for r in spec["properties"]["model"]["x-kubernetes-validations"]]
    assert "self == oldSelf" in model_rules


def test_minimal_spec_gets_defaults() -> None:
    spec = MoEDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "moeLayers": 2, "expertsPerLayer": 8},
            "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 1, "gpusPerNode": 4},
            "load": {"static": {"configMapName": "load"}},
        }
    )
    assert spec.rollout.mode is RolloutMode.AUTO
    assert spec.placement.strategy.value == "cpsat"
    assert spec.load.static is not None and spec.load.static.key == "load.csv"
