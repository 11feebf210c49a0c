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

``eplb``: DeepSeek EPLB's three arrays as JSON ``{"phy2log": [L][P], "log2phy": [L][E][C],
"logcnt": [L][E]}``, shaped as ``rebalance_experts`` returns them: C = the largest copy count,
``log2phy[l][e][r]`` the slot of e's copy of replica rank r, -1 past e's copies. Replica ranks
come from DeepSeek's replicate step when known (:func:`placement.solvers.eplb.replicas_and_ranks`
gives them to :func:`to_eplb`), else slot order. Import checks ``log2phy`` and ``logcnt``
against ``phy2log`` (any width C >= the largest count is read).

Two copies of one expert on one GPU (DeepSeek's EPLB can place them and the engines run them) are
imported as they are unless ``allow_duplicates=False``; see :mod:`placement.validate` for the
engine setups that cannot load them.
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


def parse_canonical(text: str, allow_duplicates: bool = False) -> Placement:
    """Canonical JSON -> validated :class:`Placement`."""
    try:
        placement = Placement.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise PlacementFormatError(f"not a canonical placement: {problems}") from exc
    validate(placement, allow_duplicates=allow_duplicates)
    return placement


def slot_order_ranks(table: IntArray) -> IntArray:
    """phy2log [L, P] -> replica rank [L, P]: each expert's copies numbered in slot order."""
    ranks = np.zeros_like(table)
    for layer, row in enumerate(table.tolist()):
        seen: dict[int, int] = {}
        for s, e in enumerate(row):
            ranks[layer, s] = seen.get(e, 0)
            seen[e] = ranks[layer, s] + 1
    return ranks


def log2phy_table(
    table: IntArray, experts: int, ranks: IntArray | None = None
) -> tuple[IntArray, IntArray]:
    """phy2log [L, P] and replica rank [L, P] (default: slot order) -> (log2phy [L, E, C] with
    C = the largest copy count, ``log2phy[l, e, r]`` = slot of e's copy of rank r, -1 padded;
    logcnt [L, E])."""
    L, P = table.shape
    logcnt = np.stack([np.bincount(row, minlength=experts) for row in table])
    rank = slot_order_ranks(table) if ranks is None else np.asarray(ranks, dtype=np.int64)
    if (
        rank.shape != table.shape
        or (rank < 0).any()
        or (rank >= logcnt[np.arange(L)[:, None], table]).any()
    ):
        raise ValueError("replica ranks must number each expert's copies 0..copies-1")
    width = int(logcnt.max())
    out = np.full((L, experts * width), -1, dtype=np.int64)
    out[np.arange(L)[:, None], table * width + rank] = np.arange(P)
    if (np.sort(out, axis=-1)[:, experts * width - P :] != np.arange(P)).any():
        raise ValueError("replica ranks repeat a rank for one expert")
    return out.reshape(L, experts, width), logcnt


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


def to_eplb(placement: Placement, ranks: IntArray | None = None) -> dict[str, Any]:
    """EPLB's ``phy2log``, ``log2phy``, ``logcnt``; ``ranks`` [L, P] the replica ranks
    (default: slot order)."""
    log2phy, logcnt = log2phy_table(placement.table, placement.model.experts, ranks)
    return {"phy2log": placement.phy2log, "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist()}


def dumps(placement: Placement, fmt: Format = "canonical", **kwargs: Any) -> str:
    """Serialise ``placement`` in ``fmt``; ``num_hidden_layers`` is passed to SGLang's,
    ``ranks`` (replica ranks [L, P]) to EPLB's."""
    if fmt == "canonical":
        return placement.to_json()
    if fmt == "sglang":
        return json.dumps(to_sglang(placement, kwargs.get("num_hidden_layers")))
    if fmt == "vllm":
        return json.dumps(to_vllm(placement))
    if fmt == "eplb":
        return json.dumps(to_eplb(placement, kwargs.get("ranks")))
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


def _int_array(obj: dict[str, Any], key: str, ndim: int) -> IntArray:
    try:
        arr = np.asarray(obj[key])
    except ValueError as exc:  # ragged lists
        raise PlacementFormatError(f"{key!r} must be a rectangular array of integers") from exc
    if arr.ndim != ndim or arr.dtype.kind not in "iu":
        raise PlacementFormatError(f"{key!r} must be a {ndim}-d array of integers")
    return arr.astype(np.int64)


def check_eplb_arrays(obj: dict[str, Any], table: IntArray, experts: int) -> IntArray | None:
    """Check an EPLB file's ``logcnt`` [L, E] and ``log2phy`` [L, E, C] (when present) against
    its ``phy2log`` [L, P]; returns the replica ranks [L, P] that ``log2phy`` lists (None
    without it). Raises :class:`PlacementFormatError` naming the first disagreement."""
    if table.ndim != 2:
        raise PlacementFormatError("'phy2log' must be a rectangular [layers][slots] table")
    if ((table < 0) | (table >= experts)).any():
        raise PlacementFormatError(f"phy2log holds ids outside 0..{experts - 1}")
    L, P = table.shape
    logcnt = np.stack([np.bincount(row, minlength=experts) for row in table])
    if "logcnt" in obj:
        given = _int_array(obj, "logcnt", 2)
        if given.shape != logcnt.shape:
            raise PlacementFormatError(f"logcnt has shape {given.shape}, expected {logcnt.shape}")
        wrong = np.argwhere(given != logcnt)
        if len(wrong):
            layer, e = wrong[0].tolist()
            raise PlacementFormatError(
                f"logcnt disagrees with phy2log: layer {layer} expert {e} has "
                f"{logcnt[layer, e]} copies in phy2log, logcnt says {given[layer, e]}"
            )
    if "log2phy" not in obj:
        return None
    log2phy = _int_array(obj, "log2phy", 3)
    if log2phy.shape[:2] != (L, experts) or log2phy.shape[2] < logcnt.max():
        raise PlacementFormatError(
            f"log2phy has shape {log2phy.shape}, expected ({L}, {experts}, >= {logcnt.max()})"
        )
    ranks = np.full((L, P), -1, dtype=np.int64)
    for layer, e, r in np.argwhere(log2phy != -1).tolist():
        slot = int(log2phy[layer, e, r])
        where = f"log2phy[{layer}][{e}][{r}] = {slot}"
        if r >= logcnt[layer, e]:
            raise PlacementFormatError(
                f"{where}: expert {e} has {logcnt[layer, e]} copies in phy2log"
            )
        if not 0 <= slot < P or table[layer, slot] != e:
            held = f"holds expert {table[layer, slot]}" if 0 <= slot < P else "does not exist"
            raise PlacementFormatError(f"{where}, but that slot {held} in phy2log")
        if ranks[layer, slot] != -1:
            raise PlacementFormatError(f"{where}: slot {slot} is listed twice")
        ranks[layer, slot] = r
    missing = np.argwhere(ranks == -1)
    if len(missing):
        layer, slot = missing[0].tolist()
        raise PlacementFormatError(
            f"log2phy[{layer}] does not list slot {slot} (expert {table[layer, slot]})"
        )
    return ranks


def loads(
    text: str,
    fmt: Format = "canonical",
    model: MoEModelShape | None = None,
    num_gpus: int | None = None,
    strategy: str = "imported",
    allow_duplicates: bool = True,
) -> Placement:
    """Parse a placement file in ``fmt``; engine formats need the ``model`` and ``num_gpus``
    (the vLLM map carries its own GPU count). The result is validated; two copies of one
    expert on one GPU are accepted (as the engines load them) unless ``allow_duplicates`` is
    False."""
    if fmt == "canonical":
        placement = parse_canonical(text, allow_duplicates)
        if model is not None:
            validate(placement, model, allow_duplicates=allow_duplicates)
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
        check_eplb_arrays(obj, np.asarray(rows, dtype=np.int64), model.experts)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not num_gpus:
        raise ValueError(f"importing {fmt!r} needs num_gpus")
    try:
        placement = Placement.from_table(rows, model, num_gpus, strategy)
    except (ValueError, ValidationError) as exc:
        raise PlacementFormatError(str(exc)) from exc
    validate(placement, allow_duplicates=allow_duplicates)
    return placement
