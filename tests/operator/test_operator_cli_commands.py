"""Text produced by `moeplace export` / `moeplace status`."""

import yaml
from moeplace_operator.cli_commands import format_status, pinned_manifest

from placement.formats import parse_canonical
from placement.model import MoEModelShape, Placement


def test_pinned_manifest_round_trips_the_placement() -> None:
    shape = MoEModelShape(name="m", moe_layers=1, experts=4)
    plan = Placement.from_table([[0, 1, 2, 3]], shape, num_gpus=2, strategy="cpsat")
    text = pinned_manifest("demo", "ns", plan.to_json(), plan.content_hash())
    assert "rollout.mode: Pinned" in text
    body = yaml.safe_load(text)
    assert body["metadata"]["name"] == "demo-pinned"
    assert parse_canonical(body["data"]["placement.json"]) == plan


def test_status_text() -> None:
    obj = {
        "metadata": {"name": "demo", "namespace": "ns", "generation": 2},
        "spec": {"rollout": {"mode": "Propose"}},
        "status": {
            "observedGeneration": 2,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "ProposalPublished",
                    "message": "ok",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "placement": {"hash": "abc", "stragglerOverBound": "1.020"},
        },
    }
    text = format_status(obj)
    assert "mode=Propose" in text and "stragglerOverBound  1.020" in text
    assert "Ready  True    ProposalPublished: ok" in text
