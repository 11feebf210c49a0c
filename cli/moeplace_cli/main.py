"""``moeplace``: solve, evaluate and compare expert placements from files.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback), 1 anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from moeplace_cli import inputs, report
from moeplace_cli import strategies as strategies_mod
from moeplace_cli.errors import CliError, bad_input, err_console, reports_errors
from moeplace_cli.gpus_cmd import gpus_app
from moeplace_cli.inputs import LoadInput, ModelChoice, ModelInfo, WindowSpec
from moeplace_cli.options import (
    ENGINE_SETUPS,
    DenseOpt,
    DispatchOpt,
    DispatchRule,
    EngineOpt,
    GpusOpt,
    Hedge,
    HedgeOpt,
    JsonOpt,
    LoadOpt,
    ModelConfigOpt,
    ModelOpt,
    NameArg,
    NamespaceOpt,
    OutputFormat,
    PromptsOpt,
    RedundantOpt,
    SamplesOpt,
    SeedOpt,
    ThreadsOpt,
    TimeLimitOpt,
    TopKOpt,
    TransOpt,
    WindowOpt,
)
from moeplace_cli.simulate_cmd import simulate_cmd
from placement.engine_flags import engine_flags
from placement.evaluate import Evaluation, evaluate
from placement.load import LoadModelConfig, estimate, sampling_for
from placement.model import FloatArray, Placement
from placement.problem import Problem, Weights
from placement.solvers.base import Solution
from placement.solvers.eplb import replica_ranks

app = typer.Typer(
    name="moeplace",
    help="Place MoE experts on GPUs of uneven speed: solve, evaluate, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(gpus_app, name="gpus")
app.command("simulate")(simulate_cmd)
out_console = Console()


@dataclass(frozen=True)
class SolverSettings:
    time_limit: float = 10.0
    seed: int = 0
    threads: int = 0
    hedge: Hedge = Hedge.expected


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
    problem: Problem, strategy: str, settings: SolverSettings, show_progress: bool
) -> Solution:
    from placement.solvers import SolveOptions

    label = f"{strategy} ({settings.time_limit:g} s limit)"
    with progress_bar(label, show_progress) as progress:
        options = SolveOptions(
            time_limit_s=settings.time_limit,
            seed=settings.seed,
            threads=settings.threads,
            hedge=settings.hedge.value,
            progress=progress,
        )
        return strategies_mod.solve_named(problem, strategy, options)


def score(
    placement: Placement,
    problem: Problem,
    load: FloatArray,
    dispatch: DispatchRule,
    previous: Placement | None = None,
) -> Evaluation:
    """Evaluate ``placement`` on ``load`` ([L, E] or [K, L, E] windows)."""
    return evaluate(
        placement,
        problem.cluster,
        load,
        dispatch=dispatch.value,
        transitions=problem.transitions,
        previous=previous,
    )


def check_writable(path: Path, option: str) -> None:
    """Fail before a long solve, not after it, when the output cannot be written."""
    folder = path.parent if str(path.parent) else Path()
    if not folder.is_dir():
        raise CliError(f"{option}: folder {folder} does not exist")
    if path.is_dir():
        raise CliError(f"{option}: {path} is a folder")


def window_spec(samples: Path | None, window: int, prompts: str | None) -> WindowSpec | None:
    if samples is None:
        if prompts is not None:
            raise CliError("--prompts needs --samples")
        return None
    return WindowSpec(samples, window, prompts)


@dataclass(frozen=True)
class ProblemExtras:
    """Optional parts of a problem: traffic, the current placement."""

    transitions: Path | None = None
    traffic_weight: float = 0.0
    current: Path | None = None
    migration_weight: float = 0.0


def make_problem(
    loaded: LoadInput,
    gpus: Path,
    redundant: int,
    info: ModelInfo,
    extras: ProblemExtras | None = None,
    dispatch: str = "even",
) -> Problem:
    """The problem to solve; with ``--samples`` the solver hedges over what the load model
    gives for ``dispatch`` (``placement.load.sampling_for``), as the operator does."""
    more = extras or ProblemExtras()
    cluster = inputs.read_cluster(gpus)
    trans = inputs.read_transitions_file(more.transitions, loaded.load)
    current = None
    if more.current is not None:
        current = inputs.read_placement(more.current, info.shape, cluster.size, info.dense_known)
    return inputs.build_problem(
        info.shape,
        cluster,
        loaded.load,
        redundant,
        samples=hedge_samples(loaded, dispatch),
        transitions=trans,
        current=current,
        weights=Weights(traffic=more.traffic_weight, migration=more.migration_weight),
    )


def hedge_samples(loaded: LoadInput, dispatch: str) -> FloatArray | None:
    if loaded.samples is None:
        return None
    config = LoadModelConfig(sampling=sampling_for(dispatch))
    return estimate(loaded.samples, config).samples


def solving_dispatch(strategy: str) -> str:
    """The dispatch rule a strategy places copies for."""
    return "speed-aware" if strategy == strategies_mod.CPSAT_BEST else "even"


ENGINE_FORMATS = (OutputFormat.sglang, OutputFormat.vllm)


def check_engine_format(fmt: OutputFormat, info: ModelInfo, loaded: LoadInput) -> None:
    """An engine file numbers model layers: refuse to guess how many dense layers come first."""
    if fmt in ENGINE_FORMATS and not info.dense_known:
        raise CliError(
            f"--format {fmt.value}: how many dense layers precede the first MoE layer is "
            f"unknown ({loaded.source} has no moe_layer_index): give --model PRESET, "
            "--model-config config.json or --dense-layers N (0 for a model without any)"
        )
    if not info.dense_known:
        err_console.print(
            "moeplace: warning: dense layers before the first MoE layer unknown, recorded as 0; "
            "give --model, --model-config or --dense-layers before exporting to an engine",
            highlight=False,
        )


def engine_summary(placement: Placement, info: ModelInfo) -> dict[str, Any]:
    """The engine flags that must match the file (printed with it)."""
    flags = engine_flags(placement, info.hidden_layers)
    return {
        "hiddenLayers": flags["hiddenLayers"],
        "sglangFlags": " ".join(flags["sglangArgs"]),
        "vllmFlags": " ".join(flags["vllmArgs"][:-1]) + f" '{flags['vllmArgs'][-1]}'",
        "engineFlags": flags,
    }


def emit(title: str, summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        report.print_json(out_console, summary)
    else:
        out_console.print(report.key_value_table(title, summary))


@app.command()
@reports_errors
def solve(
    gpus: GpusOpt,
    out: Annotated[Path, typer.Option("--out", help="Where to write the placement.")],
    load: LoadOpt = None,
    samples: SamplesOpt = None,
    window: WindowOpt = 100,
    prompts: PromptsOpt = None,
    redundant: RedundantOpt = 0,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            help="cpsat, cpsat-best (for speed-aware dispatch), greedy, eplb, eplb-global, "
            "round-robin or linear.",
        ),
    ] = "cpsat",
    transitions: TransOpt = None,
    traffic_weight: Annotated[
        float,
        typer.Option(
            "--traffic-weight", min=0.0, help="Cost per token changing GPU (cpsat, greedy)."
        ),
    ] = 0.0,
    current: Annotated[
        Path | None,
        typer.Option("--current", help="Placement in service (any format): report moved copies."),
    ] = None,
    migration_weight: Annotated[
        float,
        typer.Option(
            "--migration-weight",
            min=0.0,
            help="With --current: cost of one moved copy, in the time unit (cpsat, greedy).",
        ),
    ] = 0.0,
    hedge: HedgeOpt = Hedge.expected,
    time_limit: TimeLimitOpt = 10.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 0,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="Placement file format.")
    ] = OutputFormat.canonical,
    model_preset: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    dense_layers: DenseOpt = None,
    top_k: TopKOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compute a placement for one load and write it in an engine's format."""
    strategies_mod.check(strategy)
    check_writable(out, "--out")
    loaded = inputs.resolve_load(load, window_spec(samples, window, prompts))
    if current is None and migration_weight > 0:
        raise CliError("--migration-weight needs --current")
    info = inputs.resolve_model(
        loaded, ModelChoice(model_preset, model_config, dense_layers, top_k)
    )
    check_engine_format(fmt, info, loaded)
    extras = ProblemExtras(transitions, traffic_weight, current, migration_weight)
    problem = make_problem(loaded, gpus, redundant, info, extras, solving_dispatch(strategy))
    settings = SolverSettings(time_limit, seed, threads, hedge)
    solution = run_solver(problem, strategy, settings, not as_json)
    ranks = replica_ranks(problem, strategy)  # DeepSeek's log2phy order for EPLB's own output
    inputs.write_placement(solution.placement, fmt.value, out, info.hidden_layers, ranks)
    ev = score(solution.placement, problem, loaded.scored, DispatchRule.even, problem.current)
    summary = {
        **report.solution_summary(strategy, solution),
        **report.evaluation_summary(ev, moved=problem.current is not None),
        **report.problem_summary(problem),
        "load": loaded.source,
        "out": str(out),
        "format": fmt.value,
    }
    if fmt in ENGINE_FORMATS:
        summary |= engine_summary(solution.placement, info)
    emit(f"moeplace solve: {strategy} -> {out}", summary, as_json)


@app.command("evaluate")
@reports_errors
def evaluate_cmd(
    placement: Annotated[
        Path, typer.Option("--placement", help="Placement file: canonical, sglang, vllm, eplb.")
    ],
    gpus: GpusOpt,
    load: LoadOpt = None,
    samples: SamplesOpt = None,
    window: WindowOpt = 100,
    prompts: PromptsOpt = None,
    dispatch: DispatchOpt = DispatchRule.even,
    transitions: TransOpt = None,
    previous: Annotated[
        Path | None, typer.Option("--previous", help="Earlier placement: count moved copies.")
    ] = None,
    model_preset: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    dense_layers: DenseOpt = None,
    per_layer: Annotated[
        bool, typer.Option("--per-layer", help="Also print one row per MoE layer.")
    ] = False,
    engine: EngineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a placement file on a load: straggler time, bounds, balancedness, traffic."""
    loaded = inputs.resolve_load(load, window_spec(samples, window, prompts))
    cluster = inputs.read_cluster(gpus)
    info = inputs.resolve_model(loaded, ModelChoice(model_preset, model_config, dense_layers))
    model = info.shape
    setup = ENGINE_SETUPS[engine] if engine is not None else None
    chosen = inputs.read_placement(placement, model, cluster.size, info.dense_known, setup)
    before = None
    if previous is not None:
        before = inputs.read_placement(previous, model, cluster.size, info.dense_known, setup)
    if before is not None and before.num_slots != chosen.num_slots:
        raise CliError(
            f"previous: {previous} has {before.num_slots} slots per layer, "
            f"{placement} has {chosen.num_slots}"
        )
    extras = ProblemExtras(transitions=transitions)
    problem = make_problem(loaded, gpus, chosen.num_slots - model.experts, info, extras)
    ev = score(chosen, problem, loaded.scored, dispatch, before)
    summary = {
        "placement": str(placement),
        "strategy": chosen.strategy,
        "contentHash": chosen.content_hash(),
        **report.evaluation_summary(ev, moved=before is not None),
        **report.problem_summary(problem),
        "load": loaded.source,
        "batches": int(ev.layer_time.shape[0]),
        "layerIds": loaded.shown_layer_ids,
        "layerTime": ev.layer_time.mean(0).tolist(),
        "layerFluid": ev.layer_fluid.mean(0).tolist(),
        "layerSlowestGpu": ev.gpu_time.mean(0).argmax(-1).tolist(),
    }
    emit(f"moeplace evaluate: {placement} ({dispatch.value} dispatch)", summary, as_json)
    if per_layer and not as_json:
        out_console.print(report.per_layer_table(ev, loaded.shown_layer_ids))


@app.command()
@reports_errors
def compare(
    gpus: GpusOpt,
    load: LoadOpt = None,
    samples: SamplesOpt = None,
    window: WindowOpt = 100,
    prompts: PromptsOpt = None,
    score_prompts: Annotated[
        str | None,
        typer.Option(
            "--score-prompts",
            help="With --samples: score on windows of these prompts (START:STOP) instead of "
            "the ones solved on, so no placement sees the load it is scored on.",
        ),
    ] = None,
    redundant: RedundantOpt = 0,
    strategies: Annotated[
        str | None,
        typer.Option(
            "--strategies",
            help="Comma-separated; default: every registered strategy (and cpsat-best with "
            "--dispatch speed-aware).",
        ),
    ] = None,
    transitions: TransOpt = None,
    hedge: HedgeOpt = Hedge.expected,
    time_limit: TimeLimitOpt = 10.0,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 0,
    dispatch: DispatchOpt = DispatchRule.even,
    png: Annotated[
        Path | None, typer.Option("--png", help="Write heatmaps and straggler bars here.")
    ] = None,
    model_preset: ModelOpt = None,
    model_config: ModelConfigOpt = None,
    dense_layers: DenseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every strategy on one scenario and compare them (table, optional PNG)."""
    names = strategy_list(strategies, dispatch)
    if png is not None:
        check_writable(png, "--png")
    spec = window_spec(samples, window, prompts)
    loaded = inputs.resolve_load(load, spec)
    scored = scoring_load(loaded, spec, score_prompts)
    info = inputs.resolve_model(loaded, ModelChoice(model_preset, model_config, dense_layers))
    extras = ProblemExtras(transitions=transitions)
    problems = {
        rule: make_problem(loaded, gpus, redundant, info, extras, rule)
        for rule in dict.fromkeys(solving_dispatch(name) for name in names)
    }
    problem = next(iter(problems.values()))  # the same but for the samples hedged over
    settings = SolverSettings(time_limit, seed, threads, hedge)
    rows: list[dict[str, Any]] = []
    evaluations: list[Evaluation] = []
    for name in names:
        solution = run_solver(problems[solving_dispatch(name)], name, settings, not as_json)
        ev = score(solution.placement, problem, scored.scored, dispatch)
        evaluations.append(ev)
        rows.append({**report.solution_summary(name, solution), **report.evaluation_summary(ev)})
    relative_to_eplb(rows)
    title = scenario_title(problem, dispatch, loaded, scored)
    if png is not None:
        from moeplace_cli.plot import compare_png

        with bad_input("png"):
            compare_png(names, evaluations, png, title)
    scenario = {**report.problem_summary(problem), "load": loaded.source, "scored": scored.source}
    summary = {"scenario": scenario, "strategies": rows, "png": None if png is None else str(png)}
    if as_json:
        report.print_json(out_console, summary)
        return
    out_console.print(title, highlight=False)
    out_console.print(report.compare_table(rows))
    if png is not None:
        out_console.print(f"wrote {png}")


def scoring_load(loaded: LoadInput, spec: WindowSpec | None, prompts: str | None) -> LoadInput:
    """What ``compare`` scores on: other prompts' windows, or the load solved on."""
    if prompts is None:
        return loaded
    if spec is None:
        raise CliError("--score-prompts needs --samples")
    scored = inputs.read_windows(WindowSpec(spec.path, spec.size, prompts))
    return scored


def strategy_list(text: str | None, dispatch: DispatchRule) -> list[str]:
    if text is None:
        return strategies_mod.defaults(dispatch == DispatchRule.speed_aware)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CliError("--strategies is empty")
    for name in names:
        strategies_mod.check(name)
    return names


def relative_to_eplb(rows: list[dict[str, Any]]) -> None:
    ref = next((r["straggler"] for r in rows if r["strategy"] == "eplb"), None)
    for row in rows:
        row["vsEplb"] = row["straggler"] / ref if ref else None


def scenario_title(
    problem: Problem, dispatch: DispatchRule, loaded: LoadInput, scored: LoadInput
) -> str:
    s = report.problem_summary(problem)
    on = "" if scored is loaded else f", scored on {scored.source}"
    return (
        f"{s['layers']} layers x {s['experts']} experts on {s['gpus']} GPUs "
        f"({s['nodes']} node{'s' if s['nodes'] != 1 else ''}), +{s['redundant']} copies, "
        f"{dispatch.value} dispatch, "
        f"time in {s['timeUnit']}. Solved on {loaded.source}{on}."
    )


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


@app.command()
@reports_errors
def profile(
    shape: Annotated[
        str, typer.Option(help="Expert shape: deepseek-v2-lite, mixtral-8x7b, deepseek-v3 or HxI.")
    ] = "deepseek-v2-lite",
    out: Annotated[Path | None, typer.Option("--out", help="GPU-profile JSON to write.")] = None,
    budget: Annotated[float, typer.Option(help="Seconds of timed passes per GPU.")] = 60.0,
    publish: Annotated[
        bool, typer.Option(help="Patch this node's speed labels and curve annotation.")
    ] = False,
    node: Annotated[
        str | None, typer.Option(help="Node to publish to; default $NODE_NAME.")
    ] = None,
) -> None:
    """Measure every local GPU's expert-FFN latency curve (needs torch and CUDA)."""
    from moeplace_profiler.runner import ProfilerUnavailableError, run_profile

    try:
        result = run_profile(
            shape=shape, out=out, node=node, budget_s=budget, publish_to_node=publish
        )
    except (ProfilerUnavailableError, ValueError) as err:
        raise CliError(str(err)) from None
    for gpu in result.gpus:
        typer.echo(f"GPU {gpu.gpu} on {gpu.node}: speed {gpu.speed:.4f}")
