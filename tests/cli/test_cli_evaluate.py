"""``moeplace evaluate``: format detection, dispatch rules, moved copies, traffic share."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import FIRST_LAYER, LAYERS, Scenario, run


def _solve(scenario: Scenario, strategy: str = "eplb", fmt: str = "canonical") -> Path:
    out = scenario.tmp / f"{strategy}.{fmt}.json"
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
              "--strategy", strategy, "--format", fmt, "--out", out)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    return out


def _evaluate(scenario: Scenario, placement: Path, *extra: str | Path) -> dict[str, object]:
    ran = run("evaluate", "--placement", placement, "--load", scenario.load, "--gpus",
              scenario.gpus, "--json", *extra)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    return ran.json()


def test_best_dispatch_is_no_worse_than_even(scenario: Scenario) -> None:
    placement = _solve(scenario)
    even = _evaluate(scenario, placement)
    best = _evaluate(scenario, placement, "--dispatch", "speed-aware")
    assert best["dispatch"] == "speed-aware"
    assert float(best["straggler"]) <= float(even["straggler"]) * (1 + 1e-9)  # type: ignore[arg-type]
    assert float(best["straggler"]) >= float(best["fluidBound"]) * (1 - 1e-9)  # type: ignore[arg-type]


def test_per_layer_times_and_bounds(scenario: Scenario) -> None:
    summary = _evaluate(scenario, _solve(scenario))
    times, fluid = summary["layerTime"], summary["layerFluid"]
    assert isinstance(times, list) and isinstance(fluid, list)
    assert len(times) == len(fluid) == LAYERS
    assert all(t >= f * (1 - 1e-9) for t, f in zip(times, fluid, strict=True))
    assert sum(times) == pytest.approx(summary["straggler"])


def test_moved_copies_against_previous(scenario: Scenario) -> None:
    eplb, greedy = _solve(scenario, "eplb"), _solve(scenario, "greedy", "vllm")
    assert _evaluate(scenario, eplb, "--previous", eplb)["moved"] == 0
    moved = _evaluate(scenario, greedy, "--previous", eplb)["moved"]
    assert isinstance(moved, int) and moved >= 0
    assert "moved" not in _evaluate(scenario, eplb)


def test_traffic_share_with_transitions(scenario: Scenario) -> None:
    summary = _evaluate(scenario, _solve(scenario), "--transitions", scenario.transitions)
    share = summary["trafficShare"]
    assert isinstance(share, float) and 0 <= share <= 1
    assert _evaluate(scenario, _solve(scenario))["trafficShare"] is None


def test_transitions_as_csv_read_like_the_npy(scenario: Scenario) -> None:
    """The CSV the serving library's ``transitions_csv()`` writes (source layers numbered like
    the load CSV), plain and gzipped."""
    trans = np.load(scenario.transitions)
    rows = ["moe_layer_index,src_expert,dst_expert,count"] + [
        f"{FIRST_LAYER + b},{i},{j},{int(trans[b, i, j])}"
        for b, i, j in zip(*np.nonzero(trans), strict=True)
    ]
    plain = scenario.tmp / "trans.csv"
    plain.write_text("\n".join(rows) + "\n")
    packed = scenario.tmp / "trans.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    placed = _solve(scenario)
    expected = _evaluate(scenario, placed, "--transitions", scenario.transitions)["trafficShare"]
    for path in (plain, packed):
        assert _evaluate(scenario, placed, "--transitions", path)["trafficShare"] == expected


def test_table_output(scenario: Scenario) -> None:
    ran = run("evaluate", "--placement", _solve(scenario, fmt="sglang"), "--load", scenario.load,
              "--gpus", scenario.gpus)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert "straggler / fluid bound" in ran.stdout


def test_per_layer_table(scenario: Scenario) -> None:
    ran = run("evaluate", "--placement", _solve(scenario), "--load", scenario.load, "--gpus",
              scenario.gpus, "--per-layer")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert "slowest GPU" in ran.stdout
    summary = _evaluate(scenario, _solve(scenario))
    assert summary["layerIds"] == [1, 2, 3]
    slowest = summary["layerSlowestGpu"]
    assert isinstance(slowest, list) and len(slowest) == LAYERS


def test_two_copies_on_a_gpu_warn_or_are_refused_for_deepep(scenario: Scenario) -> None:
    row = [0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]  # GPU 0 (slots 0-2) holds expert 0 twice
    path = scenario.tmp / "deepseek.eplb.json"
    path.write_text(json.dumps({"phy2log": [row] * LAYERS}))
    ran = run("evaluate", "--placement", path, "--load", scenario.load, "--gpus", scenario.gpus,
              "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert "warning" in ran.stderr and "3 extra copies" in ran.stderr
    assert float(ran.json()["straggler"]) > 0  # type: ignore[arg-type]
    refused = run("evaluate", "--placement", path, "--load", scenario.load, "--gpus",
                  scenario.gpus, "--engine", "sglang-deepep")  # fmt: skip
    assert refused.exit_code != 0
    assert "DeepEP loads only the first copy" in refused.stderr
