"""``moeplace simulate``: one serving simulation from a scenario file (see
docs/simulator/README.md): latency percentiles, SLO attainment, throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moeplace_cli.errors import bad_input, reports_errors

console = Console()


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"policy {summary['policy']}: {summary['finished']}/{summary['requests']} "
                  "requests finished")  # fmt: skip
    for label in ("", "P50", "P90", "P99"):
        table.add_column(label, justify="right")
    for key, label in (("ttft_s", "TTFT s"), ("tpot_s", "TPOT s"), ("e2e_s", "end-to-end s")):
        row = summary[key]
        table.add_row(label, *(f"{row[p]:.4f}" for p in ("p50", "p90", "p99")))
    return table


@reports_errors
def simulate_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario JSON (a SimConfig).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Simulate expert-parallel serving of the routing trace under a placement policy."""
    from moeplace_sim.config import SimConfig
    from moeplace_sim.sim import simulate

    with bad_input("scenario", scenario):
        config = SimConfig.model_validate_json(scenario.read_text())
    with bad_input("simulate"):
        summary = simulate(config).summary
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    console.print(summary_table(summary))
    console.print(
        f"SLO attainment {100 * summary['slo_attainment']:.1f}%, "
        f"{summary['tokens_per_s']:.0f} tokens/s, straggler share "
        f"{100 * summary['straggler_share']:.1f}%, {summary['changes']} placement changes "
        f"({summary['stall_s']:.1f} s stalled)"
        + (
            f", {summary['preemptions']} preemptions ({summary['recomputed_tokens']} tokens "
            "recomputed)"
            if config.kv_tokens_per_gpu is not None
            else ""
        ),
        highlight=False,
    )
