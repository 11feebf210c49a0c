"""``moeplace compare``: every strategy on one scenario, table, JSON and PNG."""

from __future__ import annotations

from cli_helpers import Scenario, run

from placement.solvers import strategies

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_every_strategy_json_and_png(scenario: Scenario) -> None:
    png = scenario.tmp / "compare.png"
    ran = run("compare", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
              "--time-limit", 0.5, "--threads", 1, "--png", png, "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    summary = ran.json()
    rows = summary["strategies"]
    assert isinstance(rows, list)
    assert [r["strategy"] for r in rows] == strategies()
    by_name = {r["strategy"]: r for r in rows}
    assert by_name["eplb"]["vsEplb"] == 1.0
    assert all(r["straggler"] >= r["fluidBound"] * (1 - 1e-9) for r in rows)
    assert summary["png"] == str(png)
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_compare_table_subset_with_curves(scenario: Scenario) -> None:
    png = scenario.tmp / "c.png"
    ran = run("compare", "--load", scenario.load, "--gpus", scenario.profile, "--strategies",
              "greedy,linear", "--dispatch", "speed-aware", "--png", png)  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert "greedy" in ran.stdout and "linear" in ran.stdout and "eplb" not in ran.stdout
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_compare_without_eplb_has_no_relative_column(scenario: Scenario) -> None:
    ran = run("compare", "--load", scenario.load, "--gpus", scenario.gpus, "--strategies",
              "linear", "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    rows = ran.json()["strategies"]
    assert isinstance(rows, list) and rows[0]["vsEplb"] is None


def test_best_dispatch_adds_cpsat_best(scenario: Scenario) -> None:
    ran = run("compare", "--load", scenario.load, "--gpus", scenario.gpus, "--redundant", 4,
              "--dispatch", "speed-aware", "--time-limit", 0.3, "--threads", 1,
              "--json")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    rows = ran.json()["strategies"]
    assert isinstance(rows, list)
    assert [r["strategy"] for r in rows] == sorted([*strategies(), "cpsat-best"])
