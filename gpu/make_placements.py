"""Between the two GPU calls, on this machine (our venv): placements for the MoE stack.

  make_placements.py routing   (before call 1) real routing -> gpu/carry/routing.npz (ignored by
                               git: the trace has no upstream license; carried to the GPU machine)
  make_placements.py solve --call1 DIR   (after call 1) reads DIR/call1.json and
                               DIR/layer_profile.json, picks the co-tenant setting that slows the
                               GPU closest to the target, builds a Cluster of measured layer
                               curves (the slowed curve on every GPU of --slow-ranks, e.g.
                               1,3; default 1), solves cpsat, greedy, eplb and round-robin for
                               each scenario, writes gpu/placements/<scenario>/<strategy>.json and
                               gpu/placements/plan.json (scenarios, co-tenant, predictions);
                               --expert-shape mixtral-8x7b: the experts the layer curve of call 1
                               was measured with (call1.json says which; the routing stays the
                               DeepSeek-V2-Lite trace); --out DIR: another folder under gpu/

The trace splits by prompt: prompts 1..600 calibrate (the load the solvers see: mean and
per-batch samples), prompts 601.. are replayed by the stack (held out). A batch is
``--batch-tokens`` consecutive tokens; tokens of batch b are split evenly over the ranks.
Per-batch loads matter: curves are not linear, so the solvers see loads at the stack's scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "profiler"))
sys.path.insert(0, str(HERE))

from kernels import DEFAULT_SHAPE, SHAPES, expert_bytes  # noqa: E402

TRACE = "data/routing/deepseek-v2-lite-chat/routing_topk6_prompts_0001_1000.npz"
STRATEGIES = ("cpsat", "greedy", "eplb", "round-robin")
LAYERS, EXPERTS, TOPK = 26, 64, 6


def find_shared(explicit: Path | None) -> Path:
    for cand in [explicit, REPO / "shared", REPO.parent / "shared"]:
        if cand is not None and (cand / TRACE).is_file():
            return cand
    raise SystemExit(
        f"routing trace not found (looked for {TRACE} under --shared, ./shared, ../shared)"
    )


def counts_of(ids: np.ndarray) -> np.ndarray:
    """[T, L, K] expert ids -> [L, E] tokens per expert."""
    out = np.zeros((ids.shape[1], EXPERTS), dtype=np.float64)
    for layer in range(ids.shape[1]):
        out[layer] = np.bincount(ids[:, layer, :].ravel(), minlength=EXPERTS)
    return out


def split(shared: Path, batch_tokens: int, calib_last_prompt: int) -> dict[str, np.ndarray]:
    with np.load(shared / TRACE) as z:
        ids = z["expert_ids"].astype(np.uint8)
        prompt = z["prompt_id"]
    calib = ids[prompt <= calib_last_prompt]
    held = ids[prompt > calib_last_prompt]
    nb = len(held) // batch_tokens
    ncal = len(calib) // batch_tokens
    if nb < 1 or ncal < 1:
        raise SystemExit(f"too few tokens for batches of {batch_tokens}")
    eval_ids = held[: nb * batch_tokens].reshape(nb, batch_tokens, LAYERS, TOPK)
    samples = np.stack(
        [counts_of(calib[i * batch_tokens : (i + 1) * batch_tokens]) for i in range(ncal)]
    )
    return {
        "eval_ids": eval_ids,
        "eval_load": np.stack([counts_of(b) for b in eval_ids]),
        "calib_samples": samples,
        "calib_load": samples.mean(axis=0),
    }


def cmd_routing(args: argparse.Namespace) -> None:
    shared = find_shared(args.shared)
    parts = split(shared, args.batch_tokens, args.calib_last_prompt)
    mean_share = parts["calib_load"].mean(axis=0)
    layer_weights = np.sort(parts["calib_load"] / parts["calib_load"].sum(1, keepdims=True), axis=1)
    out = HERE / "carry"
    out.mkdir(exist_ok=True)
    np.savez_compressed(
        out / "routing.npz",
        eval_ids=parts["eval_ids"],
        layer_weights=layer_weights.mean(axis=0)[::-1],
        batch_tokens=np.int64(args.batch_tokens),
        calib_last_prompt=np.int64(args.calib_last_prompt),
    )
    size = (out / "routing.npz").stat().st_size
    print(
        f"wrote {out / 'routing.npz'} ({size / 1e6:.1f} MB): {parts['eval_ids'].shape[0]} held-out "
        f"batches of {args.batch_tokens} tokens; mean expert share max/mean "
        f"{mean_share.max() / mean_share.mean():.2f}"
    )


# --------------------------------------------------------------------------- solve


def curve_from_rows(
    rows: list[dict[str, Any]], key: str = "value"
) -> tuple[list[int], list[float]]:
    from moeplace_profiler.stats import clean_curve

    return clean_curve([int(r["tokens"]) for r in rows], [float(r[key]) for r in rows])


def slowdown_at(rows: list[dict[str, Any]], lo: float, hi: float) -> float:
    vals = []
    for r in rows:
        if lo <= r["tokens"] <= hi:
            s = r["slowdown"]
            vals.append(s["ratio"] if isinstance(s, dict) else float(s))
    return float(np.median(vals)) if vals else float("nan")


def pick_cotenant(call1: dict[str, Any], center: float, target: float, name: str | None) -> str:
    cot = call1.get("C", {}).get("cotenant", {})
    usable = {k: v for k, v in cot.items() if v.get("rows")}
    if not usable:
        raise SystemExit("call1.json has no co-tenant layer curves (section C)")
    table = {k: slowdown_at(v["rows"], 0.6 * center, 1.2 * center) for k, v in usable.items()}
    for k, v in table.items():
        print(f"  co-tenant {k}: layer slowdown near the load {v:.3f}")
    if name:
        if name not in usable:
            raise SystemExit(f"co-tenant {name} not measured; have {sorted(usable)}")
        return name
    return min(table, key=lambda k: abs(table[k] - target))


def slow_ranks_of(args: argparse.Namespace, num_gpus: int) -> list[int]:
    """--slow-ranks 1,3 or --slow-rank 1 (one rank; same as --slow-ranks 1); default [1]."""
    if args.slow_ranks is not None and args.slow_rank is not None:
        raise SystemExit("give --slow-ranks or --slow-rank, not both")
    if args.slow_ranks is not None:
        try:
            ranks = [int(r) for r in args.slow_ranks.split(",") if r.strip()]
        except ValueError:
            raise SystemExit(f"--slow-ranks: not a list of ranks: {args.slow_ranks!r}") from None
    else:
        ranks = [1 if args.slow_rank is None else args.slow_rank]
    ranks = sorted(set(ranks))
    if not ranks or any(r < 0 or r >= num_gpus for r in ranks):
        raise SystemExit(f"slowed ranks {ranks} not within the {num_gpus} GPUs of call 1")
    return ranks


def expert_shape_of(call1: dict[str, Any], asked: str | None) -> str:
    """The experts call 1's layer curve timed (older call1.json: deepseek-v2-lite); an explicit
    --expert-shape must agree, since the predictions come from that curve."""
    measured = str(call1.get("C", {}).get("expertShape") or DEFAULT_SHAPE)
    if asked is not None and asked != measured:
        raise SystemExit(
            f"--expert-shape {asked}, but call 1's layer curve timed {measured} experts: profile "
            f"again with profile_gpus.py --expert-shape {asked}"
        )
    return measured


def cmd_solve(args: argparse.Namespace) -> None:
    from placement.evaluate import evaluate
    from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape
    from placement.problem import Problem
    from placement.solvers import SolveOptions, solve

    call1 = json.loads((args.call1 / "call1.json").read_text())
    shape = expert_shape_of(call1, args.expert_shape)
    hidden, inter = SHAPES[shape]
    with np.load(HERE / "carry" / "routing.npz") as z:
        batch_tokens = int(z["batch_tokens"])
        calib_last = int(z["calib_last_prompt"])
    parts = split(find_shared(args.shared), batch_tokens, calib_last)
    base = call1["C"]["base"]["gpus"]
    gpus = sorted(base, key=int)
    num_gpus = len(gpus)
    center = batch_tokens * TOPK / num_gpus
    slow_ranks = slow_ranks_of(args, num_gpus)
    chosen = pick_cotenant(call1, center, args.target_slowdown, args.cotenant)
    spec = call1["C"]["cotenant"][chosen]["spec"]
    print(
        f"co-tenant for the slowed scenario: {chosen} on GPU{'s' if len(slow_ranks) > 1 else ''} "
        + ", ".join(map(str, slow_ranks))
    )
    base_curves = {g: curve_from_rows(base[g]) for g in gpus}
    slowed_curve = curve_from_rows(call1["C"]["cotenant"][chosen]["rows"])
    model = MoEModelShape(
        name=f"deepseek-v2-lite-routing-{shape}-experts" if shape != DEFAULT_SHAPE else shape,
        moe_layers=LAYERS, experts=EXPERTS, top_k=TOPK, expert_bytes=expert_bytes(shape),
        dense_layers_before=1,
    )  # fmt: skip
    scenarios = {
        "slowed": {g: (slowed_curve if int(g) in slow_ranks else base_curves[g]) for g in gpus},
        "asis": base_curves,
    }
    out_dir = args.out or HERE / "placements"
    out_dir.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Any] = {
        "expertShape": {"name": shape, "hidden": hidden, "intermediate": inter},
        "batchTokens": batch_tokens,
        "numBatches": int(parts["eval_ids"].shape[0]),
        "calibLastPrompt": calib_last,
        "redundant": args.redundant,
        "slowRanks": slow_ranks,
        "slowRank": slow_ranks[0],  # the first, for readers of one-rank plans
        "cotenant": spec,
        "cotenantSlowdownNearLoad": slowdown_at(
            call1["C"]["cotenant"][chosen]["rows"], 0.6 * center, 1.2 * center
        ),
        "impl": call1["C"].get("impl", {}),
        "scenarios": [],
    }
    for sname, curves in scenarios.items():
        cluster = Cluster(
            gpus=[
                GPU(
                    node="gpu-machine", curve=LatencyCurve(tokens=curves[g][0], micros=curves[g][1])
                )
                for g in gpus
            ]
        )
        problem = Problem.build(
            model, cluster, parts["calib_load"], redundant=args.redundant,
            samples=parts["calib_samples"],
        )  # fmt: skip
        (out_dir / sname).mkdir(exist_ok=True)
        entry: dict[str, Any] = {
            "name": sname,
            "cotenant": sname == "slowed",
            "curves": {g: {"tokens": c[0], "micros": c[1]} for g, c in curves.items()},
            "placements": {},
            "predicted": {},
        }
        for strat in args.strategies.split(","):
            t0 = time.monotonic()
            try:
                sol = solve(
                    problem, strat,
                    SolveOptions(time_limit_s=args.time_limit, seed=0, threads=args.threads),
                )  # fmt: skip
            except Exception as e:
                print(f"  {sname}/{strat}: FAILED {type(e).__name__}: {e}")
                continue
            path = out_dir / sname / f"{strat}.json"
            path.write_text(sol.placement.to_json())
            ev = evaluate(sol.placement, cluster, parts["eval_load"], dispatch="even")
            cal = evaluate(sol.placement, cluster, parts["calib_load"], dispatch="even")
            entry["placements"][strat] = os.path.relpath(path, HERE)  # moe_stack: HERE / this
            entry["predicted"][strat] = {
                "layerMicros": ev.layer_time.tolist(),  # [batch][layer]
                "gpuLoad": ev.gpu_load.tolist(),  # [batch][layer][gpu]
                "gpuMicros": ev.gpu_time.tolist(),
                "stepMicros": float(ev.layer_time.sum(-1).mean()),
                "fluidBoundMicros": float(ev.fluid_bound),
                "calibStepMicros": float(cal.straggler),
                "solver": {
                    "status": sol.status, "objective": sol.objective, "bound": sol.bound,
                    "gap": sol.gap, "wall_s": time.monotonic() - t0,
                },
            }  # fmt: skip
            print(
                f"  {sname}/{strat}: predicted step {ev.layer_time.sum(-1).mean():.0f} µs on "
                f"held-out batches (fluid bound {ev.fluid_bound:.0f}); {sol.status}, "
                f"{time.monotonic() - t0:.1f}s"
            )
        plan["scenarios"].append(entry)
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=1))
    print(f"wrote {out_dir / 'plan.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("routing")
    r.add_argument("--shared", type=Path)
    r.add_argument("--batch-tokens", type=int, default=8192)
    r.add_argument("--calib-last-prompt", type=int, default=600)
    s = sub.add_parser("solve")
    s.add_argument("--call1", type=Path, required=True, help="folder with call1.json")
    s.add_argument("--shared", type=Path)
    s.add_argument(
        "--slow-ranks", help="comma-separated ranks slowed by the co-tenant, e.g. 1,3 (default 1)"
    )
    s.add_argument("--slow-rank", type=int, help="one slowed rank (same as --slow-ranks N)")
    s.add_argument("--redundant", type=int, default=8)
    s.add_argument("--target-slowdown", type=float, default=1.3)
    s.add_argument("--cotenant", help="force a measured co-tenant setting by name")
    s.add_argument("--strategies", default=",".join(STRATEGIES))
    s.add_argument("--time-limit", type=float, default=30.0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument(
        "--expert-shape",
        choices=sorted(SHAPES),
        help="experts of the stack (default: what call 1's layer curve timed); routing stays the "
        "DeepSeek-V2-Lite trace",
    )
    s.add_argument("--out", type=Path, help="placements folder (default gpu/placements)")
    args = ap.parse_args()
    {"routing": cmd_routing, "solve": cmd_solve}[args.cmd](args)


if __name__ == "__main__":
    main()
