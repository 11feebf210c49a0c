"""Time of one serving step: per MoE layer, each GPU's expert time for the tokens the placement
and the dispatch rule send it (the placement library's GPU performance model), the all-to-all
from the token traffic and the link bandwidths, the dense part; the layer waits for its slowest
GPU. Times in µs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moeplace_sim.config import Links
from placement.dispatch import TimeModel
from placement.evaluate import Dispatch, split_loads, traffic_changes
from placement.model import GPU, Cluster, FloatArray, LatencyCurve, Placement

GpuTimes = Callable[[FloatArray], FloatArray]  # [..., G] tokens per GPU -> [..., G] µs
BYTES_PER_VALUE = 2  # bf16 activations


class ScaledCurve:
    """GPU g's time for x tokens = the shared layer curve at ``flops x`` tokens / speed_g:
    ``flops`` is a bigger expert's FLOPs per token over the measured one's (same FLOPs, same
    GEMM time, so its flat launch-bound part ends sooner). One interpolation for all GPUs (the
    simulator's hot path); ``speeds`` may change between steps (a co-tenant arrives)."""

    def __init__(self, curve: LatencyCurve, speeds: FloatArray, flops: float = 1.0) -> None:
        self.curve = curve
        self.speeds = np.asarray(speeds, dtype=np.float64)
        self.flops = flops

    def __call__(self, loads: FloatArray) -> FloatArray:
        scaled = np.asarray(loads, dtype=np.float64) * self.flops
        return np.asarray(self.curve.time(scaled) / self.speeds, dtype=np.float64)

    def cluster(self, gpus_per_node: int, sees: Literal["speeds", "curves"] = "speeds") -> Cluster:
        """The GPUs as the solvers see them. ``speeds``: speed factors, what a profiler
        publishes as ``speed`` (the curve's shape, flat below ~1k tokens, stays the
        simulator's truth only). ``curves``: each GPU's own curve, this one sampled at the
        whole token counts nearest its points (a profiler measures whole batches)."""
        if sees == "speeds":
            return Cluster.uniform(self.speeds.size, gpus_per_node, self.speeds.tolist())
        points = np.asarray(self.curve.tokens, dtype=np.float64) / self.flops
        tokens = np.unique(np.maximum(np.rint(points), 1).astype(np.int64))
        base = self.curve.time(tokens * self.flops)
        return Cluster(
            gpus=[
                GPU(
                    node=f"node-{g // gpus_per_node}",
                    curve=LatencyCurve(tokens=tokens.tolist(), micros=(base / speed).tolist()),
                )
                for g, speed in enumerate(self.speeds)
            ]
        )


def model_times(cluster: Cluster) -> GpuTimes:
    """Per-GPU curves of a profiled cluster (the 4x H200 check), through ``TimeModel``."""
    return TimeModel(cluster).time


def dispatch_shares(
    placement: Placement, cluster: Cluster, dispatch: Dispatch, calibration: FloatArray
) -> FloatArray:
    """[L, E, G] share of expert e's tokens that GPU g serves. Even: copies on g / copies.
    Speed-aware: the per-copy split the dispatcher finds on the calibration load (kept until
    the next placement; an expert idle in calibration is split evenly)."""
    table = placement.table
    L, P = table.shape
    E, G = placement.model.experts, placement.num_gpus
    gpu = np.arange(P) // placement.slots_per_gpu
    copies = np.zeros((L, E, G))
    for layer in range(L):
        np.add.at(copies[layer], (table[layer], gpu), 1.0)
    even: FloatArray = copies / copies.sum(-1, keepdims=True)
    if dispatch == "even":
        return even
    slot_load, _ = split_loads(table, cluster, calibration[None], dispatch)
    served = np.zeros((L, E, G))
    for layer in range(L):
        np.add.at(served[layer], (table[layer], gpu), slot_load[0, layer])
    total = served.sum(-1, keepdims=True)
    return np.where(total > 0, served / np.where(total > 0, total, 1.0), even)


@dataclass(frozen=True)
class StepCost:
    total_us: float
    expert_max_us: FloatArray  # [L] slowest GPU's expert time per layer
    expert_mean_us: FloatArray  # [L]
    a2a_us: FloatArray  # [L]
    dense_us: float  # all layers' dense part
    gpu_us: FloatArray  # [G] expert time per GPU, summed over layers

    @property
    def straggler_us(self) -> float:
        """Time the layers wait for their slowest GPU beyond the mean GPU."""
        return float((self.expert_max_us - self.expert_mean_us).sum())


class CostModel:
    def __init__(
        self,
        *,
        gpu_times: GpuTimes,
        num_gpus: int,
        gpus_per_node: int,
        links: Links,
        dense_layers: int,
        dense_fixed_us: float,
        dense_us_per_token: float,
        transitions: FloatArray | None = None,
    ) -> None:
        self.gpu_times = gpu_times
        self.num_gpus = num_gpus
        self.links = links
        self.dense_layers = dense_layers
        self.dense_fixed_us = dense_fixed_us
        self.dense_us_per_token = dense_us_per_token
        self.transitions = transitions
        G = num_gpus
        # where a remote token comes from: the same node or another one (uniform senders)
        self.intra_share = (gpus_per_node - 1) / (G - 1) if G > 1 else 0.0
        self.inter_share = (G - gpus_per_node) / (G - 1) if G > 1 else 0.0
        self.shares = np.zeros(0)
        self.moving_share = np.zeros(0)

    def use(self, placement: Placement, shares: FloatArray) -> None:
        """Serve with ``placement`` and its [L, E, G] dispatch shares from now on."""
        self.shares = shares
        remote = 1.0 - 1.0 / self.num_gpus
        if self.links.pattern == "home" or self.transitions is None:
            self.moving_share = np.full(placement.table.shape[0], remote)
            return
        per_layer = self.transitions.sum(axis=(1, 2))
        changed = traffic_changes(placement.table, self.transitions, self.num_gpus)
        self.moving_share = np.concatenate([[remote], changed / np.maximum(per_layer, 1.0)])

    def transfer_us(self, tokens: FloatArray) -> FloatArray:
        """[..., G] token copies received -> [..., G] µs over NVLink and the network, which
        run in parallel (a GPU's share from its node, the rest from other nodes)."""
        volume = tokens * self.links.hidden * BYTES_PER_VALUE / 1e3  # bytes / 1e3 -> µs at GB/s
        nvlink = volume * self.intra_share / self.links.nvlink_gbs
        network = volume * self.inter_share / self.links.network_gbs
        return np.asarray(np.maximum(nvlink, network), dtype=np.float64)

    def a2a_us(self, gpu_load: FloatArray) -> FloatArray:
        """[L, G] tokens per GPU -> [L] all-to-all µs per layer. Home: dispatch and combine
        every layer. Layer-to-layer: tokens move only when their GPU changes (plus the first
        dispatch and the last combine)."""
        received = gpu_load * self.moving_share[:, None]
        per_layer = self.links.latency_us + self.transfer_us(received).max(-1)
        if self.links.pattern == "home":
            return np.asarray(2.0 * per_layer, dtype=np.float64)
        last = self.links.latency_us + self.transfer_us(gpu_load[-1] * self.moving_share[0]).max()
        per_layer[-1] += last
        return np.asarray(per_layer, dtype=np.float64)

    def step(self, load: FloatArray, tokens: int) -> StepCost:
        """``load`` [L, E] token-expert assignments of a step of ``tokens`` tokens."""
        gpu_load = np.einsum("le,leg->lg", load, self.shares)
        gpu_us = self.gpu_times(gpu_load)
        expert_max = gpu_us.max(-1)
        a2a = self.a2a_us(gpu_load)
        layers = load.shape[0] + self.dense_layers
        dense = layers * (self.dense_fixed_us + self.dense_us_per_token * tokens / self.num_gpus)
        return StepCost(
            total_us=float(expert_max.sum() + a2a.sum() + dense),
            expert_max_us=expert_max,
            expert_mean_us=gpu_us.mean(-1),
            a2a_us=a2a,
            dense_us=dense,
            gpu_us=gpu_us.sum(0),
        )
