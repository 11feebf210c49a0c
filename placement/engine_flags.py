"""The engine settings a placement fixes: an engine started with other values misreads it.

SGLang reads ``--init-expert-location`` as ``[hidden layers][E + --ep-num-redundant-experts]``
split over ``--ep-size`` ranks; vLLM's EPLB holds ``E + num_redundant_experts`` (its
``--eplb-config``) slots over EP size = tensor x data parallel size ranks.
"""

from __future__ import annotations

import json
from typing import Any

from placement.model import Placement


def engine_flags(placement: Placement, hidden_layers: int | None = None) -> dict[str, Any]:
    """The shape numbers and each engine's command-line flags that must match ``placement``;
    ``hidden_layers`` defaults to the dense layers before plus the MoE layers."""
    m = placement.model
    hidden = hidden_layers if hidden_layers is not None else m.dense_layers_before + m.moe_layers
    redundant = placement.num_slots - m.experts
    eplb_config = {"num_redundant_experts": redundant}
    return {
        "hiddenLayers": hidden,
        "denseLayersBefore": m.dense_layers_before,
        "moeLayers": m.moe_layers,
        "experts": m.experts,
        "physicalSlots": placement.num_slots,
        "redundantExperts": redundant,
        "epSize": placement.num_gpus,
        "sglangArgs": [
            "--ep-size",
            str(placement.num_gpus),
            "--ep-num-redundant-experts",
            str(redundant),
        ],
        "vllmArgs": [
            "--enable-expert-parallel",
            "--enable-eplb",
            "--eplb-config",
            json.dumps(eplb_config, separators=(",", ":")),
        ],
        "vllmEplbConfig": eplb_config,
    }
