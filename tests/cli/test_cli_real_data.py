"""The command line on the shared real data (skips cleanly where ../shared/data is absent):
DeepSeek-V2-Lite routing counts, PAL speed factors, H200 latency curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import H200, PAL, ROUTING, run

from placement.gpus import GPUProfile, read_gpus_csv

COUNTS = ROUTING / "expert_counts.csv"
TRANSITIONS = ROUTING / "layer_transition_counts.npy"
pytestmark = pytest.mark.skipif(
    not (COUNTS.is_file() and PAL.is_file() and H200.is_file()), reason="shared data absent"
)


@pytest.fixture
def pal32(tmp_path: Path) -> Path:
    out = tmp_path / "pal32.csv"
    ran = run("gpus", "pal", PAL, "--class", "A", "--out", out)
    assert ran.exit_code == 0, ran.stderr
    return out


def test_gpus_builders_and_show(tmp_path: Path, pal32: Path) -> None:
    cluster = read_gpus_csv(pal32)
    assert cluster.size == 32 and len(cluster.nodes) == 8
    profile = tmp_path / "h200.json"
    ran = run("gpus", "h200", H200, "--shape", "deepseek-v2-lite", "--num-gpus", 8,
              "--out", profile)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert len(GPUProfile.model_validate_json(profile.read_text()).gpus) == 8
    shown = run("gpus", "show", profile)
    assert shown.exit_code == 0 and "13 points" in shown.stdout
    assert run("gpus", "pal", PAL, "--class", "Q", "--out", tmp_path / "x.csv").exit_code == 2


def test_solve_and_evaluate_sglang(tmp_path: Path, pal32: Path) -> None:
    out = tmp_path / "sglang.json"
    solved = run("solve", "--load", COUNTS, "--gpus", pal32, "--redundant", 32, "--strategy",
                 "greedy", "--format", "sglang", "--out", out, "--json")  # fmt: skip
    assert solved.exit_code == 0, solved.stderr
    rows = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(rows) == 1 + 26 and all(len(r) == 96 for r in rows)  # dense layer 0 + 26 MoE
    scored = run("evaluate", "--placement", out, "--load", COUNTS, "--gpus", pal32,
                 "--transitions", TRANSITIONS, "--json")  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
    summary = scored.json()
    assert summary["straggler"] == pytest.approx(solved.json()["straggler"])
    assert 1.0 <= float(summary["ratio"]) < 1.1  # type: ignore[arg-type]
    assert 0 < float(summary["trafficShare"]) < 1  # type: ignore[arg-type]


def test_compare_on_pal(tmp_path: Path, pal32: Path) -> None:
    png = tmp_path / "compare.png"
    ran = run("compare", "--load", COUNTS, "--gpus", pal32, "--redundant", 32, "--strategies",
              "cpsat,eplb,greedy", "--time-limit", 1, "--threads", 2, "--png", png,
              "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    rows = {r["strategy"]: r for r in ran.json()["strategies"]}  # type: ignore[attr-defined]
    assert rows["greedy"]["straggler"] < rows["eplb"]["straggler"]
    assert rows["cpsat"]["straggler"] <= rows["greedy"]["straggler"] * (1 + 1e-9)
    assert png.stat().st_size > 10_000


def test_solve_with_h200_curves(tmp_path: Path) -> None:
    profile = tmp_path / "h200.json"
    assert run("gpus", "h200", H200, "--num-gpus", 8, "--out", profile).exit_code == 0
    ran = run("solve", "--load", COUNTS, "--gpus", profile, "--redundant", 8, "--strategy",
              "eplb", "--out", tmp_path / "p.json", "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    assert summary["timeUnit"] == "us" and summary["gpus"] == 8
