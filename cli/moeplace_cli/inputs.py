"""Reading the command line's inputs through the placement library, with one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeplace_cli.errors import CliError, bad_input
from placement import formats
from placement.gpus import load_cluster
from placement.load import read_counts_csv, read_transitions
from placement.model import Cluster, FloatArray, MoEModelShape, Placement
from placement.problem import Problem, Weights


@dataclass(frozen=True)
class LoadInput:
    """``load`` [L, E] tokens per expert; ``layer_ids`` the CSV's ``moe_layer_index`` values."""

    load: FloatArray
    layer_ids: list[int]

    def model(self, dense_layers: int | None, top_k: int) -> MoEModelShape:
        """The model shape; dense layers default to the first MoE layer's index (the CSV
        numbers model layers, dense ones included)."""
        L, E = self.load.shape
        dense = self.layer_ids[0] if dense_layers is None else dense_layers
        with bad_input("model"):
            return MoEModelShape(
                moe_layers=L, experts=E, top_k=min(top_k, E), dense_layers_before=max(dense, 0)
            )


def read_load(path: Path) -> LoadInput:
    with bad_input("load"):
        load, layer_ids = read_counts_csv(path)
    return LoadInput(load=load, layer_ids=layer_ids)


def read_cluster(path: Path) -> Cluster:
    with bad_input("gpus"):
        return load_cluster(path)


def read_transitions_file(path: Path | None, load: FloatArray) -> FloatArray | None:
    """[L-1, E, E] transitions, checked against the load's shape."""
    if path is None:
        return None
    with bad_input("transitions"):
        trans = read_transitions(path)
    L, E = load.shape
    if trans.shape != (max(L - 1, 0), E, E):
        raise CliError(
            f"transitions: {path} has shape {trans.shape}, the load needs ({L - 1}, {E}, {E})"
        )
    return trans


def build_problem(
    model: MoEModelShape,
    cluster: Cluster,
    load: FloatArray,
    redundant: int,
    transitions: FloatArray | None = None,
    traffic_weight: float = 0.0,
) -> Problem:
    with bad_input("problem"):
        return Problem.build(
            model,
            cluster,
            load,
            redundant,
            transitions=transitions,
            weights=Weights(traffic=traffic_weight),
        )


def detect_format(obj: Any) -> formats.Format:
    """Which placement format a parsed JSON object is in."""
    if not isinstance(obj, dict):
        raise CliError("placement: expected a JSON object")
    if obj.get("kind") == "ExpertPlacement" or "apiVersion" in obj:
        return "canonical"
    if obj.get("format") == formats.VLLM_FORMAT:
        return "vllm"
    if "physical_to_logical_map" in obj or "logical_count" in obj:
        return "sglang"
    if "phy2log" in obj:
        return "eplb"
    raise CliError(
        "placement: unknown format (expected canonical, sglang, vllm or eplb JSON); "
        f"top-level keys: {sorted(obj)[:6]}"
    )


def read_placement(path: Path, model: MoEModelShape, num_gpus: int) -> Placement:
    """A placement file in any supported format, checked against the model and the GPUs."""
    with bad_input("placement"):
        text = path.read_text()
        fmt = detect_format(json.loads(text))
        placement = formats.loads(text, fmt, model=model, num_gpus=num_gpus)
    if placement.num_gpus != num_gpus:
        raise CliError(f"placement: is for {placement.num_gpus} GPUs, --gpus lists {num_gpus}")
    shape = (placement.model.moe_layers, placement.model.experts)
    if shape != (model.moe_layers, model.experts):
        raise CliError(
            f"placement: is for {shape[0]} layers x {shape[1]} experts, the load has "
            f"{model.moe_layers} x {model.experts}"
        )
    return placement


def write_placement(placement: Placement, fmt: formats.Format, path: Path) -> None:
    with bad_input("out"):
        path.write_text(formats.dumps(placement, fmt) + "\n")
