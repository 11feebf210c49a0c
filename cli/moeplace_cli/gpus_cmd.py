"""``moeplace gpus``: show a GPUs file, or build one from the shared measurement sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moeplace_cli.errors import bad_input, reports_errors
from placement.gpus import h200_profile, load_cluster, pal_cluster, write_gpus_csv
from placement.model import Cluster

gpus_app = typer.Typer(
    help="Show a GPUs file, or build one from the PAL or H200 measurements.",
    no_args_is_help=True,
)
console = Console()

OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the GPUs file.")]
NumGpusOpt = Annotated[
    int | None, typer.Option("--num-gpus", min=1, help="Use the first N GPUs (PAL) or N GPUs.")
]


def gpus_table(cluster: Cluster) -> Table:
    """One row per GPU: node, speed factor (derived from the curve where there is one)."""
    table = Table()
    for label in ("gpu", "node", "speed", "curve"):
        table.add_column(label, justify="left" if label == "node" else "right")
    for i, (gpu, speed) in enumerate(zip(cluster.gpus, cluster.speeds, strict=True)):
        curve = gpu.curve
        points = "-" if curve is None else f"{len(curve.tokens)} points"
        table.add_row(str(i), gpu.node, f"{speed:.4f}", points)
    return table


@gpus_app.command("show")
@reports_errors
def show(path: Annotated[Path, typer.Argument(help="GPUS.csv or GPU-profile JSON.")]) -> None:
    """Print the GPUs a file describes."""
    with bad_input("gpus"):
        cluster = load_cluster(path)
    nodes = len(cluster.nodes)
    where = f"{nodes} node" if nodes == 1 else f"{nodes} nodes"
    console.print(f"{path}: {cluster.size} GPUs on {where}", highlight=False)
    console.print(gpus_table(cluster))


@gpus_app.command("pal")
@reports_errors
def pal(
    source: Annotated[Path, typer.Argument(help="PAL 32gpu-variability.csv.")],
    out: OutOpt,
    perf_class: Annotated[str, typer.Option("--class", help="PAL class A, B, C or D.")] = "A",
    num_gpus: NumGpusOpt = None,
) -> None:
    """GPUS.csv from PAL's measured variability: speed = 1 / PerfVar_class<X>."""
    with bad_input("pal"):
        cluster = pal_cluster(source, perf_class, num_gpus)
        write_gpus_csv(cluster, out)
    console.print(f"wrote {out}: {cluster.size} GPUs on {len(cluster.nodes)} nodes")


@gpus_app.command("h200")
@reports_errors
def h200(
    source: Annotated[Path, typer.Argument(help="expert_ffn_latency_graphs.json.")],
    out: OutOpt,
    shape: Annotated[
        str, typer.Option("--shape", help="deepseek-v2-lite, mixtral-8x7b or deepseek-v3.")
    ] = "mixtral-8x7b",
    num_gpus: NumGpusOpt = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", min=1)] = 8,
) -> None:
    """GPU profile with the measured H200 latency curves (repeated in turn past 2 GPUs)."""
    with bad_input("h200"):
        profile = h200_profile(source, shape, num_gpus, gpus_per_node)
        out.write_text(profile.to_json() + "\n")
    console.print(f"wrote {out}: {len(profile.gpus)} GPUs with {shape} latency curves")
