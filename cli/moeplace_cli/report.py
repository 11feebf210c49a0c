"""What the commands print: a summary dict (``--json``) and rich tables for people."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from placement.evaluate import Evaluation
from placement.model import Cluster
from placement.problem import Problem
from placement.solvers import Solution

Summary = dict[str, Any]


def time_unit(cluster: Cluster) -> str:
    """µs with latency curves, token-times (tokens / speed) with speed factors."""
    return "us" if cluster.has_curves else "token-time"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluation_summary(ev: Evaluation, moved: bool = False) -> Summary:
    """Scores of one evaluation; ``moved`` only when it was against a previous placement."""
    summary: Summary = {
        "dispatch": ev.dispatch,
        "straggler": ev.straggler,
        "fluidBound": ev.fluid_bound,
        "replicaBound": ev.replica_bound,
        "ratio": ev.ratio,
        "balancedness": ev.balancedness,
        "trafficShare": _finite(ev.traffic_share),
    }
    if moved:
        summary["moved"] = ev.moved
    return summary


def problem_summary(problem: Problem) -> Summary:
    return {
        "layers": problem.model.moe_layers,
        "experts": problem.model.experts,
        "gpus": problem.cluster.size,
        "nodes": len(problem.cluster.nodes),
        "slotsPerGpu": problem.slots_per_gpu,
        "redundant": problem.redundant,
        "timeUnit": time_unit(problem.cluster),
        "hedgeSamples": 0 if problem.samples is None else int(problem.samples.shape[0]),
    }


def solution_summary(strategy: str, solution: Solution) -> Summary:
    return {
        "strategy": strategy,
        "status": solution.status,
        "objective": solution.objective,
        "bound": solution.bound,
        "gap": solution.gap,
        "solveSeconds": solution.wall_s,
        "contentHash": solution.placement.content_hash(),
    }


def print_json(console: Console, summary: Summary) -> None:
    console.print_json(json.dumps(summary, allow_nan=False))


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("gap", "trafficShare"):
        return _percent(value)
    if key in ("ratio", "balancedness"):
        return f"{value:.4f}"
    if key == "solveSeconds":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


_LABELS = {
    "straggler": "straggler time (sum over layers)",
    "fluidBound": "fluid bound",
    "replicaBound": "replica bound",
    "ratio": "straggler / fluid bound",
    "trafficShare": "traffic share (tokens changing GPU)",
    "moved": "copies moved",
    "solveSeconds": "solve time (s)",
    "slotsPerGpu": "slots per GPU",
    "contentHash": "content hash",
    "timeUnit": "time unit",
}


def key_value_table(title: str, summary: Summary) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, list | dict):
            continue
        table.add_row(_LABELS.get(key, key), _fmt(key, value))
    return table


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _big(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.4g}"


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _plain(value: Any) -> str:
    return "-" if value is None else str(value)


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


COMPARE_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("strategy", "strategy", _plain),
    ("straggler", "straggler", _big),
    ("ratio", "/fluid", _ratio),
    ("vsEplb", "/eplb", _ratio),
    ("balancedness", "balance", _ratio),
    ("trafficShare", "traffic", _percent),
    ("gap", "gap", _percent),
    ("solveSeconds", "time s", _seconds),
)


def compare_table(rows: Sequence[Summary]) -> Table:
    """One row per strategy; columns without any value (traffic without transitions) drop."""
    columns = [c for c in COMPARE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for key, label, _ in columns:
        table.add_column(label, justify="left" if key in ("strategy", "status") else "right")
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for key, _, fmt in columns))
    return table


def per_layer_table(ev: Evaluation, layer_ids: Sequence[int]) -> Table:
    """One row per MoE layer: slowest GPU's time, fluid bound, their ratio, which GPU."""
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for label in ("layer", "time", "fluid", "/fluid", "slowest GPU", "its tokens"):
        table.add_column(label, justify="right")
    times, fluid = ev.layer_time.mean(0), ev.layer_fluid.mean(0)
    gpu_time, gpu_load = ev.gpu_time.mean(0), ev.gpu_load.mean(0)
    for i, layer in enumerate(layer_ids):
        slowest = int(gpu_time[i].argmax())
        ratio = times[i] / fluid[i] if fluid[i] > 0 else 1.0
        table.add_row(
            str(layer),
            _big(float(times[i])),
            _big(float(fluid[i])),
            _ratio(float(ratio)),
            str(slowest),
            _big(float(gpu_load[i, slowest])),
        )
    return table
