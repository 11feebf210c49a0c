"""Pure decisions and manifests."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from moeplace_operator.build import (
    configmap_body,
    published_version,
    read_published,
    target_patch,
)
from moeplace_operator.spec import ConditionType
from moeplace_operator.status import already_applied, false, merge_conditions, true

from placement.model import MoEModelShape, Placement
from placement.names import ENGINE_FLAGS_KEY, HASH_ANNOTATION, PLACEMENT_KEY, SGLANG_KEY

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
OWNER = {"metadata": {"name": "demo", "namespace": "ns", "uid": "u-1"}}


def placement(rows: list[list[int]], dense: int = 0) -> Placement:
    shape = MoEModelShape(name="m", moe_layers=len(rows), experts=4, dense_layers_before=dense)
    return Placement.from_table(rows, shape, num_gpus=2, strategy="test")


def test_conditions_keep_transition_time_while_status_is_unchanged() -> None:
    first = merge_conditions([], [true(ConditionType.READY, "A")], 1, NOW)
    later = NOW + timedelta(minutes=5)
    same = merge_conditions(first, [true(ConditionType.READY, "B", "m")], 2, later)
    assert same[0].last_transition_time == first[0].last_transition_time
    assert same[0].reason == "B" and same[0].observed_generation == 2
    flipped = merge_conditions(same, [false(ConditionType.READY, "C")], 2, later)
    assert flipped[0].last_transition_time == "2026-01-01T12:05:00Z"


def test_conditions_are_ordered_and_untouched_types_kept() -> None:
    conditions = merge_conditions(
        [], [true(ConditionType.DEGRADED, "X"), true(ConditionType.READY, "Y")], 1, NOW
    )
    conditions = merge_conditions(conditions, [false(ConditionType.DEGRADED, "Z")], 1, NOW)
    assert [c.type for c in conditions] == ["Ready", "Degraded"]


def test_configmap_round_trip() -> None:
    plan = placement([[0, 1, 2, 3], [3, 2, 1, 0]])
    body = configmap_body(
        name="demo-placement",
        namespace="ns",
        role="placement",
        owner=OWNER,
        placement=plan,
        version=7,
        rolled_out_at=NOW,
        resource_version="42",
        hidden_layers=2,
    )
    assert body["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert body["metadata"]["annotations"][HASH_ANNOTATION] == plan.content_hash()
    assert set(body["data"]) == {PLACEMENT_KEY, SGLANG_KEY, ENGINE_FLAGS_KEY, "hash", "version"}
    published = read_published(body)
    assert published is not None
    assert published.placement == plan and published.version == 7
    assert published.rolled_out_at == NOW and published.resource_version == "42"


def test_published_eplb_placement_with_two_copies_on_a_gpu_reads_back() -> None:
    deepseek = placement([[0, 0, 1, 2, 3, 0]])  # GPU 0 holds expert 0 twice, as EPLB may
    body = configmap_body(
        name="demo-placement",
        namespace="ns",
        role="placement",
        owner=OWNER,
        placement=deepseek,
        version=3,
        rolled_out_at=NOW,
        resource_version="1",
        hidden_layers=1,
    )
    published = read_published(body)
    assert published is not None and published.placement == deepseek


@pytest.mark.parametrize("data", [None, {}, {PLACEMENT_KEY: "{not json"}])
def test_unreadable_configmap_is_no_placement(data: dict | None) -> None:
    assert read_published({"metadata": {}, "data": data} if data is not None else None) is None


def test_corrupt_map_keeps_its_version_so_the_next_one_is_newer() -> None:
    corrupt = {"metadata": {}, "data": {PLACEMENT_KEY: "{not json", "version": "5"}}
    assert read_published(corrupt) is None
    assert published_version(corrupt) == 5
    assert published_version(None) == 0
    assert published_version({"metadata": {}, "data": {"version": "x"}}) == 0


def test_sglang_map_pads_dense_layers_and_flags_match_it() -> None:
    """2 dense + 1 MoE + 1 trailing dense hidden layer; 2 GPUs x 3 slots = 4 experts + 2."""
    body = configmap_body(
        name="x",
        namespace="ns",
        role="placement",
        owner=OWNER,
        placement=placement([[0, 1, 2, 3, 0, 1]], dense=2),
        version=1,
        rolled_out_at=NOW,
        resource_version=None,
        hidden_layers=4,
    )
    rows = json.loads(body["data"][SGLANG_KEY])["physical_to_logical_map"]
    assert len(rows) == 4 and rows[2] == [0, 1, 2, 3, 0, 1]
    flags = json.loads(body["data"][ENGINE_FLAGS_KEY])
    assert flags["hiddenLayers"] == len(rows) and flags["denseLayersBefore"] == 2
    assert flags["physicalSlots"] == len(rows[0]) and flags["epSize"] == 2
    assert flags["sglangArgs"] == ["--ep-size", "2", "--ep-num-redundant-experts", "2"]
    assert json.loads(flags["vllmArgs"][-1]) == {"num_redundant_experts": 2}
    assert flags["vllmEplbConfig"] == {"num_redundant_experts": 2}


def test_target_patch_sets_pod_template_annotation() -> None:
    patch = target_patch(["spec", "template"], "abc")
    assert patch == {"spec": {"template": {"metadata": {"annotations": {HASH_ANNOTATION: "abc"}}}}}


def test_already_applied_compares_the_patched_fields_only() -> None:
    current = {"status": {"observedGeneration": 2, "placement": {"hash": "a", "old": 1}}}
    assert already_applied({"status": {"placement": {"hash": "a"}}}, current)
    assert not already_applied({"status": {"placement": {"hash": "b"}}}, current)
    assert not already_applied({"status": {"conditions": []}}, current)
