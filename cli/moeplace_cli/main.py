"""``moeplace``: solve, evaluate and compare expert placements from files.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from moeplace_cli import inputs, report
from moeplace_cli.errors import CliError, bad_input, err_console, reports_errors
from moeplace_cli.gpus_cmd import gpus_app
from placement.evaluate import Evaluation, evaluate
from placement.model import FloatArray, Placement
from placement.problem import Problem
from placement.solvers.base import Solution

app = typer.Typer(
    name="moeplace",
    help="Place MoE experts on GPUs of uneven speed: solve, evaluate, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
out_console = Console()


class OutputFormat(StrEnum):
    canonical = "canonical"
    sglang = "sglang"
    vllm = "vllm"
    eplb = "eplb"


class DispatchRule(StrEnum):
    even = "even"
    best = "best"


LoadOpt = Annotated[
    Path, typer.Option("--load", help="Token counts: CSV moe_layer_index,expert_id,count.")
]
GpusOpt = Annotated[
    Path, typer.Option("--gpus", help="GPUS.csv (gpu,node,speed) or GPU-profile JSON.")
]
RedundantOpt = Annotated[
    int, typer.Option("--redundant", min=0, help="Redundant copies (E + R slots over G GPUs).")
]
TimeLimitOpt = Annotated[
    float, typer.Option("--time-limit", min=0.01, help="Solver time limit in seconds.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Solver random seed.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="Solver threads; 0: all.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
DenseOpt = Annotated[
    int | None,
    typer.Option(
        "--dense-layers",
        min=0,
        help="Dense layers before the first MoE layer (SGLang rows); default: the first "
        "moe_layer_index in the load.",
    ),
]
TransOpt = Annotated[
    Path | None, typer.Option("--transitions", help="layer_transition_counts.npy [L-1,E,E].")
]
DispatchOpt = Annotated[
    DispatchRule,
    typer.Option("--dispatch", help="even: split over copies evenly; best: per-batch LP."),
]
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, help="Experts per token (metadata).")]


def check_strategy(strategy: str) -> None:
    from placement.solvers import strategies

    if strategy not in strategies():
        raise CliError(f"unknown strategy {strategy!r}; choose from {', '.join(strategies())}")


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[float], None] | None]:
    """A transient rich progress bar on stderr fed by ``SolveOptions.progress``."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(label, total=1.0)
        yield lambda fraction: progress.update(task, completed=fraction)


def run_solver(
    problem: Problem,
    strategy: str,
    time_limit: float,
    seed: int,
    threads: int,
    show_progress: bool,
) -> Solution:
    from placement.solvers import SolveOptions, solve

    with progress_bar(f"{strategy} ({time_limit:g} s limit)", show_progress) as progress:
        options = SolveOptions(
            time_limit_s=time_limit, seed=seed, threads=threads, progress=progress
        )
        return solve(problem, strategy, options)


def evaluate_on(
    placement: Placement,
    problem: Problem,
    dispatch: DispatchRule,
    previous: Placement | None = None,
) -> Evaluation:
    return evaluate(
        placement,
        problem.cluster,
        problem.load,
        dispatch=dispatch.value,
        transitions=problem.transitions,
        previous=previous,
    )


@app.command()
@reports_errors
def solve(
    load: LoadOpt,
    gpus: GpusOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the placement.")],
    redundant: RedundantOpt = 0,
    strategy: Annotated[
        str, typer.Option("--strategy", help="cpsat, greedy, eplb, round-robin or linear.")
    ] = "cpsat",
    transitions: TransOpt = None,
    traffic_weight: Annotated[
        float,
        typer.Option("--traffic-weight", min=0.0, help="Cost per token changing GPU (cpsat)."),
    ] = 0.0,
    time_limit: TimeLimitOpt = 10.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 0,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="Placement file format.")
    ] = OutputFormat.canonical,
    dense_layers: DenseOpt = None,
    top_k: TopKOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Compute a placement for one load and write it in an engine's format."""
    check_strategy(strategy)
    problem = _problem(load, gpus, redundant, transitions, traffic_weight, dense_layers, top_k)
    solution = run_solver(problem, strategy, time_limit, seed, threads, not as_json)
    inputs.write_placement(solution.placement, fmt.value, out)
    ev = evaluate_on(solution.placement, problem, DispatchRule.even)
    summary = {
        **report.solution_summary(strategy, solution),
        **report.evaluation_summary(ev),
        **report.problem_summary(problem),
        "out": str(out),
        "format": fmt.value,
    }
    _emit(f"moeplace solve: {strategy} -> {out}", summary, as_json)


def _problem(
    load_path: Path,
    gpus_path: Path,
    redundant: int,
    transitions_path: Path | None,
    traffic_weight: float,
    dense_layers: int | None,
    top_k: int,
) -> Problem:
    load = inputs.read_load(load_path)
    cluster = inputs.read_cluster(gpus_path)
    trans: FloatArray | None = inputs.read_transitions_file(transitions_path, load.load)
    model = load.model(dense_layers, top_k)
    return inputs.build_problem(model, cluster, load.load, redundant, trans, traffic_weight)


def _emit(title: str, summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        report.print_json(out_console, summary)
    else:
        out_console.print(report.key_value_table(title, summary))


@app.command("evaluate")
@reports_errors
def evaluate_cmd(
    placement: Annotated[
        Path, typer.Option("--placement", help="Placement file: canonical, sglang, vllm, eplb.")
    ],
    load: LoadOpt,
    gpus: GpusOpt,
    dispatch: DispatchOpt = DispatchRule.even,
    transitions: TransOpt = None,
    previous: Annotated[
        Path | None, typer.Option("--previous", help="Earlier placement: count moved copies.")
    ] = None,
    dense_layers: DenseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a placement file on a load: straggler time, bounds, balancedness, traffic."""
    loaded = inputs.read_load(load)
    cluster = inputs.read_cluster(gpus)
    model = loaded.model(dense_layers, 1)
    chosen = inputs.read_placement(placement, model, cluster.size)
    before = inputs.read_placement(previous, model, cluster.size) if previous else None
    trans = inputs.read_transitions_file(transitions, loaded.load)
    problem = inputs.build_problem(
        chosen.model, cluster, loaded.load, chosen.num_slots - model.experts, trans
    )
    ev = evaluate_on(chosen, problem, dispatch, before)
    summary = {
        "placement": str(placement),
        "strategy": chosen.strategy,
        "contentHash": chosen.content_hash(),
        **report.evaluation_summary(ev, moved=before is not None),
        **report.problem_summary(problem),
        "layerTime": ev.layer_time.mean(0).tolist(),
        "layerFluid": ev.layer_fluid.mean(0).tolist(),
    }
    _emit(f"moeplace evaluate: {placement} ({dispatch.value} dispatch)", summary, as_json)


@app.command()
@reports_errors
def compare(
    load: LoadOpt,
    gpus: GpusOpt,
    redundant: RedundantOpt = 0,
    strategies: Annotated[
        str | None,
        typer.Option("--strategies", help="Comma-separated subset; default: every strategy."),
    ] = None,
    transitions: TransOpt = None,
    time_limit: TimeLimitOpt = 10.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 0,
    dispatch: DispatchOpt = DispatchRule.even,
    png: Annotated[
        Path | None, typer.Option("--png", help="Write heatmaps and straggler bars here.")
    ] = None,
    dense_layers: DenseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every strategy on one scenario and compare them (table, optional PNG)."""
    names = _strategy_list(strategies)
    problem = _problem(load, gpus, redundant, transitions, 0.0, dense_layers, 1)
    rows: list[dict[str, Any]] = []
    evaluations: list[Evaluation] = []
    for name in names:
        solution = run_solver(problem, name, time_limit, seed, threads, not as_json)
        ev = evaluate_on(solution.placement, problem, dispatch)
        evaluations.append(ev)
        rows.append({**report.solution_summary(name, solution), **report.evaluation_summary(ev)})
    _relative_to_eplb(rows)
    title = _scenario_title(problem, dispatch)
    if png is not None:
        from moeplace_cli.plot import compare_png

        compare_png(names, evaluations, png, title)
    summary = {"scenario": report.problem_summary(problem), "strategies": rows, "png": _str(png)}
    if as_json:
        report.print_json(out_console, summary)
    else:
        out_console.print(report.compare_table(title, rows))
        if png is not None:
            out_console.print(f"wrote {png}")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _strategy_list(text: str | None) -> list[str]:
    from placement.solvers import strategies

    names = strategies() if text is None else [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CliError("--strategies is empty")
    for name in names:
        check_strategy(name)
    return names


def _relative_to_eplb(rows: list[dict[str, Any]]) -> None:
    ref = next((r["straggler"] for r in rows if r["strategy"] == "eplb"), None)
    for row in rows:
        row["vsEplb"] = row["straggler"] / ref if ref else None


def _scenario_title(problem: Problem, dispatch: DispatchRule) -> str:
    s = report.problem_summary(problem)
    return (
        f"{s['layers']} layers x {s['experts']} experts on {s['gpus']} GPUs "
        f"({s['nodes']} nodes), +{s['redundant']} copies, {dispatch.value} dispatch, "
        f"time in {s['timeUnit']}"
    )


NameArg = Annotated[str, typer.Argument(help="Name of the MoEDeployment object.")]
NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace; default: the context's.")
]


@app.command()
@reports_errors
def export(
    name: NameArg,
    namespace: NamespaceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="File; default: stdout.")] = None,
) -> None:
    """Print the MoEDeployment's current proposal (else the placement in service) as a
    ConfigMap manifest for Pinned mode (needs the operator package and a cluster)."""
    from moeplace_cli.cluster_cmd import run_operator_command

    text = run_operator_command("export", name, namespace)
    if out is None:
        typer.echo(text)
        return
    with bad_input("out"):
        out.write_text(text if text.endswith("\n") else text + "\n")
    err_console.print(f"wrote {out}")


@app.command()
@reports_errors
def status(name: NameArg, namespace: NamespaceOpt = None) -> None:
    """Show a MoEDeployment's mode, placement figures and conditions (needs the operator
    package and a cluster)."""
    from moeplace_cli.cluster_cmd import run_operator_command

    typer.echo(run_operator_command("status", name, namespace))


app.add_typer(gpus_app, name="gpus")
