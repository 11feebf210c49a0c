"""Bad input, unit level (issue 13): specs the schema must refuse, garbage node labels and
annotations, broken load CSVs and Pinned placements, an oversized placement ConfigMap. Each is
refused with a reason and a readable message, never an unexpected exception (the real API
server's side is e2e/test_e2e_badinput.py)."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moeplace_operator.act import MAX_CONFIGMAP_BYTES, check_size, configmap_size
from moeplace_operator.build import configmap_body, model_shape
from moeplace_operator.loadsource import LoadData, MetricsUnavailableError, parse_load_csv
from moeplace_operator.nodes import (
    MAX_RELATIVE_SPEED,
    NodeGPUs,
    NodesUnavailableError,
    build_gpu_group,
    check_group_inputs,
    node_gpus,
    read_curves,
    read_speeds,
)
from moeplace_operator.planning import score_pinned
from moeplace_operator.runtime import DegradedError
from moeplace_operator.spec import MAX_TOTAL_SLOTS, GPUSpec, ModelSpec, MoEDeploymentSpec
from pydantic import ValidationError

from placement.formats import parse_canonical
from placement.model import Placement
from placement.names import CURVES_ANNOTATION

pytestmark = pytest.mark.badinput

GPUS = GPUSpec(node_selector={"pool": "a"}, node_count=2, gpus_per_node=2)
MODEL = ModelSpec(
    name="m", moe_layers=2, experts_per_layer=4, dense_layers_before=0, hidden_layers=2
)
CURVE = {"tokens": [0, 128], "micros": [0.0, 40.0]}


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"name": "m", "moeLayers": 2, "expertsPerLayer": 4},
        "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 2, "gpusPerNode": 2},
        "load": {"prometheus": {"url": "http://prom:9090", "window": "1h", "samples": 6}},
    }
    body["model"] |= {"denseLayersBefore": 0, "hiddenLayers": 2}
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return body


# --- the spec: what the CRD refuses, the operator's own reading refuses too -----------------


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("load.prometheus.window", "5s", "window / samples must be at least 1s"),
        ("load.prometheus.window", "0d", "window / samples must be at least 1s"),
        ("load.prometheus.window", "999999h", "should match pattern"),  # overflowed timedelta
        ("load.prometheus.halfLife", "0s0ms", "halfLife must be longer than 0"),
        ("placement.seed", 2**31, "less than or equal to 2147483647"),
        ("placement.trafficWeight", 1e300, "less than or equal to 1000000"),
        ("load.static", {"configMapName": "c", "key": "../etc/passwd"}, "should match pattern"),
        ("load.prometheus.query", "x" * 4097, "at most 4096 characters"),
        ("model.moeLayers", 512, "must not exceed 65536 slots"),
    ],
)
def test_spec_refusals_name_the_rule(path: str, value: Any, message: str) -> None:
    body = spec(**{path: value})
    if path.startswith("load.static"):
        del body["load"]["prometheus"]
    body["model"]["expertsPerLayer"] = 256 if path == "model.moeLayers" else 4
    body["model"]["hiddenLayers"] = max(2, body["model"]["moeLayers"])
    with pytest.raises(ValidationError, match=re.escape(message)):
        MoEDeploymentSpec.model_validate(body)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("load.prometheus.window", "6s"),  # exactly 1 s per sub-window
        ("load.prometheus.window", "1d"),
        ("load.prometheus.halfLife", "1ms"),
        ("placement.seed", 2**31 - 1),
        ("model.moeLayers", MAX_TOTAL_SLOTS // 256),  # exactly the slot bound
    ],
)
def test_spec_edge_values_are_accepted(path: str, value: Any) -> None:
    body = spec(**{path: value})
    body["model"]["expertsPerLayer"] = 256 if path == "model.moeLayers" else 4
    body["model"]["hiddenLayers"] = max(2, body["model"]["moeLayers"])
    body["gpus"] |= {"nodeCount": 1, "gpusPerNode": 4}
    MoEDeploymentSpec.model_validate(body)


# --- nodes: garbage labels and annotations refuse the EP group, with the values named -------


def gpu_node(
    name: str,
    speeds: dict[int, str],
    curves: str | None = None,
    capacity: int | None = 2,
    pool: str = "a",
) -> NodeGPUs:
    labels = {"pool": pool} | {f"gpu.moeplace.io/speed-{i}": v for i, v in speeds.items()}
    annotations = {CURVES_ANNOTATION: curves} if curves is not None else {}
    return node_gpus(name, labels, annotations, capacity=capacity)


def refusal(nodes: list[NodeGPUs]) -> NodesUnavailableError:
    group = build_gpu_group(nodes, GPUS)  # the group forms: the refusal is about its inputs
    chosen = [n for n in nodes if n.name in group.nodes]
    with pytest.raises(NodesUnavailableError) as error:
        check_group_inputs(chosen, GPUS)
    return error.value


GOOD = {0: "1.0", 1: "0.95"}


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-1", "0", "fast", "", "0x1p3"])
def test_garbage_speed_label_is_refused_with_the_value(value: str) -> None:
    error = refusal([gpu_node("n0", GOOD), gpu_node("n1", {0: "1.0", 1: value})])
    assert error.reason == "BadSpeedLabels"
    assert f"n1 gpu.moeplace.io/speed-1={value!r}" in str(error)


@pytest.mark.parametrize(
    ("annotation", "why"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"zero": CURVE}), "invalid literal for int()"),
        (json.dumps({"-1": CURVE}), "GPU indices must be >= 0"),
        ('{"0": {"tokens": [0, 128], "micros": [0, NaN]}}', "finite and non-negative"),
        (json.dumps({"0": {"tokens": [128, 0], "micros": [0, 40]}}), "strictly increasing"),
        (json.dumps({"0": {"tokens": [0], "micros": [0]}}), "invalid curve"),
    ],
)
def test_malformed_latency_curves_are_refused(annotation: str, why: str) -> None:
    error = refusal([gpu_node("n0", GOOD), gpu_node("n1", GOOD, curves=annotation)])
    assert error.reason == "BadLatencyCurves"
    assert "n1: " in str(error) and why in str(error)


def test_gpu_count_mismatch_from_capacity_or_labels() -> None:
    error = refusal([gpu_node("n0", GOOD, capacity=4), gpu_node("n1", GOOD)])
    assert error.reason == "GPUCountMismatch"
    assert "gpusPerNode is 2 but n0 has 4 (nvidia.com/gpu capacity)" in str(error)
    labelled = {**GOOD, 5: "1.0"}
    error = refusal([gpu_node("n0", GOOD), gpu_node("n1", labelled, capacity=None)])
    assert error.reason == "GPUCountMismatch" and "n1 has speed labels for GPU 5" in str(error)


def test_garbage_outside_the_group_is_not_its_problem() -> None:
    other = gpu_node("n2", {0: "inf"}, curves="{", capacity=8, pool="b")
    nodes = [gpu_node("n0", GOOD), gpu_node("n1", GOOD), other]
    group = build_gpu_group(nodes, GPUS)
    check_group_inputs([n for n in nodes if n.name in group.nodes], GPUS)  # no refusal
    assert group.profiled and group.nodes == ["n0", "n1"]


@settings(max_examples=200, derandomize=True)
@given(st.dictionaries(st.integers(0, 99), st.text(max_size=12), max_size=6))
def test_every_speed_label_is_read_or_refused(values: dict[int, str]) -> None:
    labels = {f"gpu.moeplace.io/speed-{i}": v for i, v in values.items()}
    speeds, refused = read_speeds(labels)
    assert set(speeds) | set(refused) == set(values) and not set(speeds) & set(refused)
    assert all(0 < s <= MAX_RELATIVE_SPEED and math.isfinite(s) for s in speeds.values())


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)


@settings(max_examples=200, derandomize=True)
@given(st.dictionaries(st.sampled_from(["0", "1", "x", "-1"]), JSON, max_size=3) | JSON)
def test_any_curve_annotation_is_read_or_refused(raw: Any) -> None:
    curves, why = read_curves(json.dumps(raw))  # never raises
    assert why is None or (curves == {} and why)
    for curve in curves.values():
        assert all(math.isfinite(m) and m >= 0 for m in curve.micros)


# --- load CSV: every broken file is BadLoadCSV, never a solve on wrong numbers --------------

HEADER = "moe_layer_index,expert_id,count\n"
ROWS = "".join(f"{layer},{e},{10 + e}\n" for layer in (1, 2) for e in range(4))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no rows"),
        (HEADER, "has no rows"),
        ("layer,expert,tokens\n1,0,5\n", "expected columns"),
        (HEADER + "1,0\n", "expected columns"),  # ragged: a field missing
        (HEADER + ROWS.replace("1,2,12", "1,2,nan"), "counts must be finite and >= 0"),
        (HEADER + ROWS.replace("1,2,12", "1,2,-3"), "counts must be finite and >= 0"),
        (HEADER + ROWS + "1,0,1\n", "appears twice"),
        (HEADER + ROWS + "3,0,1\n", "outside the model shape 2x4"),
        (HEADER + ROWS.replace("1,3,13", "1,4,13"), "outside the model shape 2x4"),
        (HEADER + "".join(f"1,{e},1\n" for e in range(4)), "MoE layer 1 (layer 2 in the file)"),
        (HEADER + "".join(f"{layer},{e},0\n" for layer in (1, 2) for e in range(4)), "sum to 0"),
        (HEADER + ROWS.replace("1,0,10", "1,0,1e308").replace("1,1,11", "1,1,1e308"), "inf"),
    ],
)
def test_broken_load_csv_is_bad_load_csv(text: str, message: str) -> None:
    with pytest.raises(MetricsUnavailableError, match=re.escape(message)) as error:
        parse_load_csv(text, MODEL)
    assert error.value.reason == "BadLoadCSV"


@settings(max_examples=150, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(st.sampled_from(["1", "2", "0", "-1", "3", "1e400", "nan", "x", ""]), max_size=4),
        max_size=10,
    )
)
def test_any_load_csv_is_a_valid_load_or_bad_load_csv(rows: list[list[str]]) -> None:
    text = HEADER + "".join(",".join(row) + "\n" for row in rows)
    try:
        load = parse_load_csv(text, MODEL)
    except MetricsUnavailableError as error:
        assert error.reason == "BadLoadCSV"
        return
    assert load.shape == (2, 4) and np.isfinite(load).all() and (load >= 0).all()
    assert load.sum() > 0


# --- Pinned placements: anything git holds is a placement or a readable refusal -------------

SPEC = MoEDeploymentSpec.model_validate(spec())
PINNED = Placement.from_table(
    [[0, 1, 2, 3], [3, 2, 1, 0]], model=model_shape(SPEC.model), num_gpus=4, strategy="git"
)


def mutations() -> st.SearchStrategy[str]:
    """The valid pinned JSON with one value replaced: huge, negative, fractional, text."""
    original = json.loads(PINNED.to_json())
    paths = [("numGpus",), ("slotsPerGpu",), ("model", "experts"), ("model", "moeLayers")]
    paths += [("phy2log", 0, 1), ("phy2log", 1)]
    values = st.sampled_from([10**30, -1, 0, 2**31, 2.5, "3", None, [], [[]], {}])

    def mutate(path: tuple[str | int, ...], value: Any) -> str:
        copy = json.loads(json.dumps(original))
        node = copy
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return json.dumps(copy)

    return st.builds(mutate, st.sampled_from(paths), values) | st.text(max_size=40)


@settings(max_examples=150, derandomize=True)
@given(mutations())
def test_any_pinned_text_is_scored_or_refused_readably(text: str) -> None:
    group = build_gpu_group([gpu_node("n0", GOOD), gpu_node("n1", GOOD)], SPEC.gpus)
    load = LoadData(np.ones((2, 4)), None, "test")
    try:
        placement = parse_canonical(text)
        scored = score_pinned(placement, SPEC, group, load)
    except ValueError as error:  # what read_pinned turns into PinnedInvalid
        assert str(error)
        return
    assert math.isfinite(scored.straggler)


def test_phy2log_beyond_int32_is_refused_before_numpy() -> None:
    text = PINNED.to_json().replace('"phy2log":[[0,', f'"phy2log":[[{10**30},')
    assert str(10**30) in text
    with pytest.raises(
        ValueError, match=re.escape("phy2log entries must be expert ids in 0..2147483647")
    ):
        parse_canonical(text)


# --- the placement ConfigMap: over 1 MiB is refused before the write ------------------------


def test_placement_configmap_over_1_mib_is_placement_too_large() -> None:
    experts, layers, hidden = 512, 64, 1024  # 32768 slots: within the spec's bound
    table = [list(range(experts)) for _ in range(layers)]
    shape = PINNED.model.model_copy(update={"experts": experts, "moe_layers": layers})
    placement = Placement.from_table(table, model=shape, num_gpus=8, strategy="cpsat")
    owner = {"metadata": {"name": "big", "uid": "u"}, "apiVersion": "v", "kind": "K"}
    args: dict[str, Any] = {
        "name": "big-placement",
        "namespace": "ns",
        "role": "placement",
        "owner": owner,
        "placement": placement,
        "version": 1,
        "rolled_out_at": datetime(2026, 1, 1, tzinfo=UTC),
        "resource_version": None,
    }
    fits = configmap_body(**args, hidden_layers=layers)
    check_size("big-placement", fits)  # 64 rows x 512: well under the limit
    big = configmap_body(**args, hidden_layers=hidden)
    assert configmap_size(big) > MAX_CONFIGMAP_BYTES > configmap_size(fits)
    with pytest.raises(DegradedError) as error:
        check_size("big-placement", big)
    assert error.value.reason == "PlacementTooLarge"
    assert f"over the {MAX_CONFIGMAP_BYTES}-byte limit" in str(error.value)
    assert error.value.updates[0].reason == "PlacementTooLarge"
