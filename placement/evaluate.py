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

Dispatch = Literal["even", "best"]


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


def traffic_share(placement: Placement, transitions: FloatArray) -> float:
    """Share of token transitions (layer l -> l+1, ``transitions`` [L-1, E, E]) whose GPU
    changes, when each token picks one of its expert's copies uniformly (even dispatch):
    ``1 - sum T[l,i,j] * sum_g p_l(g|i) p_{l+1}(g|j) / sum T``."""
    trans = np.asarray(transitions, dtype=np.float64)
    total = float(trans.sum())
    if total <= 0:
        return float("nan")
    t = placement.table
    L, E, G = t.shape[0], placement.model.experts, placement.num_gpus
    gpu = placement.gpu_of_slot()
    share = np.zeros((L, E, G))
    for layer in range(L):
        np.add.at(share[layer], (t[layer], gpu), 1.0)
    share /= np.maximum(share.sum(-1, keepdims=True), 1.0)
    stay = 0.0
    for layer in range(L - 1):
        stay += float((trans[layer] * (share[layer] @ share[layer + 1].T)).sum())
    return 1.0 - stay / total


def moved_copies(placement: Placement, previous: Placement) -> int:
    """Copies that must be loaded anew: per layer and GPU, the experts held now that the GPU
    did not hold before (a copy that only changes slot on its GPU does not count)."""
    if previous.table.shape != placement.table.shape or previous.num_gpus != placement.num_gpus:
        raise ValueError("previous placement has a different shape")
    a = placement.table.reshape(placement.table.shape[0], placement.num_gpus, -1)
    b = previous.table.reshape(a.shape)
    moved = 0
    for layer in range(a.shape[0]):
        for g in range(a.shape[1]):
            now, before = np.sort(a[layer, g]), np.sort(b[layer, g])
            # multiset difference via counts
            vals, cnt = np.unique(now, return_counts=True)
            bvals, bcnt = np.unique(before, return_counts=True)
            had = dict(zip(bvals.tolist(), bcnt.tolist(), strict=True))
            moved += sum(
                max(0, c - had.get(v, 0)) for v, c in zip(vals.tolist(), cnt.tolist(), strict=True)
            )
    return moved


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
    model = TimeModel(cluster)
    G, S = placement.num_gpus, placement.slots_per_gpu
    if dispatch == "even":
        slot_load, gpu_load = even_split(table, batches, G)
    elif dispatch == "best":
        K, L = batches.shape[:2]
        slot_load = np.zeros((K, L, table.shape[1]))
        gpu_load = np.zeros((K, L, G))
        for k in range(K):
            for layer in range(L):
                split = best_split(table[layer], batches[k, layer], model, S)
                slot_load[k, layer] = split.slot_load
                gpu_load[k, layer] = split.gpu_load
    else:
        raise ValueError(f"unknown dispatch rule {dispatch!r}")
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
