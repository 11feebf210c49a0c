"""PNG plots for the tables: latency CDFs of the policies, per-GPU expert time over time, and
the gain over EPLB against the cluster size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moeplace_sim.sim import Run

BIN_S = 1.0  # heatmap time bins


def latency_cdfs(runs: dict[str, Run], out: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        if not name.startswith("policies/"):
            continue
        lat = run.latencies
        for ax, values in zip(axes, (lat.ttft_s, lat.e2e_s), strict=True):
            kept = np.sort(values[np.isfinite(values)])
            ax.plot(kept, np.arange(1, kept.size + 1) / values.size, label=name.split("/", 1)[1])
    for ax, label in zip(axes, ("TTFT s", "end-to-end s"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Policies over time, 32 GPUs, co-tenant at 40 s")
    fig.tight_layout()
    name = "latency_cdfs.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def binned_gpu_time(run: Run) -> np.ndarray:
    """[G, bins] share of each second the GPU spent on expert compute."""
    steps = run.engine.steps
    end = np.asarray(steps.end_s)
    gpu = np.stack(steps.gpu_us)  # [steps, G]
    bins = (end // BIN_S).astype(int)
    out = np.zeros((gpu.shape[1], int(bins.max()) + 1))
    np.add.at(out.T, bins, gpu)
    return out * 1e-6 / BIN_S


def gpu_heatmaps(runs: dict[str, Run], out: Path) -> str:
    chosen = {
        k: v for k, v in runs.items() if k in ("policies/static EPLB", "policies/operator (greedy)")
    }
    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 3.2 * len(chosen)), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], chosen.items(), strict=True):
        image = ax.imshow(binned_gpu_time(run), aspect="auto", origin="lower", cmap="viridis")
        ax.set_title(f"{name.split('/', 1)[1]}: expert compute share of each second, per GPU")
        ax.set_xlabel("time s")
        ax.set_ylabel("GPU")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    name = "gpu_heatmap.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def gain_vs_size(results: dict[str, Any], out: Path) -> str:
    sizes = sorted(int(k.split("/")[1]) for k in results if k.startswith("vibe/"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in ("greedy", "cpsat"):
        ttft, slo = [], []
        for g in sizes:  # the mean over the arrival draws (vibe/G, vibe-seedN/G)
            draws = [v for k, v in results.items() if k.startswith("vibe") and k.endswith(f"/{g}")]
            ttft.append(
                float(
                    np.mean(
                        [
                            100 * (d[strategy]["ttft_s"]["p90"] / d["eplb"]["ttft_s"]["p90"] - 1)
                            for d in draws
                        ]
                    )
                )
            )
            slo.append(
                float(
                    np.mean(
                        [
                            100 * (d[strategy]["slo_attainment"] - d["eplb"]["slo_attainment"])
                            for d in draws
                        ]
                    )
                )
            )
        axes[0].plot(sizes, ttft, marker="o", label=strategy)
        axes[1].plot(sizes, slo, marker="o", label=strategy)
    axes[0].set_ylabel("P90 TTFT vs EPLB, %")
    axes[1].set_ylabel("SLO attainment vs EPLB, points")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    name = "gain_vs_size.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_all(runs: dict[str, Run], results: dict[str, Any], out: Path) -> list[str]:
    return [latency_cdfs(runs, out), gpu_heatmaps(runs, out), gain_vs_size(results, out)]
