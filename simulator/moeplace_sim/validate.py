"""The cost model against the real 4x H200 MoE stack (``docs/gpu-x4-results.md``): the same
placements, GPU curves and held-out batches, our predicted per-layer expert compute and whole
layer (compute + all-to-all) next to what was measured. Layer 0 of every step is left out: it
carries the co-tenant's and NCCL's start-up (6.1 ms instead of 1.2 ms with the co-tenant)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplace_sim.config import Links
from moeplace_sim.costmodel import CostModel, dispatch_shares, model_times
from moeplace_sim.data import RoutingTrace
from placement.formats import parse_canonical
from placement.model import Cluster, FloatArray

GPU_X4 = Path("docs/gpu-x4")


@dataclass(frozen=True)
class LayerCheck:
    scenario: str
    strategy: str
    predicted_compute_us: float  # per step, layers 1..L-1, mean over batches
    measured_compute_us: float
    predicted_layer_us: float
    measured_layer_us: float
    load_error: float  # max relative difference of predicted vs measured tokens per rank

    @property
    def compute_error(self) -> float:
        return self.predicted_compute_us / self.measured_compute_us - 1.0

    @property
    def layer_error(self) -> float:
        return self.predicted_layer_us / self.measured_layer_us - 1.0


def held_out_batches(trace: RoutingTrace, plan: dict[str, Any]) -> FloatArray:
    """[B, L, E] loads of the batches the stack replayed (consecutive tokens after the
    calibration prompts)."""
    size = int(plan["batchTokens"])
    start = trace.first_token_after(int(plan["calibLastPrompt"]))
    return np.stack([trace.counts(start + b * size, size) for b in range(plan["numBatches"])])


def cluster_of(curves: dict[str, Any]) -> Cluster:
    return Cluster.model_validate(
        {"gpus": [{"node": "gpu-machine", "curve": curves[g]} for g in sorted(curves, key=int)]}
    )


def per_batch(values: list[list[float]], batch: list[int], batches: int) -> FloatArray:
    """[runs, L] measurements -> [B, L] mean over the repeats of each batch."""
    arr, index = np.asarray(values), np.asarray(batch)
    return np.stack([arr[index == b].mean(axis=0) for b in range(batches)])


def gpu_x4_checks(
    trace: RoutingTrace, docs: Path = GPU_X4, links: Links | None = None
) -> list[LayerCheck]:
    plan = json.loads((docs / "placements" / "plan.json").read_text())
    stack = json.loads((docs / "call2" / "moe_stack.json").read_text())
    loads = held_out_batches(trace, plan)
    batches = loads.shape[0]
    measured = {s["name"]: s["strategies"] for s in stack["scenarios"]}
    out = []
    for scenario in plan["scenarios"]:
        cluster = cluster_of(scenario["curves"])
        cost = CostModel(
            gpu_times=model_times(cluster),
            num_gpus=cluster.size,
            gpus_per_node=cluster.size,
            links=links or Links(),
            dense_layers=0,
            dense_fixed_us=0.0,
            dense_us_per_token=0.0,
        )
        for strategy, runs in measured[scenario["name"]].items():
            path = docs / "placements" / scenario["name"] / f"{strategy}.json"
            placement = parse_canonical(path.read_text(), allow_duplicates=True)
            cost.use(placement, dispatch_shares(placement, cluster, "even", loads[0]))
            steps = [cost.step(load, int(plan["batchTokens"])) for load in loads]
            gpu_load = np.stack([np.einsum("le,leg->lg", b, cost.shares) for b in loads])
            ranks = np.asarray(runs["loads"], dtype=np.float64)  # [G, B, L]
            compute = per_batch(runs["computeMaxMicros"], runs["batch"], batches)[:, 1:]
            layer = per_batch(runs["layerMicros"], runs["batch"], batches)[:, 1:]
            out.append(
                LayerCheck(
                    scenario=scenario["name"],
                    strategy=strategy,
                    predicted_compute_us=float(np.mean([s.expert_max_us[1:].sum() for s in steps])),
                    measured_compute_us=float(compute.sum(-1).mean()),
                    predicted_layer_us=float(
                        np.mean([(s.expert_max_us + s.a2a_us)[1:].sum() for s in steps])
                    ),
                    measured_layer_us=float(layer.sum(-1).mean()),
                    load_error=float(np.abs(gpu_load / ranks.transpose(1, 2, 0) - 1.0).max()),
                )
            )
    return out
