"""The CRD is generated from the pydantic models; the committed copies must match."""

from pathlib import Path

import pytest
import yaml
from moeplace_operator.build import model_shape
from moeplace_operator.crd import CRD_PATHS, build_crd, render_crd
from moeplace_operator.spec import ModelSpec, MoEDeploymentSpec
from pydantic import ValidationError

from placement.policy import RolloutMode
from placement.presets import PRESETS

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
            "model": {"name": "m", "preset": "mixtral-8x7b", "moeLayers": 32, "expertsPerLayer": 8},
            "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 1, "gpusPerNode": 4},
            "load": {"static": {"configMapName": "load"}},
        }
    )
    assert spec.rollout.mode is RolloutMode.AUTO
    assert spec.placement.strategy.value == "cpsat"
    assert spec.load.static is not None and spec.load.static.key == "load.csv"
    assert spec.model.layout().hidden_layers == 32
    assert spec.model.layout().dense_layers_before == 0


def test_preset_gives_the_dense_layers() -> None:
    model = ModelSpec.model_validate(
        {"name": "m", "preset": "deepseek-v2-lite", "moeLayers": 26, "expertsPerLayer": 64}
    )
    assert (model.layout().dense_layers_before, model.layout().hidden_layers) == (1, 27)
    assert model_shape(model).dense_layers_before == 1


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"moeLayers": 26, "expertsPerLayer": 64}, "give model.preset, or"),
        ({"moeLayers": 26, "expertsPerLayer": 64, "denseLayersBefore": 1}, "give model.preset"),
        (
            {"preset": "deepseek-v2-lite", "moeLayers": 26, "expertsPerLayer": 64,
             "denseLayersBefore": 0},
            "model.preset deepseek-v2-lite says 1, model.denseLayersBefore says 0",
        ),
        (
            {"preset": "deepseek-v3", "moeLayers": 26, "expertsPerLayer": 64},
            "model.preset deepseek-v3 has 58 MoE layers x 256 experts",
        ),
        (
            {"moeLayers": 26, "expertsPerLayer": 64, "denseLayersBefore": 2, "hiddenLayers": 27},
            "exceed 27 hidden layers",
        ),
        ({"preset": "gpt-moe", "moeLayers": 2, "expertsPerLayer": 8}, "unknown model preset"),
    ],
)  # fmt: skip
def test_dense_layers_never_assumed(model: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate({"name": "m", **model})


def test_preset_cel_rules_carry_the_table() -> None:
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = spec["properties"]["model"]
    assert model["properties"]["preset"]["enum"] == list(PRESETS)
    assert "default" not in model["properties"]["denseLayersBefore"]
    rules = {r["message"]: r["rule"] for r in model["x-kubernetes-validations"]}
    assert "'deepseek-v3': 3" in rules["denseLayersBefore must match model.preset's"]
    assert "'deepseek-v2-lite': 27" in rules["hiddenLayers must match model.preset's"]
    assert any("has(self.denseLayersBefore) && has(self.hiddenLayers)" in r for r in rules.values())
