"""GPU call 1: profile every local GPU, then a controlled slowdown. Writes under --out:

  profile_<shape>.json  GPU-profile documents (apiVersion moeplace.io/v1alpha1, kind GPUProfile),
                        one per expert shape: per-GPU curve (median over passes, monotone
                        suffix-minimum) and speed factor (load-weighted, mean GPU = 1.0)
  layer_profile.json    the same document for the MoE stack's per-GPU work: all S local experts
                        of the stack's expert shape (--expert-shape, DeepSeek-V2-Lite by default)
                        in one grouped GEMM, vs total tokens
  call1.json            everything: per-pass raw µs, medians with bootstrap CIs, GPU-to-GPU
                        paired differences, pass-to-pass spread, co-tenant slowdowns, nvidia-smi

Sections (each time-boxed; a section that runs out of time writes what it has):
  A  expert-FFN curves, three shapes, every GPU, tile-boundary plan, CUDA graphs (several FFNs
     per replay, weights rotated so L2 does not hold them), GPUs interleaved inside each pass
  C  layer curves (the MoE stack's grouped expert compute), every GPU; then the slowed GPU under
     each co-tenant setting (what make_placements.py needs); a ``-hold`` co-tenant's passes replay
     graphs captured under its SM carve-out (a graph keeps the grid it was captured with)
  B  expert-FFN curves on the slowed GPU under each co-tenant setting (not the ``-hold`` ones:
     they are made for the grouped layer GEMM, whose grid the carve-out sizes)

Needs torch (and cupy for the co-tenant). Run from the repository root:
  python3 gpu/profile_gpus.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "profiler"))

from kernels import (  # noqa: E402
    DEFAULT_SHAPE,
    SHAPES,
    CoTenant,
    CoTenantSpec,
    ensure_safe_env,
    ffn,
    grouped_ffn,
    log,
    make_expert,
    pick_grouped_impl,
    sm_carveout,
    smi,
)
from moeplace_profiler import PROFILE_API_VERSION, PROFILE_KIND  # noqa: E402
from moeplace_profiler.cuda_timing import capture, time_replays  # noqa: E402
from moeplace_profiler.plan import split_tokens, tile_plan, window_plan  # noqa: E402
from moeplace_profiler.stats import (  # noqa: E402
    clean_curve,
    load_weights,
    median_boot,
    paired_difference,
    relative_spread,
    speed_factors,
)

L2_BYTES = 60 * 1024 * 1024
DEFAULT_COTENANTS = "k52-hold,k8,k33,k66,k132-on40-off160,k132-on50-off150,k132-on60-off140"


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


# --------------------------------------------------------------------------- section A


def build_ffn_graphs(dev: Any, hidden: int, inter: int, plan: list[int]) -> dict[int, Any]:
    """One graph per token count: ``per`` FFNs over rotating weight sets (more bytes than L2)."""
    import torch

    wbytes = 3 * hidden * inter * 2
    sets = max(1, min(12, math.ceil(3 * L2_BYTES / wbytes)))
    per = max(8, sets)
    weights = [make_expert(hidden, inter, dev, seed=1000 + i) for i in range(sets)]
    pool = torch.cuda.graph_pool_handle()
    graphs: dict[int, Any] = {}
    for t in plan:
        x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16)

        def work(x: Any = x) -> None:
            for i in range(per):
                w13, w2 = weights[i % sets]
                ffn(x, w13, w2)

        graphs[t] = (capture(work, dev, pool=pool), per, x)
    graphs[-1] = (weights, None, None)  # the graphs read these: keep them alive
    return graphs


class Eager:
    """Stands in for a CUDA graph where capture fails: replay() runs the work eagerly (several
    large kernels per unit of work, so launch overhead stays small)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def run_passes(
    graphs: dict[int, dict[int, Any]],
    plan: list[int],
    rounds: int,
    reps: int,
    deadline: Deadline,
    reserve_s: float,
) -> list[dict[str, dict[str, float]]]:
    """``rounds`` passes; inside each, every count on every GPU, GPU order alternating."""
    passes: list[dict[str, dict[str, float]]] = []
    devs = sorted(graphs)
    for r in range(rounds):
        if deadline.left() < reserve_s:
            log(f"  out of time after {r} passes")
            break
        order = devs if r % 2 == 0 else devs[::-1]
        rec: dict[str, dict[str, float]] = {str(d): {} for d in devs}
        for t in plan:
            for d in order:
                g, per, _ = graphs[d][t]
                rec[str(d)][str(t)] = time_replays(g, d, reps=reps, per_replay=per)
        passes.append(rec)
    return passes


def summarise(
    passes: list[dict[str, dict[str, float]]], plan: list[int], typical: list[float] | None
) -> dict[str, Any]:
    """Medians with CIs per GPU and count, paired differences vs GPU 0, speed factors."""
    if not passes:
        return {}
    devs = sorted(passes[0], key=int)
    out: dict[str, Any] = {"tokens": plan, "gpus": {}}
    med: dict[str, list[float]] = {}
    for d in devs:
        rows = []
        for t in plan:
            vals = [p[d][str(t)] for p in passes if str(t) in p[d]]
            est = median_boot(vals)
            rows.append(
                {"tokens": t, **est.as_dict(), "spread": relative_spread(vals), "passes": vals}
            )
        med[d] = [r["value"] for r in rows]
        out["gpus"][d] = rows
    w = load_weights(plan, typical)
    try:
        speeds = speed_factors([med[d] for d in devs], w)
        out["speed"] = {d: float(s) for d, s in zip(devs, speeds, strict=True)}
    except ValueError as e:
        out["speed_error"] = str(e)
    out["weights"] = [float(v) for v in w]
    if len(devs) > 1 and len(passes) > 1:
        diffs = {}
        for d in devs[1:]:
            diffs[d] = [
                {
                    "tokens": t,
                    **paired_difference(
                        [p[devs[0]][str(t)] for p in passes], [p[d][str(t)] for p in passes]
                    ).as_dict(),
                }
                for t in plan
            ]
        out["vsGpu0"] = diffs
    return out


def profile_doc(
    summary: dict[str, Any], shape: dict[str, Any], node: str, taken_at: str
) -> dict[str, Any]:
    gpus = []
    for d, rows in summary["gpus"].items():
        xs, ys = clean_curve([r["tokens"] for r in rows], [r["value"] for r in rows])
        gpus.append(
            {
                "gpu": int(d),
                "node": node,
                "speed": round(float(summary.get("speed", {}).get(d, 1.0)), 5),
                "curve": {"tokens": xs, "micros": [round(y, 3) for y in ys]},
            }
        )
    return {
        "apiVersion": PROFILE_API_VERSION,
        "kind": PROFILE_KIND,
        "takenAt": taken_at,
        "expertShape": shape,
        "gpus": sorted(gpus, key=lambda g: g["gpu"]),
    }


def section_a(args: argparse.Namespace, devs: list[Any], res: dict[str, Any], dl: Deadline) -> None:
    import torch

    plan = tile_plan(args.max_tokens)
    res["A"] = {"plan": plan, "shapes": {}}
    shapes = [s for s in args.shapes.split(",") if s]
    for i, name in enumerate(shapes):
        hidden, inter = SHAPES[name]
        budget = min(args.shape_budget_s, (dl.left() - args.reserve_s) / (len(shapes) - i))
        if budget < 5:
            log(f"A {name}: skipped, out of time")
            continue
        sdl = Deadline(budget)
        t0 = time.monotonic()
        graphs = {d.index: build_ffn_graphs(d, hidden, inter, plan) for d in devs}
        log(f"A {name}: graphs built in {time.monotonic() - t0:.1f}s; budget {budget:.0f}s")
        passes = run_passes(graphs, plan, args.rounds, args.reps, sdl, reserve_s=0.0)
        summ = summarise(passes, plan, None)
        summ["wall_s"] = time.monotonic() - t0
        summ["raw"] = passes
        res["A"]["shapes"][name] = summ
        if summ:
            doc = profile_doc(
                summ,
                {"name": name, "hidden": hidden, "intermediate": inter, "dtype": "bf16"},
                args.node,
                now_iso(),
            )
            dump(args.out / f"profile_{name}.json", doc)
            line = " ".join(
                f"{r['tokens']}:{r['value']:.1f}" for r in summ["gpus"][str(devs[0].index)]
            )
            log(f"A {name}: {len(passes)} passes in {summ['wall_s']:.1f}s; gpu0 µs {line}")
            for d, rows in summ.get("vsGpu0", {}).items():
                txt = " ".join(
                    f"{r['tokens']}:{r['ratio']:.3f}{'*' if r['significant'] else ''}" for r in rows
                )
                log(f"A {name}: gpu{d}/gpu0 (* = outside noise) {txt}")
            log(f"A {name}: speed factors {summ.get('speed')}")
        del graphs
        torch.cuda.empty_cache()
        dump(args.out / "call1.json", res)


# --------------------------------------------------------------------------- section C


def layer_weights(dev: Any, shape: str, slots: int) -> tuple[Any, Any]:
    """The S local experts' stacked weights ([S, H, 2I] and [S, I, H], bf16) of ``shape``."""
    import torch

    hidden, inter = SHAPES[shape]
    g = torch.Generator(device=dev).manual_seed(7)
    w13 = torch.randn(slots, hidden, 2 * inter, device=dev, dtype=torch.bfloat16, generator=g)
    w13.mul_(hidden**-0.5)
    w2 = torch.randn(slots, inter, hidden, device=dev, dtype=torch.bfloat16, generator=g)
    w2.mul_(inter**-0.5)
    return w13, w2


def build_layer_graphs(
    dev: Any,
    impl: Any,
    wts: tuple[Any, Any],
    plan: list[int],
    weights: list[float],
    per: int,
) -> dict[int, Any]:
    """Graphs of ``per`` grouped expert computations over the S experts of ``wts``."""
    import torch

    w13, w2 = wts
    slots, hidden = int(w13.shape[0]), int(w13.shape[1])
    pool = torch.cuda.graph_pool_handle()
    graphs: dict[int, Any] = {}
    for t in plan:
        counts = split_tokens(t, weights[:slots])
        offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16)

        def work(x: Any = x, offs: Any = offs, counts: list[int] = counts) -> None:
            for _ in range(per):
                grouped_ffn(x, w13, w2, offs, counts, impl)

        try:
            runner: Any = capture(work, dev, pool=pool)
        except Exception as e:  # a kernel that syncs cannot be captured: time it eagerly
            log(f"C: graph capture failed on {dev} at {t} tokens ({e}); timing eagerly")
            runner = Eager(work)
        graphs[t] = (runner, per, (x, offs))
    graphs[-1] = ((w13, w2), None, None)  # the graphs read these: keep them alive
    return graphs


def section_c(
    args: argparse.Namespace,
    devs: list[Any],
    impls: dict[int, Any],
    res: dict[str, Any],
    dl: Deadline,
    weights: list[float],
) -> None:
    import torch

    plan = window_plan(args.layer_center, hi=2 * args.layer_center, tile=128, points=16)
    shape = args.expert_shape
    per = args.layer_per or (3 if shape == DEFAULT_SHAPE else 1)
    res["C"] = {
        "plan": plan,
        "slots": args.layer_slots,
        "expertShape": shape,
        "perReplay": per,
        "impl": {str(k): v.name for k, v in impls.items()},
        "expertWeights": weights[: args.layer_slots],
    }
    t0 = time.monotonic()
    wts = {d.index: layer_weights(d, shape, args.layer_slots) for d in devs}
    graphs = {
        d.index: build_layer_graphs(d, impls[d.index], wts[d.index], plan, weights, per)
        for d in devs
    }
    log(f"C: {shape} layer graphs built in {time.monotonic() - t0:.1f}s ({res['C']['impl']})")
    passes = run_passes(graphs, plan, args.rounds, args.reps, dl, reserve_s=args.reserve_s)
    summ = summarise(passes, plan, None)
    summ["raw"] = passes
    res["C"]["base"] = summ
    if summ:
        hidden, inter = SHAPES[shape]
        doc = profile_doc(
            summ,
            {
                "name": f"{shape}-x{args.layer_slots}-grouped",
                "hidden": hidden,
                "intermediate": inter,
                "dtype": "bf16",
            },
            args.node,
            now_iso(),
        )
        dump(args.out / "layer_profile.json", doc)
        for d, rows in summ["gpus"].items():
            log(f"C gpu{d} µs " + " ".join(f"{r['tokens']}:{r['value']:.0f}" for r in rows))
        for d, rows in summ.get("vsGpu0", {}).items():
            log(
                f"C gpu{d}/gpu0 "
                + " ".join(
                    f"{r['tokens']}:{r['ratio']:.3f}{'*' if r['significant'] else ''}" for r in rows
                )
            )
    dump(args.out / "call1.json", res)
    # slowed GPU under each co-tenant setting: passes alternate co-tenant on / off so the
    # ratio is paired against the same GPU's own baseline taken minutes apart at most
    slow = args.slow_gpu
    if slow >= len(devs):
        log(f"C: no GPU {slow} to slow; skipping co-tenant layer curves")
        return
    specs = [CoTenantSpec.parse(s) for s in args.cotenants.split(",") if s]
    res["C"]["cotenant"] = {}
    share = 2 if "B" not in args.skip else 1  # half the time left for section B, if it runs
    per_spec = (dl.left() - args.reserve_s) / max(1, len(specs)) / share
    for spec in specs:
        if dl.left() < args.reserve_s + 5:
            log(f"C {spec.name}: skipped, out of time")
            continue
        sdl = Deadline(min(per_spec, args.cotenant_budget_s))
        on: list[dict[str, float]] = []
        off: list[dict[str, float]] = []
        err = None
        held: list[int | None] = []
        on_graphs = graphs[slow]
        if spec.carveout_sms is not None:  # the grouped GEMM's grid, sized for the SMs left
            try:
                with sm_carveout(spec.carveout_sms):
                    on_graphs = build_layer_graphs(
                        devs[slow], impls[slow], wts[slow], plan, weights, per
                    )
            except Exception as e:
                err = f"carve-out capture failed: {type(e).__name__}: {e}"
                log(f"C {spec.name}: {err}")
                res["C"]["cotenant"][spec.name] = {"spec": spec.as_dict(), "error": err}
                continue
        for _ in range(args.cotenant_rounds):
            if sdl.left() < 0:
                break
            try:
                with CoTenant(spec, slow) as ct:
                    p = run_passes({slow: on_graphs}, plan, 1, args.reps, sdl, -1e9)
                    err = err or ct.error
                    held.append(ct.held_sms)
                on.append(p[0][str(slow)])
                q = run_passes({slow: graphs[slow]}, plan, 1, args.reps, sdl, -1e9)
                off.append(q[0][str(slow)])
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                log(f"C {spec.name}: co-tenant failed: {err}")
                break
        n = min(len(on), len(off))
        on, off = on[:n], off[:n]
        if not n:
            res["C"]["cotenant"][spec.name] = {"spec": spec.as_dict(), "error": err}
            continue
        rows = []
        for t in plan:
            a = [p[str(t)] for p in off]
            b = [p[str(t)] for p in on]
            diff = paired_difference(a, b) if len(a) > 1 else None
            rows.append(
                {
                    "tokens": t,
                    **median_boot(b).as_dict(),
                    "baseline": float(sorted(a)[len(a) // 2]),
                    "slowdown": diff.as_dict() if diff else b[0] / a[0],
                    "passes": b,
                    "baselinePasses": a,
                }
            )
        res["C"]["cotenant"][spec.name] = {"spec": spec.as_dict(), "rows": rows, "error": err}
        if spec.hold:
            res["C"]["cotenant"][spec.name]["heldSms"] = held
        del on_graphs
        log(
            f"C {spec.name}: slowdown "
            + " ".join(
                f"{r['tokens']}:"
                + (
                    f"{r['slowdown']['ratio']:.2f}"
                    if isinstance(r["slowdown"], dict)
                    else f"{r['slowdown']:.2f}"
                )
                for r in rows
            )
            + (f" (error {err})" if err else "")
            + (f" (SMs held per round {held})" if spec.hold else "")
        )
        dump(args.out / "call1.json", res)
    del graphs, wts
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- section B


def section_b(args: argparse.Namespace, devs: list[Any], res: dict[str, Any], dl: Deadline) -> None:
    import torch

    slow = args.slow_gpu
    if slow >= len(devs):
        return
    plan = tile_plan(args.max_tokens)
    specs = [CoTenantSpec.parse(s) for s in args.cotenants.split(",") if s]
    res["B"] = {"plan": plan, "gpu": slow, "shapes": {}}
    dev = devs[slow]
    for name in [s for s in args.slowdown_shapes.split(",") if s]:
        if dl.left() < args.reserve_s + 10:
            log(f"B {name}: skipped, out of time")
            break
        hidden, inter = SHAPES[name]
        graphs = {slow: build_ffn_graphs(dev, hidden, inter, plan)}
        base = run_passes(graphs, plan, 2, args.reps, dl, -1e9)
        shape_res: dict[str, Any] = {
            "baseline": {str(t): float(min(p[str(slow)][str(t)] for p in base)) for t in plan},
            "baselinePasses": base,
        }
        for spec in specs:
            if dl.left() < args.reserve_s + 5:
                break
            if spec.hold:
                continue
            try:
                with CoTenant(spec, slow) as ct:
                    p = run_passes(graphs, plan, 2, args.reps, dl, -1e9)
                    err = ct.error
            except Exception as e:
                shape_res[spec.name] = {"spec": spec.as_dict(), "error": f"{e}"}
                continue
            us = {str(t): float(min(q[str(slow)][str(t)] for q in p)) for t in plan}
            ratio = {t: us[t] / shape_res["baseline"][t] for t in us}
            shape_res[spec.name] = {"spec": spec.as_dict(), "micros": us, "slowdown": ratio}
            if err:
                shape_res[spec.name]["error"] = err
            log(
                f"B {name} {spec.name}: slowdown "
                + " ".join(f"{t}:{v:.2f}" for t, v in ratio.items())
            )
        res["B"]["shapes"][name] = shape_res
        del graphs
        torch.cuda.empty_cache()
        dump(args.out / "call1.json", res)


# --------------------------------------------------------------------------- main


def expert_weights(path: Path, slots: int) -> list[float]:
    """Per-expert shares for the layer curve: a real layer's counts (sorted, every other
    expert so the S local experts span hot and cold), or a Zipf-like stand-in."""
    try:
        import numpy as np

        with np.load(path) as z:
            w = [float(v) for v in z["layer_weights"]]
        picked = w[::2] + w[1::2]
        return (picked * (slots // len(picked) + 1))[: max(slots, 1)]
    except Exception as e:
        log(f"no routing weights from {path} ({e}); using a Zipf-like stand-in")
        return [1.0 / math.sqrt(i + 1) for i in range(max(slots, 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole run, wall seconds")
    ap.add_argument("--reserve-s", type=float, default=15.0)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--slowdown-shapes", default="deepseek-v2-lite,mixtral-8x7b")
    ap.add_argument("--shape-budget-s", type=float, default=55.0, help="per shape, all GPUs")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--slow-gpu", type=int, default=1)
    ap.add_argument("--cotenants", default=DEFAULT_COTENANTS)
    ap.add_argument("--cotenant-rounds", type=int, default=3)
    ap.add_argument("--cotenant-budget-s", type=float, default=25.0)
    ap.add_argument(
        "--expert-shape",
        choices=sorted(SHAPES),
        help="expert shape of the layer curve (section C): the MoE stack's experts (default "
        "deepseek-v2-lite; with --cotenants plan:PATH the plan's expertShape)",
    )
    ap.add_argument("--layer-slots", type=int, default=36)
    ap.add_argument("--layer-center", type=int, default=24576, help="typical tokens per GPU")
    ap.add_argument(
        "--layer-per",
        type=int,
        default=0,
        help="grouped computations per replay (0: 3 for deepseek-v2-lite, 1 for larger shapes)",
    )
    ap.add_argument("--routing", type=Path, default=HERE / "carry" / "routing.npz")
    ap.add_argument("--node", default=os.environ.get("NODE_NAME", socket.gethostname()))
    ap.add_argument("--skip", default="", help="sections to skip, e.g. B")
    args = ap.parse_args()
    if args.cotenants.startswith("plan:"):  # re-check the setting make_placements.py chose
        plan = json.loads(Path(args.cotenants[5:]).read_text())
        args.cotenants = plan["cotenant"]["name"]
        if args.expert_shape is None:  # ... on the experts the stack ran
            args.expert_shape = (plan.get("expertShape") or {}).get("name", DEFAULT_SHAPE)
    args.expert_shape = args.expert_shape or DEFAULT_SHAPE
    args.out.mkdir(parents=True, exist_ok=True)
    dl = Deadline(args.budget_s)
    res: dict[str, Any] = {"startedAt": now_iso()}
    res["args"] = {k: str(v) for k, v in vars(args).items()}
    res["env"] = ensure_safe_env()
    try:
        import torch

        res["torch"] = torch.__version__
        n = torch.cuda.device_count()
        if n == 0:
            raise RuntimeError("no CUDA device")
        devs = [torch.device("cuda", i) for i in range(n)]
        res["gpus"] = [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "sms": torch.cuda.get_device_properties(i).multi_processor_count,
            }
            for i in range(n)
        ]
        res["smiStart"] = smi()
        log(f"torch {torch.__version__}, {n} GPU(s): {[g['name'] for g in res['gpus']]}")
        impls = {d.index: pick_grouped_impl(d) for d in devs}
        weights = expert_weights(args.routing, args.layer_slots)
        for sec, fn in (
            ("A", lambda: section_a(args, devs, res, dl)),
            ("C", lambda: section_c(args, devs, impls, res, dl, weights)),
            ("B", lambda: section_b(args, devs, res, dl)),
        ):
            if sec in args.skip:
                continue
            try:
                t0 = time.monotonic()
                fn()
                log(f"section {sec} done in {time.monotonic() - t0:.0f}s; {dl.left():.0f}s left")
            except Exception:
                res.setdefault("errors", []).append({sec: traceback.format_exc()})
                log(f"section {sec} failed:\n{traceback.format_exc()}")
            res["smiAfter" + sec] = smi()
            dump(args.out / "call1.json", res)
    except Exception:
        res.setdefault("errors", []).append({"main": traceback.format_exc()})
        log(traceback.format_exc())
    res["finishedAt"] = now_iso()
    dump(args.out / "call1.json", res)
    log(f"wrote {sorted(p.name for p in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
