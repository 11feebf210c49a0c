"""The CRD ConfigMap's checks and the "live CRD already has it" comparison (the apply itself
runs against the real API server in e2e/test_helm_lifecycle.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from moeplace_operator.crdupgrade import BundledCRDError, bundled_crd, covers, parse_location

CRD_TEXT = (Path(__file__).resolve().parents[2] / "crds/moedeployment.yaml").read_text()


def test_covers_ignores_server_defaults_but_not_changes() -> None:
    wanted = {"names": {"plural": "moedeployments"}, "versions": [{"name": "v1alpha1"}]}
    live = {
        "names": {"plural": "moedeployments", "singular": "moedeployment"},
        "versions": [{"name": "v1alpha1", "served": True}],
        "conversion": {"strategy": "None"},
    }
    assert covers(live, wanted)
    assert not covers(live, {**wanted, "versions": [{"name": "v1beta1"}]})
    assert not covers(live, {**wanted, "versions": [{"name": "v1alpha1"}, {"name": "v1"}]})
    assert not covers(live, {"scope": "Namespaced"})


def test_the_committed_crd_is_accepted_and_covers_itself() -> None:
    crd = bundled_crd({"data": {"moedeployment.yaml": CRD_TEXT}}, "ops/x")
    assert crd["metadata"]["name"] == "moedeployments.moeplace.io"
    added = yaml.safe_load(CRD_TEXT)
    schema = added["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["properties"]["newField"] = {"type": "string"}
    assert not covers(crd["spec"], added["spec"])


@pytest.mark.parametrize(
    ("configmap", "message"),
    [
        (None, "ops/x not found"),
        ({"data": {}}, "no data key 'moedeployment.yaml'"),
        ({"data": {"moedeployment.yaml": "a: [b"}}, "is not YAML"),
        ({"data": {"moedeployment.yaml": "kind: ConfigMap"}}, "not a CustomResourceDefinition"),
        (
            {"data": {"moedeployment.yaml": CRD_TEXT.replace("moedeployments.moeplace.io", "x")}},
            "holds CRD 'x'",
        ),
    ],
)
def test_bad_configmaps_are_named(configmap: dict[str, object] | None, message: str) -> None:
    with pytest.raises(BundledCRDError, match=message):
        bundled_crd(configmap, "ops/x")


@pytest.mark.parametrize("location", ["", "ops", "/x", "ops/", "a/b/c"])
def test_location_must_be_namespace_slash_name(location: str) -> None:
    with pytest.raises(BundledCRDError, match="<namespace>/<name>"):
        parse_location(location)
    assert parse_location("ops/moeplace-crd") == ("ops", "moeplace-crd")
