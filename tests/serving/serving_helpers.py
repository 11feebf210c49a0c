"""Helpers for the serving-library tests: small valid placements."""

from __future__ import annotations

import numpy as np

from placement import MoEModelShape, Placement

SHAPE = MoEModelShape(name="tiny", moe_layers=3, experts=4, top_k=2)


def tiny_placement(version: int, shift: int = 0, gpus: int = 2, slots: int = 3) -> Placement:
    """[3, gpus * slots] placement of 4 experts; slot s of layer l holds (s + shift + l) % 4,
    so no GPU holds two copies (slots <= 4) and ``shift`` changes which experts are doubled."""
    table = (np.arange(gpus * slots)[None, :] + shift + np.arange(3)[:, None]) % SHAPE.experts
    return Placement.from_table(table, SHAPE, num_gpus=gpus, strategy="test", version=version)
