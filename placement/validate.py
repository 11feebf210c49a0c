"""Independent validity check of a placement, used on every solver's output.

Two copies of one expert on one GPU: our solvers never place them (the slot would balance
nothing), but DeepSeek's EPLB can, and the engines run its output. Engine profiles say which
setups load such a placement (:data:`ENGINES`); :func:`validate` refuses it unless asked.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from placement.model import IntArray, MoEModelShape, Placement

Engine = Literal["vllm", "sglang", "sglang-deepep"]
# engine setup -> why it cannot load two copies of one expert on one GPU (None: it can)
ENGINES: dict[Engine, str | None] = {
    "vllm": None,
    "sglang": None,
    "sglang-deepep": "SGLang with DeepEP loads only the first copy of an expert on a GPU",
}


class InvalidPlacementError(ValueError):
    """A placement that serving must not load; the message says what is wrong."""


def duplicate_copies(table: IntArray, num_gpus: int) -> IntArray:
    """phy2log [L, P] -> [n, 3] rows (layer, GPU, expert), one per extra copy of an expert on
    a GPU that already holds it (a GPU with three copies of e gives two rows)."""
    L, P = table.shape
    gpu = np.broadcast_to(np.arange(P) // (P // num_gpus), (L, P))
    layer = np.broadcast_to(np.arange(L)[:, None], (L, P))
    triples = np.stack([layer.ravel(), gpu.ravel(), table.ravel()], axis=1)
    unique, counts = np.unique(triples, axis=0, return_counts=True)
    return np.repeat(unique, counts - 1, axis=0)


def describe_duplicates(duplicates: IntArray) -> str:
    """'N extra copies on one GPU (layer l GPU g expert e, ...)' for messages."""
    shown = ", ".join(f"layer {ly} GPU {g} expert {e}" for ly, g, e in duplicates[:3].tolist())
    more = ", ..." if len(duplicates) > 3 else ""
    return f"{len(duplicates)} extra copies of an expert on a GPU that holds it ({shown}{more})"


def validate(
    placement: Placement, model: MoEModelShape | None = None, *, allow_duplicates: bool = False
) -> None:
    """Raise :class:`InvalidPlacementError` unless every layer holds every expert, the slot count
    is exact and (unless ``allow_duplicates``) no GPU holds two copies of one expert."""
    shape = model or placement.model
    table = placement.table
    L, E = shape.moe_layers, shape.experts
    if placement.model != shape:
        raise InvalidPlacementError(f"placement is for {placement.model}, expected {shape}")
    if table.shape != (L, placement.num_slots):
        raise InvalidPlacementError(
            f"phy2log has shape {table.shape}, expected ({L}, {placement.num_slots})"
        )
    if (table < 0).any() or (table >= E).any():
        raise InvalidPlacementError(f"phy2log holds expert ids outside 0..{E - 1}")
    if placement.num_slots < E:  # checked first: the per-layer check below is O(E)
        raise InvalidPlacementError(f"{placement.num_slots} slots cannot hold {E} experts")
    for layer in range(L):
        missing = np.setdiff1d(np.arange(E), table[layer])
        if missing.size:
            raise InvalidPlacementError(
                f"layer {layer}: experts {missing.tolist()[:8]} have no slot"
            )
    if not allow_duplicates:
        duplicates = duplicate_copies(table, placement.num_gpus)
        if len(duplicates):
            layer, gpu, _ = duplicates[0].tolist()
            raise InvalidPlacementError(f"layer {layer}: GPU {gpu} holds two copies of one expert")


def check_engine(placement: Placement, engine: Engine) -> IntArray:
    """The placement's extra copies on one GPU ([n, 3], see :func:`duplicate_copies`); raises
    :class:`InvalidPlacementError` when ``engine`` cannot load them."""
    duplicates = duplicate_copies(placement.table, placement.num_gpus)
    reason = ENGINES[engine]
    if len(duplicates) and reason is not None:
        raise InvalidPlacementError(f"{describe_duplicates(duplicates)}: {reason}")
    return duplicates
