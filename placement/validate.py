"""Independent validity check of a placement, used on every solver's output."""

from __future__ import annotations

import numpy as np

from placement.model import MoEModelShape, Placement


class InvalidPlacementError(ValueError):
    """A placement that serving must not load; the message says what is wrong."""


def validate(placement: Placement, model: MoEModelShape | None = None) -> None:
    """Raise :class:`InvalidPlacementError` unless every layer holds every expert, the slot count
    is exact and no GPU holds two copies of one expert."""
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
    per_gpu = table.reshape(L, placement.num_gpus, placement.slots_per_gpu)
    for layer in range(L):
        missing = np.setdiff1d(np.arange(E), table[layer])
        if missing.size:
            raise InvalidPlacementError(
                f"layer {layer}: experts {missing.tolist()[:8]} have no slot"
            )
        for gpu in range(placement.num_gpus):
            held = per_gpu[layer, gpu]
            if np.unique(held).size != held.size:
                raise InvalidPlacementError(
                    f"layer {layer}: GPU {gpu} holds two copies of one expert"
                )
