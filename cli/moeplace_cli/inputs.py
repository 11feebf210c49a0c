"""Reading the command line's inputs through the placement library, with one-line errors."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeplace_cli.errors import CliError, bad_input, err_console
from placement import formats
from placement.gpus import load_cluster
from placement.load import (
    read_counts_csv,
    read_model_transitions_csv,
    read_per_prompt,
    read_transitions,
    windows,
)
from placement.model import Cluster, FloatArray, IntArray, MoEModelShape, Placement
from placement.problem import Problem, Weights
from placement.validate import Engine, InvalidPlacementError, check_engine, describe_duplicates


@dataclass(frozen=True)
class LoadInput:
    """``load`` [L, E] tokens per expert; ``samples`` [K, L, E] per-window counts (None for
    an aggregate CSV); ``layer_ids`` the CSV's ``moe_layer_index`` values (0..L-1 for
    samples); ``source`` says where it came from, for people."""

    load: FloatArray
    layer_ids: list[int]
    source: str
    samples: FloatArray | None = None

    def model(self, dense_layers: int | None, top_k: int) -> MoEModelShape:
        """The model shape; dense layers default to the first MoE layer's index (the CSV
        numbers model layers, dense ones included)."""
        L, E = self.load.shape
        dense = self.layer_ids[0] if dense_layers is None else dense_layers
        with bad_input("model"):
            return MoEModelShape(
                moe_layers=L, experts=E, top_k=min(top_k, E), dense_layers_before=max(dense, 0)
            )

    @property
    def scored(self) -> FloatArray:
        """What placements are scored on: the windows [K, L, E] if any, else the load."""
        return self.load if self.samples is None else self.samples


@dataclass(frozen=True)
class WindowSpec:
    """Windows of ``size`` consecutive prompts from a per-prompt counts npz, over
    ``prompts`` (``START:STOP``, 0-based, STOP exclusive; None: all)."""

    path: Path
    size: int = 100
    prompts: str | None = None


def parse_range(text: str | None) -> tuple[int, int | None]:
    """``"A:B"`` -> (A, B); ``"A:"`` -> (A, None); None -> (0, None)."""
    if text is None:
        return 0, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        first = int(start) if start.strip() else 0
        last = int(stop) if stop.strip() else None
    except ValueError:
        raise CliError(f"prompts: expected START:STOP (e.g. 0:500), got {text!r}") from None
    if first < 0 or (last is not None and last <= first):
        raise CliError(f"prompts: empty or negative range {text!r}")
    return first, last


def read_windows(spec: WindowSpec) -> LoadInput:
    """Per-window counts [K, L, E]; the load is their mean (tokens per window)."""
    start, stop = parse_range(spec.prompts)
    with bad_input("samples", spec.path):
        counts = read_per_prompt(spec.path)
        samples = windows(counts, spec.size, start, stop)
    K, L, _ = samples.shape
    used = f"{start}:{stop if stop is not None else counts.shape[0]}"
    return LoadInput(
        load=samples.mean(0),
        layer_ids=list(range(L)),
        source=f"{spec.path.name} prompts {used} in {K} windows of {spec.size}",
        samples=samples,
    )


def read_load(path: Path) -> LoadInput:
    with bad_input("load", path):
        load, layer_ids = read_counts_csv(path)
    return LoadInput(load=load, layer_ids=layer_ids, source=path.name)


def resolve_load(path: Path | None, spec: WindowSpec | None) -> LoadInput:
    """The load from ``--load`` (aggregate CSV) or ``--samples`` (windows), exactly one."""
    if path is not None and spec is None:
        return read_load(path)
    if spec is not None and path is None:
        return read_windows(spec)
    raise CliError("give the load as --load LOAD.csv or --samples COUNTS.npz (one of them)")


def read_cluster(path: Path) -> Cluster:
    with bad_input("gpus", path):
        return load_cluster(path)


def read_transitions_file(path: Path | None, load: FloatArray) -> FloatArray | None:
    """[L-1, E, E] transitions from ``layer_transition_counts.npy`` or a CSV
    ``moe_layer_index,src_expert,dst_expert,count`` (gzipped or not; what the serving
    library's ``transitions_csv()`` writes), checked against the load's shape."""
    if path is None:
        return None
    L, E = load.shape
    with bad_input("transitions", path):
        if path.name.endswith((".csv", ".csv.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as text:
                trans = read_model_transitions_csv(text.read(), L, E, origin=str(path))
        else:
            trans = read_transitions(path)
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
    *,
    samples: FloatArray | None = None,
    transitions: FloatArray | None = None,
    current: Placement | None = None,
    weights: Weights | None = None,
) -> Problem:
    with bad_input("problem"):
        return Problem.build(
            model,
            cluster,
            load,
            redundant,
            samples=samples,
            transitions=transitions,
            current=current,
            weights=weights or Weights(),
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


def read_placement(
    path: Path, model: MoEModelShape, num_gpus: int, engine: Engine | None = None
) -> Placement:
    """A placement file in any supported format, checked against the model and the GPUs.
    Two copies of one expert on one GPU (DeepSeek's EPLB output) are read with a warning, or
    refused when ``engine`` cannot load them."""
    with bad_input(f"placement: {path}"):
        text = path.read_text()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise CliError(f"placement: {path}: not JSON ({err.msg}, line {err.lineno})") from err
        fmt = detect_format(obj)
        try:
            placement = formats.loads(text, fmt, model=model, num_gpus=num_gpus)
        except ValueError as err:
            raise CliError(f"placement: {path}: {err}{_slot_hint(fmt, obj, num_gpus)}") from err
    if placement.num_gpus != num_gpus:
        raise CliError(f"placement: is for {placement.num_gpus} GPUs, --gpus lists {num_gpus}")
    shape = (placement.model.moe_layers, placement.model.experts)
    if shape != (model.moe_layers, model.experts):
        raise CliError(
            f"placement: is for {shape[0]} layers x {shape[1]} experts, the load has "
            f"{model.moe_layers} x {model.experts}"
        )
    try:
        duplicates = check_engine(placement, engine or "vllm")
    except InvalidPlacementError as err:
        raise CliError(f"placement: {path}: {err} (--engine {engine})") from err
    if len(duplicates):
        err_console.print(
            f"warning: placement: {path}: {describe_duplicates(duplicates)}; vLLM and SGLang "
            "run it as it is, SGLang with DeepEP does not (--engine sglang-deepep refuses it)"
        )
    return placement


def _slot_hint(fmt: formats.Format, obj: Any, num_gpus: int) -> str:
    """Engine formats do not record the GPU count: say how the slots were split."""
    if fmt not in ("sglang", "eplb"):
        return ""
    key = "physical_to_logical_map" if fmt == "sglang" else "phy2log"
    rows = obj.get(key) if isinstance(obj, dict) else None
    if not (isinstance(rows, list) and rows and isinstance(rows[0], list)):
        return ""
    slots = len(rows[0])
    return f" (read {slots} slots per layer as {num_gpus} GPUs from --gpus: is it the right one?)"


def write_placement(
    placement: Placement, fmt: formats.Format, path: Path, ranks: IntArray | None = None
) -> None:
    """Write ``placement``; ``ranks`` [L, P] order an EPLB file's log2phy (else slot order)."""
    with bad_input("out"):
        path.write_text(formats.dumps(placement, fmt, ranks=ranks) + "\n")
