"""Per-batch token dispatch over expert copies: which slot computes each (token, expert) pair.

Two rules, per layer and batch:

* ``even``: each copy of an expert gets an equal share of its tokens (what vLLM and SGLang do).
* ``speed-aware``: the split of :func:`placement.dispatch.best_split` for this batch's counts,
  so the GPUs of the layer finish together given their speed factors or latency curves.

Both give per-slot integer quotas (fractional splits rounded by largest remainder, per expert);
pairs are then handed to slots in token order, expert by expert. Shapes: T tokens, L layers,
k experts per token, E experts, P slots (``P = G * S``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from placement import Cluster, Placement
from placement.dispatch import TimeModel, best_split
from placement.evaluate import DISPATCH_RULES, Dispatch
from placement.model import FloatArray, IntArray

Mode = Dispatch  # the placement library's dispatch rule names
MODES: tuple[Mode, ...] = DISPATCH_RULES


class Dispatcher:
    """Dispatch for one placement on one cluster (rebuild it when the placement changes)."""

    def __init__(self, placement: Placement, cluster: Cluster, mode: Mode = "speed-aware") -> None:
        if cluster.size != placement.num_gpus:
            raise ValueError(
                f"{cluster.size} GPUs in the cluster, placement has {placement.num_gpus}"
            )
        self.placement, self.mode = placement, mode
        self.time_model = TimeModel(cluster)
        self.experts = placement.model.experts
        self.table = placement.table  # [L, P]
        self.copies = np.stack([np.bincount(r, minlength=self.experts) for r in self.table])
        self.slot_order = np.argsort(self.table, axis=1, kind="stable")  # [L, P] by expert

    def quotas(self, layer: int, counts: IntArray) -> IntArray:
        """[P] pairs per slot in ``layer`` for this batch; ``counts`` [E] pairs per expert."""
        row = self.table[layer]
        if self.mode == "speed-aware":
            load = counts.astype(np.float64)
            share = best_split(row, load, self.time_model, self.placement.slots_per_gpu).slot_load
        else:
            share = counts[row] / self.copies[layer][row]
        return _round_per_expert(row, share, counts)

    def assign(self, layer: int, experts: npt.NDArray[np.integer]) -> IntArray:
        """Slot of each pair: ``experts`` [N] logical expert ids -> [N] slot ids. Small
        unsigned dtypes (uint8/uint16, as routers emit) sort fastest (radix sort)."""
        counts = np.bincount(experts, minlength=self.experts)
        order = np.argsort(experts, kind="stable")
        slots_by_expert = self.slot_order[layer]
        bounds = np.cumsum(self.quotas(layer, counts)[slots_by_expert])
        picked = slots_by_expert[np.searchsorted(bounds, np.arange(experts.size), side="right")]
        out = np.empty(experts.size, dtype=np.int64)
        out[order] = picked
        return out

    def route(self, topk_ids: npt.NDArray[np.integer]) -> IntArray:
        """[T, L, k] expert ids -> [T, L, k] slot ids (GPU of a slot: ``slot // S``)."""
        T, L, k = topk_ids.shape
        out = np.empty((T, L, k), dtype=np.int64)
        for layer in range(L):
            flat = topk_ids[:, layer, :].reshape(-1)
            out[:, layer, :] = self.assign(layer, flat).reshape(T, k)
        return out

    def layer_times(self, slots: IntArray) -> FloatArray:
        """[L] slowest GPU's modelled time per layer for pairs routed to ``slots`` [T, L, k] (the
        time model's unit: token-times for speed factors, µs for curves)."""
        L, G = self.table.shape[0], self.placement.num_gpus
        gpu = slots // self.placement.slots_per_gpu + (np.arange(L) * G)[None, :, None]
        loads = np.bincount(gpu.reshape(-1), minlength=L * G).reshape(L, G)
        return np.asarray(self.time_model.time(loads.astype(np.float64)).max(axis=1))


def _round_per_expert(row: IntArray, share: FloatArray, counts: IntArray) -> IntArray:
    """Round ``share`` [P] to ints so each expert's copies sum exactly to ``counts[e]``:
    floors, then +1 to the copies with the largest remainders (ties: lower slot first)."""
    base = np.floor(share + 1e-9).astype(np.int64)
    missing = counts - np.bincount(row, weights=base, minlength=counts.size).astype(np.int64)
    order = np.lexsort((-(share - base), row))  # by expert, then largest remainder first
    grouped = row[order]
    first = np.searchsorted(grouped, grouped)  # index of each expert's first copy in ``order``
    bump = (np.arange(row.size) - first) < missing[grouped]
    base[order[bump]] += 1
    return base
