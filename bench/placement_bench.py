"""Placement benchmark (issue 3): quality and speed of every strategy on real scenarios.

Run from the repository root::

    .venv/bin/python bench/placement_bench.py           # full run (about 10 minutes on 2 cores)
    .venv/bin/python bench/placement_bench.py --quick   # a subset with shorter limits

Prints one table per scenario and the issue's targets with PASS/MISS, and writes every number
to ``bench/results/placement_bench[-quick].json``. See ``bench/README.md`` for what is measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from placement.evaluate import Evaluation, evaluate  # noqa: E402
from placement.gpus import h200_curves, pal_cluster  # noqa: E402
from placement.load import LoadModelConfig, estimate, sampling_for  # noqa: E402
from placement.model import GPU, Cluster, FloatArray, MoEModelShape, Placement  # noqa: E402
from placement.problem import Problem  # noqa: E402
from placement.solvers import SolveOptions, solve  # noqa: E402

STRATEGIES = ["round-robin", "linear", "eplb", "eplb-global", "greedy", "cpsat"]
# cpsat with the best-split objective (SolveOptions(dispatch="speed-aware")): placements for a
# speed-aware dispatcher; held-out real scenarios only
BEST = "cpsat-best"
WINDOW = 100  # prompts per batch window
console = Console(width=160)


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


@dataclass
class RealData:
    """DeepSeek-V2-Lite-Chat routing: calibration = prompts 1..500, evaluation = 501..1000."""

    cal_windows: FloatArray  # [5, L, E] prompts 1-100, 101-200, ..., 401-500
    eval_windows: FloatArray  # [5, L, E] prompts 501-600, ..., 901-1000
    eval_total: FloatArray  # [L, E] prompts 501..1000
    eval_transitions: FloatArray  # [L-1, E, E] from the evaluation prompts' tokens
    cal_transitions: FloatArray  # [L-1, E, E] from the calibration prompts' tokens
    prompts: int
    tokens: int


def _windows(counts: FloatArray, pid: np.ndarray, lo: int, hi: int) -> FloatArray:
    edges = range(lo, hi, WINDOW)
    return np.stack([counts[(pid > a) & (pid <= a + WINDOW)].sum(0) for a in edges])


def _transitions(ids: np.ndarray, E: int) -> FloatArray:
    """[N, L, k] top-k expert ids -> [L-1, E, E] transition counts (every pair of the two
    top-k sets counts once per token)."""
    L = ids.shape[1]
    out = np.zeros((L - 1, E, E))
    for layer in range(L - 1):
        a = ids[:, layer, :].astype(np.int64)
        b = ids[:, layer + 1, :].astype(np.int64)
        pairs = (a[:, :, None] * E + b[:, None, :]).ravel()
        out[layer] = np.bincount(pairs, minlength=E * E).reshape(E, E)
    return out


def load_real(data: Path) -> RealData:
    folder = data / "routing" / "deepseek-v2-lite-chat"
    with np.load(folder / "per_prompt_expert_counts.npz") as f:
        counts = np.asarray(f["counts"], dtype=np.float64)
        pid = np.asarray(f["prompt_id"])
    with np.load(folder / "routing_topk6_prompts_0001_1000.npz") as f:
        ids = np.asarray(f["expert_ids"])
        tok_pid = np.asarray(f["prompt_id"])
    E = counts.shape[2]
    return RealData(
        cal_windows=_windows(counts, pid, 0, 500),
        eval_windows=_windows(counts, pid, 500, 1000),
        eval_total=counts[pid > 500].sum(0),
        eval_transitions=_transitions(ids[tok_pid > 500], E),
        cal_transitions=_transitions(ids[tok_pid <= 500], E),
        prompts=int(pid.size),
        tokens=int(tok_pid.size),
    )


def zipf_load(L: int, E: int, tokens: int, top_k: int, s: float, seed: int) -> FloatArray:
    """[L, E] synthetic load: per layer a random permutation of Zipf(s) expert popularity,
    ``tokens * top_k`` routed tokens drawn multinomially."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** s
    p /= p.sum()
    return np.stack(
        [rng.multinomial(tokens * top_k, p[rng.permutation(E)]).astype(float) for _ in range(L)]
    )


def h200_cluster(data: Path, shape: str, num_gpus: int, per_node: int) -> Cluster:
    """GPU g gets measured H200 curve g mod 2 (only two GPUs were measured)."""
    curves = h200_curves(data / "gpu-variability/h200-pair/expert_ffn_latency_graphs.json", shape)
    return Cluster(
        gpus=[
            GPU(node=f"node-{g // per_node}", curve=curves[g % len(curves)])
            for g in range(num_gpus)
        ]
    )


def pal(data: Path, num_gpus: int) -> Cluster:
    return pal_cluster(
        data / "gpu-variability/pal-v100-rtx5000-a100/32gpu-variability.csv", "A", num_gpus
    )


# ------------------------------------------------------------------------------------------
# Solving in a child process (peak memory per solve)
# ------------------------------------------------------------------------------------------


def _child(conn: Any, problem: Problem, strategy: str, options: SolveOptions) -> None:
    start = time.perf_counter()
    if strategy == BEST:
        sol = solve(problem, "cpsat", replace(options, dispatch="speed-aware"))
    else:
        sol = solve(problem, strategy, options)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send(
        {
            "table": sol.placement.table,
            "objective": sol.objective,
            "bound": sol.bound,
            "gap": sol.gap,
            "status": sol.status,
            "details": sol.details,
            "wall_s": wall,
            "peak_rss_mb": peak_kb / 1024.0,
        }
    )
    conn.close()


def _noop(conn: Any) -> None:
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    conn.close()


def run_solve(problem: Problem, strategy: str, options: SolveOptions) -> dict[str, Any]:
    """Solve in a forked child; returns the table, solver report, wall time and peak RSS."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, problem, strategy, options))
    proc.start()
    child.close()
    out: dict[str, Any] = parent.recv()
    proc.join()
    return out


def baseline_rss_mb() -> float:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_noop, args=(child,))
    proc.start()
    child.close()
    value = float(parent.recv())
    proc.join()
    return value


# ------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    cluster: Cluster
    redundant: int
    gpus_desc: str
    real: bool = True
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    oracle: dict[str, dict[str, Any]] = field(default_factory=dict)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def run_real(sc: Scenario, rd: RealData, shape: MoEModelShape, opts: SolveOptions) -> None:
    """Held-out: solve on the calibration load model, score on prompts 501..1000; then the
    oracle: solve and score on the evaluation aggregate (calibrate = evaluate)."""
    # mean of the 5 calibration windows + the samples the load model gives per dispatch rule
    # (sampling_for): 32 bootstrap samples of that mean for even split; cpsat-best places for
    # a per-batch split, so it hedges over the batches (windows) themselves
    est = estimate(rd.cal_windows, LoadModelConfig(sampling=sampling_for("even")))
    heldout = Problem.build(shape, sc.cluster, est.mean, sc.redundant, samples=est.samples)
    per_batch_config = LoadModelConfig(sampling=sampling_for("speed-aware"))
    batches = estimate(rd.cal_windows, per_batch_config).samples
    per_batch = Problem.build(shape, sc.cluster, est.mean, sc.redundant, samples=batches)
    oracle = Problem.build(shape, sc.cluster, rd.eval_total, sc.redundant)
    for strategy in [*STRATEGIES, BEST]:
        res = run_solve(per_batch if strategy == BEST else heldout, strategy, opts)
        p = Placement.from_table(res["table"], shape, sc.cluster.size, strategy)
        agg_even = evaluate(p, sc.cluster, rd.eval_total, transitions=rd.eval_transitions)
        agg_best = evaluate(p, sc.cluster, rd.eval_total, dispatch="speed-aware")
        win_even = evaluate(p, sc.cluster, rd.eval_windows)
        win_best = evaluate(p, sc.cluster, rd.eval_windows, dispatch="speed-aware")
        sc.results[strategy] = {
            "agg_even": agg_even.straggler,
            "agg_best": agg_best.straggler,
            "agg_fluid": agg_even.fluid_bound,
            "win_even": win_even.straggler,
            "win_best": win_best.straggler,
            "win_fluid": win_even.fluid_bound,
            "traffic_share": agg_even.traffic_share,
            "balancedness": agg_even.balancedness,
            **{k: res[k] for k in ("objective", "bound", "gap", "status", "wall_s")},
            "peak_rss_mb": res["peak_rss_mb"],
        }
        if strategy == BEST:
            continue
        o = run_solve(oracle, strategy, opts)
        po = Placement.from_table(o["table"], shape, sc.cluster.size, strategy)
        ev = evaluate(po, sc.cluster, rd.eval_total)
        sc.oracle[strategy] = oracle_row(o, ev)


def oracle_row(solved: dict[str, Any], ev: Evaluation) -> dict[str, Any]:
    """One strategy's calibrate = evaluate figures: its time, the bound and how it solved."""
    keys = ("bound", "gap", "status", "wall_s", "peak_rss_mb")
    return {"straggler": ev.straggler, "fluid": ev.fluid_bound, **{k: solved[k] for k in keys}}


PROOF_LIMIT_S = 60.0  # cpsat's limit per layer when asked whether 1% of fluid is reachable


def run_synthetic(sc: Scenario, shape: MoEModelShape, load: FloatArray, opts: SolveOptions) -> None:
    """Calibrate = evaluate on a synthetic load (no trace of this model is available). Where
    cpsat ends above 1.01 x the fluid bound with copies, :func:`prove_by_layer` asks whether
    the copies allow 1% at all: its proven bound is kept as ``proof_bound``."""
    problem = Problem.build(shape, sc.cluster, load, sc.redundant)
    for strategy in STRATEGIES:
        o = run_solve(problem, strategy, opts)
        p = Placement.from_table(o["table"], shape, sc.cluster.size, strategy)
        ev = evaluate(p, sc.cluster, load)
        sc.oracle[strategy] = oracle_row(o, ev)
    cpsat = sc.oracle["cpsat"]
    if sc.redundant > 0 and cpsat["straggler"] > 1.01 * cpsat["fluid"]:
        cpsat["proof_bound"], cpsat["proof_optimal_layers"] = prove_by_layer(sc, shape, load, opts)


def prove_by_layer(
    sc: Scenario, shape: MoEModelShape, load: FloatArray, opts: SolveOptions
) -> tuple[float, int]:
    """A lower bound on the straggler time (sum over layers of each layer's slowest GPU) of
    any placement of ``load`` [L, E]: layers are independent without a traffic term, so each is
    solved alone with :data:`PROOF_LIMIT_S` seconds and their proven bounds add up. Returns
    (bound, how many layers cpsat proved optimal)."""
    one = shape.model_copy(update={"moe_layers": 1})
    bound, optimal = 0.0, 0
    for layer in range(load.shape[0]):
        sub = Problem.build(one, sc.cluster, load[layer : layer + 1], sc.redundant)
        o = run_solve(sub, "cpsat", replace(opts, time_limit_s=PROOF_LIMIT_S))
        bound += float(o["bound"])
        optimal += o["status"] == "OPTIMAL"
    return bound, optimal


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def eplb_ref(rows: dict[str, dict[str, Any]], key: str) -> float:
    """The better (lower) of the two EPLB policies on ``key``: the stricter reference."""
    return float(min(rows["eplb"][key], rows["eplb-global"][key]))


def print_real(sc: Scenario) -> None:
    r = sc.results
    t = Table(
        title=f"{sc.name}: {sc.gpus_desc}, +{sc.redundant} copies — calibrate prompts 1..500, "
        "score 501..1000 (EPLB ref = better of eplb / eplb-global)",
        title_justify="left",
    )
    for col in (
        "strategy",
        "agg even /fluid",
        "agg even /EPLB",
        "agg best /fluid",
        "win even /fluid",
        "win best /fluid",
        "win best /EPLB-even",
        "traffic share",
        "solve s",
        "peak MB",
        "oracle /fluid",
        "oracle gap",
    ):
        t.add_column(col, justify="right")
    ref_agg, ref_win = eplb_ref(r, "agg_even"), eplb_ref(r, "win_even")
    for s in [*STRATEGIES, BEST]:
        x = r[s]
        o = sc.oracle.get(s, {"straggler": float("nan"), "fluid": 1.0, "gap": float("nan")})
        t.add_row(
            s,
            f"{_ratio(x['agg_even'], x['agg_fluid']):.4f}",
            f"{_ratio(x['agg_even'], ref_agg):.3f}",
            f"{_ratio(x['agg_best'], x['agg_fluid']):.4f}",
            f"{_ratio(x['win_even'], x['win_fluid']):.4f}",
            f"{_ratio(x['win_best'], x['win_fluid']):.4f}",
            f"{_ratio(x['win_best'], ref_win):.3f}",
            f"{x['traffic_share']:.3f}",
            f"{x['wall_s']:.2f}",
            f"{x['peak_rss_mb']:.0f}",
            "—" if s == BEST else f"{_ratio(o['straggler'], o['fluid']):.4f}",
            f"{o['gap']:.4f}" if s == "cpsat" else "",
        )
    console.print(t)


def print_synthetic(sc: Scenario, note: str) -> None:
    t = Table(title=f"{sc.name}: {sc.gpus_desc}, +{sc.redundant} copies — {note}")
    for col in ("strategy", "/fluid", "/EPLB", "solver bound /fluid", "gap", "solve s", "peak MB"):
        t.add_column(col, justify="right")
    ref = eplb_ref(sc.oracle, "straggler")
    for s in STRATEGIES:
        o = sc.oracle[s]
        t.add_row(
            s,
            f"{_ratio(o['straggler'], o['fluid']):.4f}",
            f"{_ratio(o['straggler'], ref):.3f}",
            f"{_ratio(o['bound'], o['fluid']):.4f}" if s == "cpsat" else "",
            f"{o['gap']:.4f}" if s == "cpsat" else "",
            f"{o['wall_s']:.2f}",
            f"{o['peak_rss_mb']:.0f}",
        )
    console.print(t)


def hardware() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ortools

    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "ortools": ortools.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def check_targets(real: list[Scenario], synth: dict[str, Scenario]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool, value: str) -> None:
        out.append({"target": name, "pass": bool(ok), "value": value})

    # 1. calibrate = evaluate: within 1% of the fluid bound where copies allow (+G copies)
    for sc in real + list(synth.values()):
        o = sc.oracle
        ratio = _ratio(o["cpsat"]["straggler"], o["cpsat"]["fluid"])
        others = min(o[s]["straggler"] for s in ("eplb", "eplb-global", "greedy"))
        if sc.redundant > 0:
            # "where copies allow it": a proven optimum above 1.01 x fluid says they do not
            proof = _ratio(o["cpsat"].get("proof_bound", 0.0), o["cpsat"]["fluid"])
            add(
                f"calibrate=evaluate {sc.name} +{sc.redundant}: cpsat <= 1.01 x fluid "
                "where the copies allow it",
                ratio <= 1.01 or proof > 1.01,
                f"{ratio:.4f}"
                + (
                    f" (not allowed: cpsat at {PROOF_LIMIT_S:g} s a layer proves the optimum "
                    f">= {proof:.4f} x fluid, {o['cpsat']['proof_optimal_layers']} layers "
                    "proven optimal)"
                    if proof > 1.01
                    else ""
                ),
            )
        add(
            f"calibrate=evaluate {sc.name} +{sc.redundant}: cpsat <= eplb, eplb-global, greedy",
            o["cpsat"]["straggler"] <= others * (1 + 1e-9),
            f"cpsat {o['cpsat']['straggler']:.6g} vs best other {others:.6g}",
        )
    key = [s for s in real if s.name.startswith("PAL") and s.cluster.size == 32 and s.redundant]
    for sc in key:
        r = sc.results
        for ref_name in ("eplb", "eplb-global"):
            v = _ratio(r["cpsat"]["agg_even"], r[ref_name]["agg_even"])
            add(
                f"{sc.name} 32 GPUs +32, held-out aggregate, even: cpsat <= 0.95 x {ref_name}",
                v <= 0.95,
                f"{v:.3f} (eplb {_ratio(r[ref_name]['agg_even'], r[ref_name]['agg_fluid']):.3f}"
                f"x fluid, cpsat {_ratio(r['cpsat']['agg_even'], r['cpsat']['agg_fluid']):.3f}x)",
            )
            v = _ratio(r[BEST]["win_best"], r[ref_name]["win_even"])
            v_even = _ratio(r["cpsat"]["win_best"], r[ref_name]["win_even"])
            add(
                f"{sc.name} 32 GPUs +32, 100-prompt windows: cpsat-best with best split <= 0.82 "
                f"x {ref_name} even",
                v <= 0.82,
                f"{v:.3f} (cpsat {v_even:.3f}, greedy "
                f"{_ratio(r['greedy']['win_best'], r[ref_name]['win_even']):.3f}, "
                f"fluid {_ratio(r['cpsat']['win_fluid'], r[ref_name]['win_even']):.3f})",
            )
    for sc in real:
        if sc.name.startswith("homogeneous"):
            r = sc.results
            v = _ratio(r["cpsat"]["agg_even"], eplb_ref(r, "agg_even"))
            add(
                f"{sc.name} +{sc.redundant} held-out: cpsat no worse than EPLB",
                v <= 1.0,
                f"{v:.3f}",
            )
    for key_name, sc in synth.items():
        if key_name.startswith("mixtral"):
            w = sc.oracle["cpsat"]["wall_s"]
            add(f"Mixtral 32x8 on 8 GPUs +{sc.redundant}: cpsat solve < 1 s", w < 1.0, f"{w:.2f} s")
    for sc in real:
        if sc.cluster.size == 32 and sc.name.startswith("PAL"):
            w = max(
                sc.results["cpsat"]["wall_s"],
                sc.results[BEST]["wall_s"],
                sc.oracle["cpsat"]["wall_s"],
            )
            add(
                f"DeepSeek-V2-Lite {sc.name} +{sc.redundant}: cpsat solve < 10 s",
                w < 10,
                f"{w:.2f} s",
            )
    if "v3" in synth:
        o = synth["v3"].oracle["cpsat"]
        add(
            "DeepSeek-V3 58x256 on 64 GPUs +64: solve < 60 s (gap reported)",
            o["wall_s"] < 60,
            f"{o['wall_s']:.1f} s, gap {o['gap']:.4f}",
        )
    peak = max(
        x["peak_rss_mb"]
        for sc in real + list(synth.values())
        for rows in (sc.results, sc.oracle)
        for x in rows.values()
    )
    add(
        "peak memory of any solve < 2 GB (RSS of the solving process)",
        peak < 2048,
        f"{peak:.0f} MB",
    )
    return out


# ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset with shorter time limits")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--threads", type=int, default=0, help="solver threads (0: all cores)")
    ap.add_argument("--time-limit", type=float, default=None, help="cpsat seconds per solve")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    quick: bool = args.quick
    limit = args.time_limit if args.time_limit is not None else (4.0 if quick else 8.0)
    opts = SolveOptions(time_limit_s=limit, threads=args.threads, seed=0)
    t_start = time.time()
    hw = hardware()
    console.print(f"[bold]moeplace placement benchmark[/bold] ({'quick' if quick else 'full'})")
    console.print(
        f"hardware: {hw['cpu']}, {hw['nproc']} cores (shared, load average at start "
        f"{hw['loadavg_at_start'][0]:.2f}); Python {hw['python']}, OR-Tools {hw['ortools']}. "
        "Times are wall-clock on this machine."
    )
    base_mb = baseline_rss_mb()
    rd = load_real(args.data)
    L, E = rd.eval_total.shape
    v2 = MoEModelShape(name="deepseek-v2-lite", moe_layers=L, experts=E, top_k=6)
    console.print(
        f"inputs: DeepSeek-V2-Lite-Chat routing ({L} MoE layers x {E} experts, top-6, "
        f"{rd.prompts} prompts, {rd.tokens} tokens); calibration: prompts 1..500 as five "
        f"{WINDOW}-prompt windows (placement.load.estimate: their mean + 32 bootstrap samples "
        "of it; cpsat-best hedges over the windows themselves); "
        f"evaluation: prompts 501..1000 in aggregate and as five {WINDOW}-prompt windows, even "
        "and best split; traffic share from the evaluation prompts' layer transitions. "
        f"cpsat: {limit:g} s limit, threads={opts.threads or os.cpu_count()}, hedge=expected; "
        "cpsat-best: the same solver with the best-split objective (dispatch='speed-aware', for a "
        "speed-aware dispatcher). "
        f"Peak memory: max RSS (getrusage) of a forked child per solve; the fork alone is "
        f"{base_mb:.0f} MB."
    )
    real: list[Scenario] = []
    sizes = [32] if quick else [8, 16, 32]
    for G in sizes:
        for R in [G] if quick else [0, G]:
            real.append(
                Scenario(
                    f"PAL-A {G}", pal(args.data, G), R, f"{G} PAL class A GPUs on {G // 4} nodes"
                )
            )
    for G in [8] if quick else [8, 32]:
        for R in [G] if quick else [0, G]:
            real.append(
                Scenario(
                    f"H200 curves {G}",
                    h200_cluster(args.data, "deepseek-v2-lite", G, 4),
                    R,
                    f"{G} GPUs with the two measured H200 DeepSeek-V2-Lite expert curves in turn, "
                    f"{G // 4} nodes",
                )
            )
    for R in [32] if quick else [0, 32]:
        real.append(
            Scenario("homogeneous 32", Cluster.uniform(32, 4), R, "32 equal GPUs on 8 nodes")
        )
    for sc in real:
        t0 = time.time()
        run_real(sc, rd, v2, opts)
        print_real(sc)
        console.print(f"  ({time.time() - t0:.0f} s)")
    synth: dict[str, Scenario] = {}
    # Mixtral shape: 32 x 8, top-2, 8 GPUs with the H200 Mixtral curves, Zipf load
    mix = MoEModelShape(name="mixtral-8x7b", moe_layers=32, experts=8, top_k=2)
    mix_load = zipf_load(32, 8, 4096, 2, 0.5, seed=1)
    for R in [0] if quick else [0, 8]:
        sc = Scenario(
            "mixtral",
            h200_cluster(args.data, "mixtral-8x7b", 8, 4),
            R,
            "8 GPUs with the H200 Mixtral curves in turn, 2 nodes",
            real=False,
        )
        run_synthetic(sc, mix, mix_load, SolveOptions(time_limit_s=0.7, threads=args.threads))
        print_synthetic(
            sc, "SYNTHETIC Zipf(0.5) load, 4096 tokens x top-2 per layer (no Mixtral trace)"
        )
        synth["mixtral" if R == 0 else "mixtral+8"] = sc
    # DeepSeek-V3 shape: 58 x 256, 64 GPUs on 8 nodes, +64 copies, Zipf load
    v3 = MoEModelShape(name="deepseek-v3", moe_layers=58, experts=256, top_k=8)
    v3_load = zipf_load(58, 256, 16384, 8, 0.5, seed=2)
    speeds = [g.speed for g in pal(args.data, 32).gpus] * 2
    v3_cluster = Cluster.uniform(64, 8, speeds)
    sc = Scenario("v3", v3_cluster, 64, "64 GPUs on 8 nodes, PAL class A speeds twice", real=False)
    v3_limit = 20.0 if quick else 50.0
    run_synthetic(sc, v3, v3_load, SolveOptions(time_limit_s=v3_limit, threads=args.threads))
    hot = float((v3_load.max(1) / v3_load.mean(1)).mean())
    print_synthetic(
        sc,
        f"SYNTHETIC Zipf(0.5) load (hottest expert {hot:.1f}x the mean), 16384 tokens x top-8 "
        "per layer, calibrate = evaluate (no DeepSeek-V3 trace is available); "
        f"cpsat {v3_limit:g} s",
    )
    synth["v3"] = sc
    targets = check_targets(real, synth)
    t = Table(title="Targets of issue 3", title_justify="left")
    t.add_column("result")
    t.add_column("target")
    t.add_column("value")
    for x in targets:
        t.add_row(
            "[green]PASS[/green]" if x["pass"] else "[red]MISS[/red]", x["target"], x["value"]
        )
    console.print(t)
    left_out = [
        "G/2 redundant copies: E=64 is a multiple of G, so 64 + G/2 slots never divide over G GPUs "
        "(engines need equal slots per GPU); 0 and G copies are run instead",
        "no real DeepSeek-V3 or Mixtral routing trace: Zipf loads, scored on the load they were "
        "solved for",
        "H200 curves exist for two GPUs; larger clusters repeat them in turn",
        "GPU time is a function of the GPU's total tokens in the layer (one curve lookup), not "
        "a sum of per-expert kernels",
        "cpsat runs with traffic weight 0 here (traffic share is reported, not optimised)",
    ]
    console.print("left out: " + "; ".join(left_out))
    result = {
        "command": " ".join(["bench/placement_bench.py", *sys.argv[1:]]),
        "hardware": hw,
        "fork_baseline_rss_mb": base_mb,
        "cpsat_time_limit_s": limit,
        "threads": opts.threads or os.cpu_count(),
        "real": [
            {
                "name": s.name,
                "gpus": s.gpus_desc,
                "redundant": s.redundant,
                "heldout": s.results,
                "oracle": s.oracle,
            }
            for s in real
        ],
        "synthetic": {
            k: {"gpus": s.gpus_desc, "redundant": s.redundant, "oracle": s.oracle}
            for k, s in synth.items()
        },
        "targets": targets,
        "left_out": left_out,
        "total_s": time.time() - t_start,
    }
    out = (
        args.out or ROOT / "bench" / "results" / f"placement_bench{'-quick' if quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    console.print(
        f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} "
        f"({time.time() - t_start:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
