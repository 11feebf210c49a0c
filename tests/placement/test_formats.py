"""Placement files: canonical JSON, SGLang, vLLM slot map and EPLB arrays round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from placement_strategies import problems, random_placement

from placement.formats import (
    FORMATS,
    PlacementFormatError,
    dumps,
    loads,
    to_eplb,
    to_sglang,
)
from placement.model import MoEModelShape, Placement
from placement.validate import InvalidPlacementError


def _example() -> Placement:
    model = MoEModelShape(name="m", moe_layers=2, experts=3, dense_layers_before=1)
    return Placement.from_table([[0, 1, 2, 0], [2, 1, 0, 1]], model, 2, "test", seed=1)


@settings(max_examples=20, deadline=None)
@given(problems(with_curves=False), st.integers(0, 2**31), st.sampled_from(FORMATS))
def test_round_trip(problem, seed, fmt) -> None:  # type: ignore[no-untyped-def]
    p = random_placement(problem, seed)
    back = loads(dumps(p, fmt), fmt, p.model, p.num_gpus)
    assert back.phy2log == p.phy2log and back.num_gpus == p.num_gpus
    if fmt == "canonical":
        assert back == p


def test_sglang_pads_dense_layers() -> None:
    p = _example()
    obj = to_sglang(p, num_hidden_layers=4)
    rows = obj["physical_to_logical_map"]
    assert len(rows) == 4
    assert rows[0] == [0, 1, 2, 0] and rows[3] == [0, 1, 2, 0]  # dense rows: s % E
    assert rows[1:3] == p.phy2log
    assert loads(json.dumps(obj), "sglang", p.model, 2).phy2log == p.phy2log
    with pytest.raises(ValueError):
        to_sglang(p, num_hidden_layers=2)


def test_vllm_schema() -> None:
    obj = json.loads(dumps(_example(), "vllm"))
    assert obj["num_layers"] == 2 and obj["num_gpus"] == 2 and obj["slots_per_gpu"] == 2
    assert obj["layers"][1] == {"layer": 1, "model_layer": 2, "slots": [2, 1, 0, 1]}


def test_eplb_arrays() -> None:
    obj = to_eplb(_example())
    assert obj["logcnt"] == [[2, 1, 1], [1, 2, 1]]
    assert obj["log2phy"][0] == [[0, 3], [1, -1], [2, -1]]
    assert obj["log2phy"][1] == [[2, -1], [1, 3], [0, -1]]


def test_eplb_round_trip_and_wider_log2phy() -> None:
    p = _example()
    text = dumps(p, "eplb")
    assert loads(text, "eplb", p.model, 2, strategy=p.strategy).phy2log == p.phy2log
    obj = json.loads(text)
    # a log2phy wider than the largest count (our files before: P-E+1) still reads
    obj["log2phy"] = [[[*row, -1] for row in layer] for layer in obj["log2phy"]]
    assert loads(json.dumps(obj), "eplb", p.model, 2).phy2log == p.phy2log
    obj["log2phy"][1][1] = [3, 1, -1]  # expert 1's copies by rank: slot 3 first
    assert loads(json.dumps(obj), "eplb", p.model, 2).phy2log == p.phy2log
    obj["log2phy"][1][1] = [3, -1, -1]
    with pytest.raises(PlacementFormatError, match=r"does not list slot 1 \(expert 1\)"):
        loads(json.dumps(obj), "eplb", p.model, 2)


def test_clear_errors() -> None:
    p = _example()
    with pytest.raises(PlacementFormatError, match="numGpus"):
        loads(p.to_json().replace('"numGpus":2,', ""))
    with pytest.raises(PlacementFormatError, match="not JSON"):
        loads("{", "sglang", p.model, 2)
    with pytest.raises(PlacementFormatError, match="logical_count"):
        loads('{"logical_count": [[1, 2, 3]]}', "sglang", p.model, 2)
    with pytest.raises(PlacementFormatError, match="rows"):
        loads('{"physical_to_logical_map": [[0, 1, 2, 0]]}', "sglang", p.model, 2)
    bad = to_eplb(p)
    bad["logcnt"][0] = [1, 1, 2]
    with pytest.raises(PlacementFormatError, match="logcnt"):
        loads(json.dumps(bad), "eplb", p.model, 2)
    with pytest.raises(InvalidPlacementError, match="two copies"):
        loads(
            '{"phy2log": [[0, 0, 1, 2], [0, 1, 2, 0]]}', "eplb", p.model, 2, allow_duplicates=False
        )
    with pytest.raises(PlacementFormatError, match="outside"):
        loads('{"phy2log": [[0, 7, 1, 2], [0, 1, 2, 0]]}', "eplb", p.model, 2)


def test_canonical_is_camel_case_and_versioned() -> None:
    obj = json.loads(dumps(_example()))
    assert obj["apiVersion"] == "moeplace.io/v1alpha1" and obj["kind"] == "ExpertPlacement"
    assert obj["slotsPerGpu"] == 2 and obj["model"]["denseLayersBefore"] == 1
    assert np.array_equal(np.asarray(obj["phy2log"]), _example().table)


def test_canonical_checks_expected_shape() -> None:
    p = _example()
    with pytest.raises(PlacementFormatError, match="GPUs"):
        loads(p.to_json(), "canonical", p.model, 4)
    other = MoEModelShape(name="m", moe_layers=2, experts=4)
    with pytest.raises(InvalidPlacementError):
        loads(p.to_json(), "canonical", other, 2)


def test_placements_compare_by_fields_after_their_table_is_cached() -> None:
    shape = MoEModelShape(moe_layers=1, experts=4)
    first = Placement.from_table([[0, 1, 2, 3, 0, 1, 2, 3]], shape, num_gpus=2, strategy="x")
    again = Placement.model_validate_json(first.to_json())
    other = Placement.from_table([[1, 0, 2, 3, 0, 1, 2, 3]], shape, num_gpus=2, strategy="x")
    assert first.table.shape == again.table.shape == other.table.shape  # caches the arrays
    assert first == again and hash(first) == hash(again)
    assert first != other
