"""``moeplace solve``: every strategy and format, JSON and table output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import moeplace_cli.main as cli_main
import pytest
from cli_helpers import EXPERTS, FIRST_LAYER, GPUS, LAYERS, Scenario, run
from rich.console import Console

from placement.formats import FORMATS
from placement.load import read_counts_csv
from placement.model import Placement
from placement.solvers import strategies
from placement.solvers.eplb import rebalance_experts
from placement.validate import validate

FAST = ("--time-limit", "0.5", "--threads", "1")


@pytest.mark.parametrize("strategy", [*strategies(), "cpsat-best"])
def test_solve_every_strategy(scenario: Scenario, strategy: str) -> None:
    out = scenario.tmp / f"{strategy}.json"
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
              "--strategy", strategy, *FAST, "--out", out, "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    placement = Placement.model_validate_json(out.read_text())
    validate(placement, allow_duplicates=strategy.startswith("eplb"))  # DeepSeek's output as is
    assert placement.table.shape == (LAYERS, EXPERTS + 4)
    assert placement.num_gpus == GPUS
    assert placement.model.dense_layers_before == FIRST_LAYER
    assert summary["strategy"] == strategy
    assert summary["contentHash"] == placement.content_hash()
    assert summary["straggler"] >= summary["fluidBound"] * (1 - 1e-9)
    assert 0 < summary["balancedness"] <= 1
    assert summary["slotsPerGpu"] == 3 and summary["timeUnit"] == "token-time"


@pytest.mark.parametrize(("strategy", "hedged"), [("cpsat", 32), ("cpsat-best", 4)])
def test_samples_hedged_as_the_dispatch_needs(
    scenario: Scenario, strategy: str, hedged: int
) -> None:
    """Even split hedges over the load model's 32 bootstrap samples of the mean; the best
    split (cpsat-best) over the 4 windows themselves, as the operator does."""
    ran = run("solve", "--samples", scenario.samples, "--window", 10, "--gpus", scenario.gpus,
              "--redundant", 4, "--strategy", strategy, *FAST, "--out",
              scenario.tmp / "p.json", "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert ran.json()["hedgeSamples"] == hedged


def test_solve_table_output(scenario: Scenario) -> None:
    out = scenario.tmp / "p.json"
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--strategy", "greedy",
              "--out", out)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert "straggler" in ran.stdout and "fluid bound" in ran.stdout
    assert out.is_file()


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_round_trip_through_evaluate(scenario: Scenario, fmt: str) -> None:
    out = scenario.tmp / f"p.{fmt}.json"
    solved = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
                 "--strategy", "greedy", "--format", fmt, "--out", out, "--json")  # fmt: skip
    assert solved.exit_code == 0, solved.stderr
    json.loads(out.read_text())
    scored = run("evaluate", "--placement", out, "--load", scenario.load, "--gpus",
                 scenario.gpus, "--json")  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
    assert scored.json()["straggler"] == pytest.approx(solved.json()["straggler"])
    assert scored.json()["contentHash"] == solved.json()["contentHash"]


def test_sglang_rows_include_dense_layers(scenario: Scenario) -> None:
    """The samples npz has no moe_layer_index: --dense-layers says it."""
    out = scenario.tmp / "sglang.json"
    ran = run("solve", "--samples", scenario.samples, "--window", 10, "--gpus", scenario.gpus,
              "--strategy", "eplb", "--format", "sglang", "--dense-layers", 3, "--out", out,
              "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    rows = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(rows) == 3 + LAYERS and rows[0] == list(range(EXPERTS))
    flags = ran.json()["engineFlags"]
    assert isinstance(flags, dict) and flags["hiddenLayers"] == 3 + LAYERS


def test_solve_with_curves_and_transitions(scenario: Scenario) -> None:
    out = scenario.tmp / "p.json"
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.profile, "--redundant", 4,
              "--transitions", scenario.transitions, "--traffic-weight", 0.01, *FAST,
              "--out", out, "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    assert summary["timeUnit"] == "us"
    assert 0 <= summary["trafficShare"] <= 1
    assert summary["gap"] >= 0


def test_progress_bar_on_a_terminal(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = io.StringIO()
    terminal = Console(file=sink, force_terminal=True, width=100)
    monkeypatch.setattr(cli_main, "err_console", terminal)
    out = scenario.tmp / "p.json"
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--strategy", "cpsat",
              *FAST, "--out", out)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert "cpsat" in sink.getvalue()


def test_progress_bar_reports_fractions(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(cli_main, "err_console", terminal)
    with cli_main.progress_bar("x", enabled=True) as progress:
        assert progress is not None
        progress(0.5)
        progress(1.0)
    with cli_main.progress_bar("x", enabled=False) as progress:
        assert progress is None


def test_seed_is_reproducible(scenario: Scenario, tmp_path: Path) -> None:
    hashes = set()
    for i in range(2):
        ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
                  "--strategy", "greedy", "--seed", 3, "--out", tmp_path / f"{i}.json",
                  "--json")  # fmt: skip
        hashes.add(ran.json()["contentHash"])
    assert len(hashes) == 1


def test_current_placement_and_migration_weight(scenario: Scenario) -> None:
    current = scenario.tmp / "current.eplb.json"
    base = ("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4)
    assert run(*base, "--strategy", "eplb", "--format", "eplb", "--out", current).exit_code == 0
    moved = {}
    for weight in (0.0, 1e6):
        ran = run(*base, "--strategy", "greedy", "--current", current, "--migration-weight",
                  weight, "--out", scenario.tmp / "p.json", "--json")  # fmt: skip
        assert ran.exit_code == 0, ran.stderr
        moved[weight] = ran.json()["moved"]
    assert isinstance(moved[1e6], int) and moved[1e6] <= moved[0.0]  # type: ignore[operator]


def test_migration_weight_needs_current(scenario: Scenario) -> None:
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--migration-weight", 1,
              "--out", scenario.tmp / "p.json")  # fmt: skip
    assert ran.exit_code == 2 and "--migration-weight needs --current" in ran.stderr


def test_eplb_file_holds_deepseeks_arrays(scenario: Scenario) -> None:
    out = scenario.tmp / "deepseek.json"
    ran = run("solve", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
              "--strategy", "eplb-global", "--format", "eplb", "--out", out)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    counts, _ = read_counts_csv(scenario.load)
    phy2log, log2phy, logcnt = rebalance_experts(counts, EXPERTS + 4, 1, 1, GPUS)
    written = json.loads(out.read_text())
    assert written["phy2log"] == phy2log.tolist() and written["logcnt"] == logcnt.tolist()
    assert written["log2phy"] == log2phy.tolist()  # by replica rank, [L, E, max logcnt]
