"""What both engine plugins check before a placement reaches the engine.

An engine serves a fixed expert layout: its model's decoder layers (dense ones included), the
routed experts per MoE layer, the physical slots (experts + the engine's redundant-expert flag)
and the expert-parallel size. :meth:`EngineShape.check` refuses a placement that does not fit it,
with a message naming the engine flag or model field that disagrees; the watcher
(:class:`moeplace_serving.watcher.PlacementWatcher`, ``expect=``) turns that into a refusal
(one log line, ``moe_placement_reloads_total{result="invalid"}``, the old placement kept).

Pure Python (no torch, no engine imports): the plugins fill an :class:`EngineShape` from the
engine's own config objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from placement import InvalidPlacementError, Placement, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SameGpuCopies:
    """``gpu`` holds ``copies`` (> 1) slots of ``expert`` in MoE layer ``layer``."""

    layer: int
    gpu: int
    expert: int
    copies: int


def same_gpu_copies(placement: Placement) -> list[SameGpuCopies]:
    """Every (layer, GPU, expert) with more than one copy of the expert on that GPU."""
    per_gpu = placement.table.reshape(-1, placement.num_gpus, placement.slots_per_gpu)
    found = []
    for layer, gpus in enumerate(per_gpu):
        for gpu, held in enumerate(gpus):
            experts, counts = np.unique(held, return_counts=True)
            found += [
                SameGpuCopies(layer, gpu, int(e), int(c))
                for e, c in zip(experts, counts, strict=True)
                if c > 1
            ]
    return found


@dataclass(frozen=True)
class EngineShape:
    """The expert layout a running engine serves.

    ``hidden_layers``: decoder layers, dense ones included; ``moe_layer_ids``: hidden-layer
    index of each MoE layer in order (a placement's row r is hidden layer
    ``dense_layers_before + r``, so these must be consecutive); ``redundant_experts``: the
    engine's redundant-slot flag (SGLang ``--ep-num-redundant-experts``, vLLM
    ``num_redundant_experts``); ``same_gpu_copies_ok``: False where the engine loads only one of
    two copies of an expert on one GPU (SGLang with DeepEP), which then refuses such files.
    """

    engine: str
    hidden_layers: int
    moe_layer_ids: tuple[int, ...]
    experts: int
    redundant_experts: int
    ep_size: int
    redundant_flag: str = "redundant experts"
    same_gpu_copies_ok: bool = True

    def __post_init__(self) -> None:
        ids = self.moe_layer_ids
        if not ids or list(ids) != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(
                f"{self.engine}: MoE layers {list(ids)[:8]} are not one consecutive run "
                "(a placement's rows cannot express interleaved dense layers)"
            )
        if ids[-1] >= self.hidden_layers:
            raise ValueError(f"{self.engine}: MoE layer {ids[-1]} >= {self.hidden_layers}")

    @property
    def dense_layers_before(self) -> int:
        return self.moe_layer_ids[0]

    @property
    def physical_slots(self) -> int:
        return self.experts + self.redundant_experts

    def check(self, placement: Placement) -> None:
        """Raise :class:`InvalidPlacementError` unless ``placement`` fits this engine; log a
        warning for copies of one expert on one GPU where the engine tolerates them."""
        for problem in self._mismatches(placement):
            raise InvalidPlacementError(f"{self.engine}: {problem}")
        doubled = same_gpu_copies(placement)
        if doubled and not self.same_gpu_copies_ok:
            first = doubled[0]
            raise InvalidPlacementError(
                f"{self.engine}: GPU {first.gpu} holds {first.copies} copies of expert "
                f"{first.expert} in MoE layer {first.layer} ({len(doubled)} such cases), "
                "and this engine setup loads only the first"
            )
        # placement.validate may refuse such copies on its own (a placement-library rule)
        validate(placement)
        if doubled:
            log.warning(
                "%s: %d (layer, GPU) pairs hold two copies of one expert (first: layer %d, "
                "GPU %d, expert %d); accepted, the second copy only adds capacity",
                self.engine,
                len(doubled),
                doubled[0].layer,
                doubled[0].gpu,
                doubled[0].expert,
            )

    def _mismatches(self, placement: Placement) -> list[str]:
        m = placement.model
        moe = len(self.moe_layer_ids)
        problems = []
        if m.experts != self.experts:
            problems.append(
                f"placement has {m.experts} experts per layer, model has {self.experts}"
            )
        if m.moe_layers != moe or m.dense_layers_before != self.dense_layers_before:
            problems.append(
                f"placement covers {m.dense_layers_before} dense + {m.moe_layers} MoE layers, "
                f"model has {self.dense_layers_before} dense + {moe} MoE of "
                f"{self.hidden_layers} hidden layers"
            )
        if placement.num_gpus != self.ep_size:
            problems.append(
                f"placement is for {placement.num_gpus} GPUs, EP size is {self.ep_size}"
            )
        if placement.num_slots != self.physical_slots:
            problems.append(
                f"placement has {placement.num_slots} slots, engine has {self.physical_slots} "
                f"({self.experts} experts + {self.redundant_flag}={self.redundant_experts}); "
                f"start it with {self.redundant_flag}={placement.num_slots - self.experts}"
            )
        table = placement.table
        if ((table < 0) | (table >= self.experts)).any():
            problems.append(f"phy2log holds expert ids outside 0..{self.experts - 1}")
        return problems
