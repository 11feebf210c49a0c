"""Placement files: canonical JSON and what the engines read.

``canonical``: :meth:`Placement.to_json` (camelCase, ``apiVersion: moeplace.io/v1alpha1``,
``kind: ExpertPlacement``, ``model``, ``numGpus``, ``slotsPerGpu``, ``phy2log`` [L][P],
``strategy``, ``metadata``).

``sglang``: ``--init-expert-location`` JSON ``{"physical_to_logical_map": [[...P] * H]}`` with H
= the model's hidden-layer count. The first ``model.dense_layers_before`` rows (and any rows
after the MoE layers when ``num_hidden_layers`` asks for more) stand for dense layers, which
SGLang never reads for routing: they hold the identity ``s % E`` so that every entry is a valid
expert id. Import drops them again.

``vllm``: a per-layer slot map, our schema (vLLM has no upstream loader yet)::

    {"format": "moeplace.io/vllm-slot-map/v1", "num_layers": L, "num_experts": E,
     "num_gpus": G, "slots_per_gpu": S,
     "layers": [{"layer": l, "model_layer": dense_layers_before + l, "slots": [...P]}, ...]}

``slots[s]`` is the logical expert in physical slot s, which lives on rank s // S.

``eplb``: DeepSeek EPLB's three arrays as JSON ``{"phy2log": [L][P], "log2phy":
[L][E][P-E+1] (-1 padded, copies in slot order), "logcnt": [L][E]}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from placement.model import IntArray, MoEModelShape, Placement
from placement.validate import validate

Format = Literal["canonical", "sglang", "vllm", "eplb"]
FORMATS: tuple[Format, ...] = ("canonical", "sglang", "vllm", "eplb")
VLLM_FORMAT = "moeplace.io/vllm-slot-map/v1"


class PlacementFormatError(ValueError):
    """A placement file that cannot be read; the message says what is wrong."""


def parse_canonical(text: str) -> Placement:
    """Canonical JSON -> validated :class:`Placement`."""
    try:
        placement = Placement.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise PlacementFormatError(f"not a canonical placement: {problems}") from exc
    validate(placement)
    return placement


def log2phy_table(table: IntArray, experts: int) -> tuple[IntArray, IntArray]:
    """[L, P] phy2log -> (log2phy [L, E, P-E+1] -1 padded in slot order, logcnt [L, E])."""
    L, P = table.shape
    maxcnt = P - experts + 1
    out = np.full((L, experts, maxcnt), -1, dtype=np.int64)
    cnt = np.zeros((L, experts), dtype=np.int64)
    for layer in range(L):
        for s, e in enumerate(table[layer].tolist()):
            out[layer, e, cnt[layer, e]] = s
            cnt[layer, e] += 1
    return out, cnt


def to_sglang(placement: Placement, num_hidden_layers: int | None = None) -> dict[str, Any]:
    """SGLang ``--init-expert-location`` object; dense rows are ``s % E``."""
    m = placement.model
    before = m.dense_layers_before
    hidden = num_hidden_layers if num_hidden_layers is not None else before + m.moe_layers
    if hidden < before + m.moe_layers:
        raise ValueError(f"{hidden} hidden layers < {before} dense + {m.moe_layers} MoE layers")
    dense = [s % m.experts for s in range(placement.num_slots)]
    rows = [dense] * before + placement.phy2log + [dense] * (hidden - before - m.moe_layers)
    return {"physical_to_logical_map": [list(r) for r in rows]}


def to_vllm(placement: Placement) -> dict[str, Any]:
    """Per-layer slot map (schema in the module docstring)."""
    m = placement.model
    return {
        "format": VLLM_FORMAT,
        "num_layers": m.moe_layers,
        "num_experts": m.experts,
        "num_gpus": placement.num_gpus,
        "slots_per_gpu": placement.slots_per_gpu,
        "layers": [
            {"layer": i, "model_layer": m.dense_layers_before + i, "slots": list(row)}
            for i, row in enumerate(placement.phy2log)
        ],
    }


def to_eplb(placement: Placement) -> dict[str, Any]:
    """EPLB's ``phy2log``, ``log2phy``, ``logcnt``."""
    log2phy, logcnt = log2phy_table(placement.table, placement.model.experts)
    return {"phy2log": placement.phy2log, "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist()}


def dumps(placement: Placement, fmt: Format = "canonical", **kwargs: Any) -> str:
    """Serialise ``placement`` in ``fmt``; ``num_hidden_layers`` is passed to SGLang's."""
    if fmt == "canonical":
        return placement.to_json()
    if fmt == "sglang":
        return json.dumps(to_sglang(placement, kwargs.get("num_hidden_layers")))
    if fmt == "vllm":
        return json.dumps(to_vllm(placement))
    if fmt == "eplb":
        return json.dumps(to_eplb(placement))
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def _table(obj: Any, key: str) -> list[list[int]]:
    if not isinstance(obj, dict) or key not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise PlacementFormatError(f"expected an object with {key!r}, got {keys}")
    rows = obj[key]
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, list) and all(isinstance(v, int) for v in r) for r in rows)
    ):
        raise PlacementFormatError(f"{key!r} must be a non-empty list of lists of integers")
    return rows


def loads(
    text: str,
    fmt: Format = "canonical",
    model: MoEModelShape | None = None,
    num_gpus: int | None = None,
    strategy: str = "imported",
) -> Placement:
    """Parse a placement file in ``fmt``; engine formats need the ``model`` and ``num_gpus``
    (the vLLM map carries its own GPU count). The result is validated."""
    if fmt == "canonical":
        placement = parse_canonical(text)
        if model is not None:
            validate(placement, model)
        if num_gpus is not None and placement.num_gpus != num_gpus:
            raise PlacementFormatError(
                f"placement is for {placement.num_gpus} GPUs, not {num_gpus}"
            )
        return placement
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlacementFormatError(f"not JSON: {exc}") from exc
    if model is None:
        raise ValueError(f"importing {fmt!r} needs the model shape")
    if fmt == "vllm":
        if not isinstance(obj, dict) or obj.get("format") != VLLM_FORMAT:
            raise PlacementFormatError(f"not a vLLM slot map: 'format' must be {VLLM_FORMAT!r}")
        layers = sorted(obj.get("layers", []), key=lambda x: x.get("layer", -1))
        if [x.get("layer") for x in layers] != list(range(model.moe_layers)):
            raise PlacementFormatError(f"vLLM slot map must list layers 0..{model.moe_layers - 1}")
        rows = _table({"slots": [x.get("slots") for x in layers]}, "slots")
        num_gpus = int(obj.get("num_gpus", num_gpus or 0))
    elif fmt == "sglang":
        if (
            isinstance(obj, dict)
            and "logical_count" in obj
            and "physical_to_logical_map" not in obj
        ):
            raise PlacementFormatError(
                "SGLang 'logical_count' is a load, not a placement: solve it first"
            )
        rows = _table(obj, "physical_to_logical_map")
        before = model.dense_layers_before
        if len(rows) < before + model.moe_layers:
            raise PlacementFormatError(
                f"{len(rows)} rows < {before} dense + {model.moe_layers} MoE layers"
            )
        rows = rows[before : before + model.moe_layers]
    elif fmt == "eplb":
        rows = _table(obj, "phy2log")
        table = np.asarray(rows, dtype=np.int64)
        if table.ndim == 2 and ((table < 0) | (table >= model.experts)).any():
            raise PlacementFormatError(f"phy2log holds ids outside 0..{model.experts - 1}")
        if "logcnt" in obj and table.ndim == 2 and not (table < 0).any():
            _, cnt = log2phy_table(table, model.experts)
            if np.asarray(obj["logcnt"]).tolist() != cnt.tolist():
                raise PlacementFormatError("logcnt disagrees with phy2log")
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not num_gpus:
        raise ValueError(f"importing {fmt!r} needs num_gpus")
    try:
        placement = Placement.from_table(rows, model, num_gpus, strategy)
    except (ValueError, ValidationError) as exc:
        raise PlacementFormatError(str(exc)) from exc
    validate(placement)
    return placement
