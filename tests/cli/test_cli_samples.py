"""Load as windows of prompts (``--samples``): hedged solves, per-window scores, and scoring
on prompts the placement never saw (``compare --score-prompts``)."""

from __future__ import annotations

import pytest
from cli_helpers import LAYERS, Scenario, run

FAST = ("--time-limit", "0.5", "--threads", "1")


@pytest.mark.parametrize("hedge", ["expected", "robust"])
def test_solve_on_windows(scenario: Scenario, hedge: str) -> None:
    out = scenario.tmp / "p.json"
    ran = run("solve", "--samples", scenario.samples, "--window", 10, "--prompts", "0:30",
              "--gpus", scenario.gpus, "--redundant", 4, "--hedge", hedge, *FAST,
              "--out", out, "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    assert summary["load"] == "per_prompt.npz prompts 0:30 in 3 windows of 10"
    assert summary["straggler"] >= summary["fluidBound"] * (1 - 1e-9)


def test_evaluate_per_window(scenario: Scenario) -> None:
    out = scenario.tmp / "p.json"
    solved = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--strategy", "eplb",
                 "--out", out)  # fmt: skip
    assert solved.exit_code == 0, solved.stderr
    ran = run("evaluate", "--placement", out, "--samples", scenario.samples, "--window", 8,
              "--gpus", scenario.gpus, "--dense-layers", 1, "--dispatch", "speed-aware",
              "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    assert summary["batches"] == 5
    assert isinstance(summary["layerTime"], list) and len(summary["layerTime"]) == LAYERS


def test_compare_scores_on_unseen_prompts(scenario: Scenario) -> None:
    ran = run("compare", "--samples", scenario.samples, "--window", 10, "--prompts", "0:20",
              "--score-prompts", "20:40", "--gpus", scenario.gpus, "--redundant", 4,
              "--strategies", "eplb,greedy", "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    scenario_info = ran.json()["scenario"]
    assert isinstance(scenario_info, dict)
    assert scenario_info["scored"] == "per_prompt.npz prompts 20:40 in 2 windows of 10"
    table = run("compare", "--samples", scenario.samples, "--window", 10, "--prompts", "0:20",
                "--score-prompts", "20:", "--gpus", scenario.gpus,
                "--strategies", "greedy")  # fmt: skip
    assert table.exit_code == 0
    assert "scored on per_prompt.npz prompts 20:40" in " ".join(table.stdout.split())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--load", "LOAD", "--samples", "SAMPLES"], "one of them"),
        ([], "one of them"),
        (["--load", "LOAD", "--prompts", "0:10"], "--prompts needs --samples"),
        (["--samples", "SAMPLES", "--prompts", "10"], "expected START:STOP"),
        (["--samples", "SAMPLES", "--prompts", "20:10"], "empty or negative range"),
        (["--samples", "SAMPLES", "--window", "100"], "make no window of 100"),
        (["--load", "LOAD", "--score-prompts", "0:10"], "--score-prompts needs --samples"),
    ],
)
def test_load_source_errors(scenario: Scenario, extra: list[str], message: str) -> None:
    paths = {"LOAD": str(scenario.load), "SAMPLES": str(scenario.samples)}
    args = [paths.get(a, a) for a in extra]
    ran = run("compare", "--gpus", scenario.gpus, "--strategies", "linear", *args)
    assert ran.exit_code == 2, (ran.stdout, ran.stderr)
    assert ran.stderr.startswith("moeplace: error: ") and ran.stderr.count("\n") == 1
    assert message in ran.stderr
