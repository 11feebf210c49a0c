"""Evaluator, independent of the solvers: how long does a placement take on a given load?

Shapes: K batches (or load samples), L layers, E experts, G GPUs, P slots. ``load`` is [L, E]
(one batch) or [K, L, E]. Times are in the cluster's unit (µs with latency curves, token-times
= tokens / speed with speed factors). A GPU's time in a layer is a function of its total tokens
in that layer (:class:`placement.dispatch.TimeModel`); the layer takes as long as its slowest GPU.

Lower bounds per layer and batch (valid for *every* placement and dispatch):

- fluid bound: the least ``T`` at which all GPUs together can finish the layer's work,
  ``sum(load) / sum(speed)`` with speed factors; with curves the least ``T`` with
  ``sum_g cap_g(T) >= sum(load)``, where ``cap_g`` inverts the curve's monotone hull (found
  by bisection, see :mod:`placement.dispatch`);
- replica bound (for given replica counts ``c``): some copy of expert e carries at least
  ``load_e / c_e`` tokens, so some GPU needs at least the fastest GPU's hull time for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from placement.dispatch import TimeModel, best_split, even_split
from placement.model import Cluster, FloatArray, IntArray, Placement

# how an expert's tokens are split over its copies: "even" (vLLM, SGLang: an equal share per
# copy) or "speed-aware" (the best split of each batch for the GPUs' times, what moeplace's
# serving dispatcher does); the same names as the MoEDeployment's spec.placement.dispatch
Dispatch = Literal["even", "speed-aware"]
DISPATCH_RULES: tuple[Dispatch, ...] = ("even", "speed-aware")


@dataclass(frozen=True)
class Evaluation:
    """A placement scored on a load. Arrays carry a leading K (1 for an [L, E] load).

    ``straggler``, ``fluid_bound`` and ``replica_bound`` are sums over layers, averaged over
    the K batches; ``ratio = straggler / fluid_bound``.
    """

    dispatch: str
    slot_load: FloatArray  # [K, L, P] tokens per slot
    gpu_load: FloatArray  # [K, L, G] tokens per GPU
    gpu_time: FloatArray  # [K, L, G]
    layer_time: FloatArray  # [K, L] slowest GPU's time
    layer_fluid: FloatArray  # [K, L] fluid bound per layer
    layer_replica: FloatArray  # [K, L] replica bound per layer
    straggler: float
    fluid_bound: float
    replica_bound: float
    balancedness: float  # mean over K, L of mean / max GPU tokens
    traffic_share: float  # share of token transitions that change GPU; nan without transitions
    moved: int  # copies moved against ``previous`` (0 without one)

    @property
    def ratio(self) -> float:
        return self.straggler / self.fluid_bound if self.fluid_bound > 0 else 1.0

    @property
    def bound(self) -> float:
        """Best lower bound for this placement: sum over layers of max(fluid, replica)."""
        return float(np.maximum(self.layer_fluid, self.layer_replica).sum(-1).mean())


def _batched(load: FloatArray) -> FloatArray:
    arr = np.asarray(load, dtype=np.float64)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise ValueError(f"load must be [L, E] or [K, L, E], got shape {arr.shape}")
    return arr


def fluid_bound(cluster: Cluster, load: FloatArray) -> FloatArray:
    """[..., L, E] load -> [..., L] fluid lower bound per layer (time units)."""
    arr = np.asarray(load, dtype=np.float64)
    return TimeModel(cluster).level(arr.sum(-1) * (1.0 - 1e-12))


def replica_bound(cluster: Cluster, load: FloatArray, replica_counts: IntArray) -> FloatArray:
    """[..., L, E] load and [L, E] copies per expert -> [..., L] replica lower bound: the
    heaviest per-copy work on the fastest GPU (by monotone-hull time)."""
    arr = np.asarray(load, dtype=np.float64)
    counts = np.asarray(replica_counts, dtype=np.float64)
    per_copy = (arr / np.maximum(counts, 1.0)).max(-1)  # [..., L]
    model = TimeModel(cluster)
    hull = model.hull_time(np.broadcast_to(per_copy[..., None], (*per_copy.shape, cluster.size)))
    return np.asarray(hull.min(-1) * (1.0 - 1e-12), dtype=np.float64)


def traffic_changes(table: IntArray, transitions: FloatArray, num_gpus: int) -> FloatArray:
    """[L-1] tokens whose GPU changes between layer l and l+1 for a [L, P] ``table`` and
    ``transitions`` [L-1, E, E], when each token picks one of its expert's copies uniformly
    (even dispatch): ``sum T[l,i,j] * (1 - sum_g p_l(g|i) p_{l+1}(g|j))``."""
    trans = np.asarray(transitions, dtype=np.float64)
    L, P = table.shape
    E = trans.shape[-1]
    gpu = np.arange(P) // (P // num_gpus)
    share = np.zeros((L, E, num_gpus))
    for layer in range(L):
        np.add.at(share[layer], (table[layer], gpu), 1.0)
    share /= np.maximum(share.sum(-1, keepdims=True), 1.0)
    stay = np.einsum("lij,lig,ljg->l", trans, share[:-1], share[1:])
    return np.asarray(trans.sum(axis=(1, 2)) - stay, dtype=np.float64)


def traffic_share(placement: Placement, transitions: FloatArray) -> float:
    """Share of token transitions (layer l -> l+1, ``transitions`` [L-1, E, E]) whose GPU
    changes under even dispatch (:func:`traffic_changes`); nan without transitions."""
    total = float(np.asarray(transitions, dtype=np.float64).sum())
    if total <= 0:
        return float("nan")
    return float(traffic_changes(placement.table, transitions, placement.num_gpus).sum()) / total


def moved_per_layer(table: IntArray, previous: IntArray, num_gpus: int) -> IntArray:
    """[L] copies that must be loaded anew per layer of a [L, P] ``table`` against
    ``previous``: per GPU, the experts held now that the GPU did not hold before (a copy that
    only changes slot on its GPU does not count; two copies on one GPU count twice)."""
    if previous.shape != table.shape:
        raise ValueError("previous placement has a different shape")
    L, P = table.shape
    E = int(max(table.max(), previous.max())) + 1
    gpu = np.arange(P) // (P // num_gpus)
    now = np.zeros((L, num_gpus, E), dtype=np.int64)
    before = np.zeros_like(now)
    for layer in range(L):
        np.add.at(now[layer], (gpu, table[layer]), 1)
        np.add.at(before[layer], (gpu, previous[layer]), 1)
    return np.asarray(np.maximum(now - before, 0).sum(axis=(1, 2)), dtype=np.int64)


def moved_copies(placement: Placement, previous: Placement) -> int:
    """Copies that must be loaded anew, over all layers (:func:`moved_per_layer`)."""
    if previous.num_gpus != placement.num_gpus:
        raise ValueError("previous placement has a different shape")
    return int(moved_per_layer(placement.table, previous.table, placement.num_gpus).sum())


def split_loads(
    table: IntArray, cluster: Cluster, batches: FloatArray, dispatch: Dispatch
) -> tuple[FloatArray, FloatArray]:
    """(slot_load [K, L, P], gpu_load [K, L, G]) of a [L, P] ``table`` on [K, L, E] loads
    under the dispatch rule."""
    G = cluster.size
    if dispatch == "even":
        return even_split(table, batches, G)
    if dispatch != "speed-aware":
        raise ValueError(f"unknown dispatch rule {dispatch!r}")
    model = TimeModel(cluster)
    K, L = batches.shape[:2]
    S = table.shape[1] // G
    slot_load = np.zeros((K, L, table.shape[1]))
    gpu_load = np.zeros((K, L, G))
    for k in range(K):
        for layer in range(L):
            split = best_split(table[layer], batches[k, layer], model, S)
            slot_load[k, layer] = split.slot_load
            gpu_load[k, layer] = split.gpu_load
    return slot_load, gpu_load


def layer_times(
    table: IntArray, cluster: Cluster, load: FloatArray, dispatch: Dispatch = "even"
) -> FloatArray:
    """[K, L] slowest GPU's time per batch and layer of a [L, P] ``table`` on ``load``
    ([L, E] or [K, L, E]) under the dispatch rule: what :func:`evaluate` reports as
    ``layer_time``, without building a :class:`Placement`."""
    _, gpu_load = split_loads(table, cluster, _batched(load), dispatch)
    return np.asarray(TimeModel(cluster).time(gpu_load).max(-1), dtype=np.float64)


def evaluate(
    placement: Placement,
    cluster: Cluster,
    load: FloatArray,
    *,
    dispatch: Dispatch = "even",
    transitions: FloatArray | None = None,
    previous: Placement | None = None,
) -> Evaluation:
    """Score ``placement`` on ``load`` ([L, E] or [K, L, E]) under a dispatch rule."""
    if cluster.size != placement.num_gpus:
        raise ValueError(f"placement is for {placement.num_gpus} GPUs, cluster has {cluster.size}")
    batches = _batched(load)
    table = placement.table
    if batches.shape[1:] != (table.shape[0], placement.model.experts):
        raise ValueError(
            f"load has shape {batches.shape[1:]}, placement is for "
            f"({table.shape[0]}, {placement.model.experts})"
        )
    slot_load, gpu_load = split_loads(table, cluster, batches, dispatch)
    model = TimeModel(cluster)
    gpu_time = model.time(gpu_load)
    layer_time = gpu_time.max(-1)
    layer_fluid = fluid_bound(cluster, batches)
    layer_replica = replica_bound(cluster, batches, placement.replica_counts())
    peak = gpu_load.max(-1)
    bal = np.where(peak > 0, gpu_load.mean(-1) / np.where(peak > 0, peak, 1.0), 1.0)
    return Evaluation(
        dispatch=dispatch,
        slot_load=slot_load,
        gpu_load=gpu_load,
        gpu_time=gpu_time,
        layer_time=layer_time,
        layer_fluid=layer_fluid,
        layer_replica=layer_replica,
        straggler=float(layer_time.sum(-1).mean()),
        fluid_bound=float(layer_fluid.sum(-1).mean()),
        replica_bound=float(layer_replica.sum(-1).mean()),
        balancedness=float(bal.mean()),
        traffic_share=(
            traffic_share(placement, transitions) if transitions is not None else float("nan")
        ),
        moved=moved_copies(placement, previous) if previous is not None else 0,
    )
