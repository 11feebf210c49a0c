"""After both GPU calls, here: tables and figures of what was measured.

  .venv/bin/python gpu/analyze.py --call1 docs/gpu/call1 --call2 docs/gpu/call2

Reads call 1's documents and call1.json, gpu/placements/plan.json (the placements' predictions)
and call 2's moe_stack.json (+ recheck/). Writes docs/gpu/summary.json, docs/gpu/*.png and the
tables of docs/gpu-results.md between its AUTO markers (the prose around them is kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHAPES = ("deepseek-v2-lite", "mixtral-8x7b", "deepseek-v3")
BEGIN, END = "<!-- AUTO:BEGIN (gpu/analyze.py) -->", "<!-- AUTO:END -->"


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# --------------------------------------------------------------------------- call 1


def gpu_table(call1: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    out: dict[str, Any] = {}
    shapes = call1.get("A", {}).get("shapes", {})
    for name in SHAPES:
        s = shapes.get(name)
        if not s:
            continue
        gpus = sorted(s["gpus"], key=int)
        out[name] = {"speed": s.get("speed"), "vsGpu0": s.get("vsGpu0")}
        lines.append(f"\n**{name}** ({len(s['gpus'][gpus[0]][0]['passes'])} passes)\n")
        head = "| tokens | " + " | ".join(f"GPU{g} µs [95% CI] (spread)" for g in gpus)
        head += " | GPU1/GPU0 [95% CI] |" if len(gpus) > 1 else " |"
        lines += [head, "|" + " --- |" * (len(gpus) + 1 + (len(gpus) > 1))]
        diffs = {r["tokens"]: r for r in s.get("vsGpu0", {}).get(gpus[-1], [])}
        for i, t in enumerate(s["tokens"]):
            cells = []
            for g in gpus:
                r = s["gpus"][g][i]
                cells.append(
                    f"{r['value']:.1f} [{r['lo']:.1f}, {r['hi']:.1f}] ({100 * r['spread']:.1f}%)"
                )
            row = f"| {t} | " + " | ".join(cells)
            if len(gpus) > 1 and t in diffs:
                d = diffs[t]
                star = " **outside noise**" if d["significant"] else ""
                row += f" | {d['ratio']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]{star}"
            lines.append(row + " |")
        if s.get("speed"):
            lines.append(
                "\nSpeed factors (mean GPU = 1): "
                + ", ".join(f"GPU{g} {v:.4f}" for g, v in sorted(s["speed"].items()))
            )
    return lines, out


def layer_label(call1: dict[str, Any]) -> str:
    """'36 local deepseek-v2-lite experts' (call1.json from before expertShape: V2-Lite)."""
    c = call1.get("C", {})
    return f"{c.get('slots', 36)} local {c.get('expertShape', 'deepseek-v2-lite')} experts"


def cotenant_table(call1: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    out: dict[str, Any] = {}
    cot = call1.get("C", {}).get("cotenant", {})
    plan = call1.get("C", {}).get("plan", [])
    if cot and plan:
        pick = [t for t in plan if t in (2048, 8192, 16384, 24576, 32768, 49152)] or plan[::3]
        lines += [
            f"\n**MoE-stack layer work on the slowed GPU** (grouped GEMM of {layer_label(call1)}; "
            "slowdown = time with co-tenant / without, paired passes)\n",
            "| co-tenant | " + " | ".join(f"{t} tok" for t in pick) + " |",
            "|" + " --- |" * (len(pick) + 1),
        ]
        for name, v in cot.items():
            rows = {r["tokens"]: r for r in v.get("rows", [])}
            cells = []
            for t in pick:
                r = rows.get(t)
                s = r["slowdown"] if r else None
                cells.append(
                    "n/a"
                    if s is None
                    else (
                        f"{s['ratio']:.2f} "
                        f"[{s.get('lo', math.nan):.2f}, {s.get('hi', math.nan):.2f}]"
                        if isinstance(s, dict)
                        else f"{s:.2f}"
                    )
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            out[name] = {
                str(t): (rows[t]["slowdown"] if t in rows else None) for t in plan if t in rows
            }
    b = call1.get("B", {}).get("shapes", {})
    for shape, res in b.items():
        toks = [t for t in (16, 128, 512, 2048, 4096) if str(t) in res.get("baseline", {})]
        lines += [
            f"\n**One {shape} expert FFN on the slowed GPU** (slowdown vs its own baseline)\n",
            "| co-tenant | " + " | ".join(f"{t} tok" for t in toks) + " |",
            "|" + " --- |" * (len(toks) + 1),
        ]
        for name, v in res.items():
            if not isinstance(v, dict) or "slowdown" not in v:
                continue
            lines.append(
                f"| {name} | " + " | ".join(f"{v['slowdown'][str(t)]:.2f}" for t in toks) + " |"
            )
    return lines, out


# --------------------------------------------------------------------------- call 2


def stack_summary(plan: dict[str, Any], stack: dict[str, Any]) -> dict[str, Any]:
    """Per scenario and strategy: predicted vs measured compute straggler, layer and step."""
    preds = {s["name"]: s for s in plan.get("scenarios", [])}
    out: dict[str, Any] = {}
    for scen in stack.get("scenarios", []):
        name = scen["name"]
        pred = preds.get(name, {}).get("predicted", {})
        res: dict[str, Any] = {}
        for strat, m in scen.get("strategies", {}).items():
            comp = np.asarray(m["computeMaxMicros"], dtype=float)  # [run, layer]
            layer = np.asarray(m["layerMicros"], dtype=float)
            batch = np.asarray(m["batch"], dtype=int)
            steps = np.asarray(m["stepMicros"], dtype=float)
            if comp.size == 0:
                continue
            nb = int(batch.max()) + 1
            comp_b = np.stack([np.median(comp[batch == b], axis=0) for b in range(nb)])
            layer_b = np.stack([np.median(layer[batch == b], axis=0) for b in range(nb)])
            step_b = np.array([np.median(steps[batch == b]) for b in range(nb)])
            phases = np.asarray(m["phasesPerRank"], dtype=float)  # [rank, run, layer, 4]
            entry: dict[str, Any] = {
                "measuredComputeStep": float(comp_b.sum(1).mean()),
                "measuredLayerSum": float(layer_b.sum(1).mean()),
                "measuredStep": float(step_b.mean()),
                "stepSpread": float(
                    np.mean(
                        [
                            (steps[batch == b].max() - steps[batch == b].min())
                            / np.median(steps[batch == b])
                            for b in range(nb)
                        ]
                    )
                ),
                "commShare": float(1 - comp_b.sum() / max(layer_b.sum(), 1e-9)),
                "perRankCompute": [float(v) for v in phases[..., 1].sum(-1).mean(-1)],
            }
            p = pred.get(strat)
            if p:
                pl = np.asarray(p["layerMicros"], dtype=float)[:nb]
                entry["predictedComputeStep"] = float(pl.sum(1).mean())
                entry["errStep"] = entry["measuredComputeStep"] / entry["predictedComputeStep"] - 1
                rel = np.abs(comp_b - pl) / pl
                entry["errLayerMedian"] = float(np.median(rel))
                entry["errLayerP90"] = float(np.percentile(rel, 90))
                entry["predLayers"] = pl.mean(0).tolist()
                entry["measLayers"] = comp_b.mean(0).tolist()
                loads = np.asarray(m["loads"], dtype=float)  # [rank, batch, layer]
                ploads = np.asarray(p["gpuLoad"], dtype=float)[:nb]  # [batch, layer, gpu]
                entry["loadMaxAbsDiff"] = float(np.abs(loads.transpose(1, 2, 0) - ploads).max())
            res[strat] = entry
        if "eplb" in res:
            for key in ("measuredStep", "measuredComputeStep", "measuredLayerSum"):
                base = res["eplb"][key]
                for v in res.values():
                    v[key + "VsEplb"] = v[key] / base - 1
        cots = [r["cotenant"] for r in scen.get("perRank") or [] if r.get("cotenant")]
        if not cots and scen.get("cotenant"):
            cots = [scen["cotenant"]]
        out[name] = {
            "strategies": res,
            "check": scen.get("checkRelErr"),
            "cotenant": scen.get("cotenant") or (cots[0] if cots else None),
            "cotenantRanks": sorted({int(c["rank"]) for c in cots}),
            "perRank": scen.get("perRank"),
        }
    return out


def ranks_label(ranks: list[Any]) -> str:
    """[1] -> 'rank 1', [1, 3] -> 'ranks 1, 3'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def stack_table(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, sc in summary.items():
        lines += [
            f"\n**Scenario `{name}`**"
            + (
                f" (co-tenant {sc['cotenant']['name']} on {ranks_label(sc['cotenantRanks'])})"
                if sc.get("cotenant")
                else " (no co-tenant)"
            )
            + "\n",
            "| strategy | predicted compute µs/step | measured compute µs/step | error | "
            "layer error median / p90 | measured layers µs/step | step µs (events) | "
            "step vs eplb | compute vs eplb | comm share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for strat, e in sc["strategies"].items():
            lines.append(
                f"| {strat} | {fmt(e.get('predictedComputeStep'), 0)} | "
                f"{e['measuredComputeStep']:.0f} | {fmt(100 * e.get('errStep', float('nan')))}% | "
                f"{fmt(100 * e.get('errLayerMedian', float('nan')))}% / "
                f"{fmt(100 * e.get('errLayerP90', float('nan')))}% | "
                f"{e['measuredLayerSum']:.0f} | {e['measuredStep']:.0f} | "
                f"{fmt(100 * e.get('measuredStepVsEplb', float('nan')))}% | "
                f"{fmt(100 * e.get('measuredComputeStepVsEplb', float('nan')))}% | "
                f"{100 * e['commShare']:.0f}% |"
            )
    return lines


# --------------------------------------------------------------------------- figures


def figures(
    call1: dict[str, Any], plan: dict[str, Any] | None, summary: dict[str, Any], out: Path
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    shapes = call1.get("A", {}).get("shapes", {})
    base = call1.get("C", {}).get("base", {})
    cot = call1.get("C", {}).get("cotenant", {})
    n = len([s for s in SHAPES if s in shapes]) + (1 if base else 0)
    if n:
        fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
        i = 0
        for name in SHAPES:
            if name not in shapes:
                continue
            ax = axes[0, i]
            i += 1
            s = shapes[name]
            for g, rows in sorted(s["gpus"].items()):
                t = [r["tokens"] for r in rows]
                ax.plot(t, [r["value"] for r in rows], marker="o", ms=3, label=f"GPU{g}")
                ax.fill_between(t, [r["lo"] for r in rows], [r["hi"] for r in rows], alpha=0.25)
            ax.set(
                xscale="log", yscale="log", title=f"{name} expert FFN", xlabel="tokens", ylabel="µs"
            )
            ax.legend()
        if base:
            ax = axes[0, i]
            for g, rows in sorted(base["gpus"].items()):
                ax.plot(
                    [r["tokens"] for r in rows],
                    [r["value"] for r in rows],
                    marker="o",
                    ms=3,
                    label=f"GPU{g}",
                )
            for cname, v in cot.items():
                if v.get("rows"):
                    ax.plot(
                        [r["tokens"] for r in v["rows"]],
                        [r["value"] for r in v["rows"]],
                        ls="--",
                        lw=1,
                        label=f"GPU{call1.get('args', {}).get('slow_gpu', '1')} + {cname}",
                    )
            ax.set(
                title=f"MoE-stack layer work ({layer_label(call1)}, grouped)",
                xlabel="tokens on the GPU",
                ylabel="µs",
            )
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
        plt.close(fig)
        made.append("curves.png")
    if summary:
        scen = list(summary)
        fig, axes = plt.subplots(1, 2 * len(scen), figsize=(6 * len(scen) * 2, 4), squeeze=False)
        for j, name in enumerate(scen):
            st = summary[name]["strategies"]
            names = list(st)
            x = np.arange(len(names))
            ax = axes[0, 2 * j]
            ax.bar(
                x - 0.27,
                [st[s].get("predictedComputeStep", 0) for s in names],
                0.27,
                label="predicted compute",
            )
            ax.bar(x, [st[s]["measuredComputeStep"] for s in names], 0.27, label="measured compute")
            ax.bar(
                x + 0.27, [st[s]["measuredStep"] for s in names], 0.27, label="measured step (all)"
            )
            ax.set_xticks(x, names)
            ax.set(title=f"{name}: µs per step (26 layers)", ylabel="µs")
            ax.legend(fontsize=7)
            ax = axes[0, 2 * j + 1]
            for s in names:
                if "predLayers" in st[s]:
                    ax.scatter(st[s]["predLayers"], st[s]["measLayers"], s=10, label=s)
            lim = ax.get_xlim()
            ax.plot(lim, lim, color="gray", lw=0.8)
            ax.set(
                title=f"{name}: per-layer compute straggler",
                xlabel="predicted µs",
                ylabel="measured µs",
            )
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "measured_vs_predicted.png", dpi=120)
        plt.close(fig)
        made.append("measured_vs_predicted.png")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--call1", type=Path, default=REPO / "docs" / "gpu" / "call1")
    ap.add_argument("--call2", type=Path, default=REPO / "docs" / "gpu" / "call2")
    ap.add_argument("--plan", type=Path, default=HERE / "placements" / "plan.json")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "gpu")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "gpu-results.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    call1 = load(args.call1 / "call1.json") or {}
    plan = load(args.plan) or load(args.call2 / "plan.json") or {}
    stack = load(args.call2 / "moe_stack.json") or {}
    recheck = load(args.call2 / "recheck" / "call1.json")
    lines = [BEGIN, "", "### GPUs", ""]
    lines.append(
        "Machine: "
        + ", ".join(f"GPU{g['index']} {g['name']} ({g['sms']} SMs)" for g in call1.get("gpus", []))
        + f"; torch {call1.get('torch', '?')}; call 1 {call1.get('startedAt', '?')} .. "
        + f"{call1.get('finishedAt', '?')}"
    )
    t1, gsum = gpu_table(call1)
    t2, csum = cotenant_table(call1)
    lines += [*t1, "", "### Controlled slowdown", *t2]
    if recheck:
        _, rsum = cotenant_table(recheck)
        lines.append(f"\nRe-measured after the MoE stack (call 2): {json.dumps(rsum)[:600]}")
    ssum = stack_summary(plan, stack) if stack else {}
    lines += ["", "### MoE layer stack (measured vs predicted)"]
    if plan:
        lines.append(
            f"\nBatches of {plan.get('batchTokens')} tokens ({plan.get('numBatches')} held-out "
            f"batches, prompts > {plan.get('calibLastPrompt')}), {plan.get('redundant')} redundant "
            f"slots; co-tenant for `slowed`: {plan.get('cotenant', {}).get('name')} on "
            f"{ranks_label(plan.get('slowRanks') or [plan.get('slowRank')])} "
            "(layer slowdown near the load "
            f"{fmt(plan.get('cotenantSlowdownNearLoad', float('nan')), 3)}). Implementation: "
            f"{stack.get('impl', '?')}; world {stack.get('world', '?')}; experts "
            f"{(stack.get('expertShape') or plan.get('expertShape') or {}).get('name', SHAPES[0])}"
            + (
                " (ONE set of slot weights for every layer and placement)"
                if stack.get("sharedWeights")
                else ""
            )
            + "."
        )
    lines += stack_table(ssum)
    for name, sc in ssum.items():
        if sc.get("check"):
            lines.append(
                f"\nLayer-0 correctness check `{name}` "
                f"(rel. error vs float32 reference): {sc['check']}"
            )
    made = figures(call1, plan, ssum, args.out)
    figures_dir = os.path.relpath(args.out.resolve(), args.doc.resolve().parent)
    lines += ["", *[f"![{m}]({figures_dir}/{m})" for m in made], "", END]
    (args.out / "summary.json").write_text(
        json.dumps({"gpus": gsum, "cotenant": csum, "stack": ssum}, indent=1)
    )
    block = "\n".join(lines)
    doc = args.doc.read_text() if args.doc.is_file() else f"# GPU results\n\n{BEGIN}\n{END}\n"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc += "\n" + block + "\n"
    args.doc.write_text(doc)
    print(block)


if __name__ == "__main__":
    main()
