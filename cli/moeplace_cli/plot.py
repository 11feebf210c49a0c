"""The ``compare`` figure: per strategy a layer x GPU heatmap of GPU time (relative to the
layer's fluid bound), and bars of each strategy's straggler time against the fluid bound."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from placement.evaluate import Evaluation
from placement.model import FloatArray

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def relative_time(evaluation: Evaluation) -> FloatArray:
    """[L, G] GPU time over the layer's fluid bound, averaged over batches."""
    fluid = np.maximum(evaluation.layer_fluid, 1e-12)[..., None]
    return np.asarray((evaluation.gpu_time / fluid).mean(0), dtype=np.float64)


def compare_png(
    names: Sequence[str], evaluations: Sequence[Evaluation], path: Path, title: str
) -> None:
    """Write the comparison figure for ``evaluations`` (one per strategy in ``names``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = [relative_time(e) for e in evaluations]
    vmin = min(float(m.min()) for m in maps)
    vmax = max(float(m.max()) for m in maps)
    cols = min(3, len(maps))
    rows = math.ceil(len(maps) / cols) + 1
    fig = plt.figure(figsize=(4.2 * cols, 3.2 * rows), constrained_layout=True)
    grid = fig.add_gridspec(rows, cols)
    image = None
    for i, (name, rel, ev) in enumerate(zip(names, maps, evaluations, strict=True)):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        image = ax.imshow(rel, aspect="auto", cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_title(f"{name}: {ev.ratio:.3f}x fluid", fontsize=10)
        ax.set_xlabel("GPU")
        ax.set_ylabel("MoE layer")
    if image is not None:
        fig.colorbar(image, ax=fig.axes, label="GPU time / layer fluid bound", shrink=0.8)
    bars = fig.add_subplot(grid[rows - 1, :])
    _straggler_bars(bars, names, evaluations)
    fig.suptitle(textwrap.fill(title, 40 * cols), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _straggler_bars(ax: Axes, names: Sequence[str], evaluations: Sequence[Evaluation]) -> None:
    stragglers = [e.straggler for e in evaluations]
    drawn = ax.bar(list(names), stragglers, color="tab:blue")
    ax.bar_label(drawn, labels=[f"{e.ratio:.3f}x" for e in evaluations], fontsize=9)
    fluid = evaluations[0].fluid_bound
    ax.axhline(fluid, color="tab:red", linestyle="--", label="fluid bound")
    ax.set_ylabel("straggler time (sum over layers)")
    ax.set_ylim(0, max(stragglers) * 1.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
