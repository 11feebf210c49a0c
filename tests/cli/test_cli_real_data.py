"""The command line on the shared real data (skips cleanly where ../shared/data is absent):
DeepSeek-V2-Lite routing counts, PAL speed factors, H200 latency curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import H200, PAL, ROUTING, run

from placement.gpus import GPUProfile, read_gpus_csv

COUNTS = ROUTING / "expert_counts.csv"
PER_PROMPT = ROUTING / "per_prompt_expert_counts.npz"
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


def test_samples_without_dense_layers_give_the_hidden_layers(tmp_path: Path, pal32: Path) -> None:
    """The issue's case: ``--samples`` with no --dense-layers. The npz's moe_layer_index
    (1..26) says one dense layer; 27 rows: row 0 the dense padding, rows 1..26 the MoE layers."""
    solved = {}
    for fmt in ("sglang", "canonical"):
        out = tmp_path / f"{fmt}.json"
        ran = run("solve", "--samples", PER_PROMPT, "--gpus", pal32, "--redundant", 32,
                  "--strategy", "round-robin", "--format", fmt, "--out", out, "--json")  # fmt: skip
        assert ran.exit_code == 0, ran.stderr
        solved[fmt] = json.loads(out.read_text())
    rows = solved["sglang"]["physical_to_logical_map"]
    assert len(rows) == 27 and rows[0] == [s % 64 for s in range(96)]
    assert rows[1:] == solved["canonical"]["phy2log"]
    assert solved["canonical"]["model"]["denseLayersBefore"] == 1


def test_real_data_agrees_with_the_preset_and_refuses_another(tmp_path: Path, pal32: Path) -> None:
    out = tmp_path / "sglang.json"
    ran = run("solve", "--samples", PER_PROMPT, "--gpus", pal32, "--redundant", 32, "--strategy",
              "round-robin", "--format", "sglang", "--model", "deepseek-v2-lite", "--out", out,
              "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    assert summary["hiddenLayers"] == 27
    assert summary["sglangFlags"] == "--ep-size 32 --ep-num-redundant-experts 32"
    bad = tmp_path / "x.json"
    refused = run("solve", "--samples", PER_PROMPT, "--gpus", pal32, "--strategy", "round-robin",
                  "--format", "sglang", "--dense-layers", 0, "--out", bad)  # fmt: skip
    assert refused.exit_code == 2
    assert "says 1, --dense-layers says 0" in refused.stderr
    assert not bad.exists()


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
