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
    read_layer_index,
    read_model_transitions_csv,
    read_per_prompt,
    read_transitions,
    windows,
)
from placement.model import Cluster, FloatArray, IntArray, MoEModelShape, Placement
from placement.presets import (
    LayoutError,
    ModelLayout,
    agreed,
    check_shape,
    layout_from_config,
    preset_layout,
)
from placement.problem import Problem, Weights
from placement.validate import Engine, InvalidPlacementError, check_engine, describe_duplicates


@dataclass(frozen=True)
class LoadInput:
    """``load`` [L, E] tokens per expert; ``samples`` [K, L, E] per-window counts (None for
    an aggregate CSV); ``layer_ids`` the file's ``moe_layer_index`` values (model layers,
    dense ones counted), None when it has none (0..L-1 are shown then); ``source`` says
    where it came from, for people."""

    load: FloatArray
    layer_ids: list[int] | None
    source: str
    samples: FloatArray | None = None

    @property
    def shown_layer_ids(self) -> list[int]:
        return self.layer_ids if self.layer_ids is not None else list(range(self.load.shape[0]))

    @property
    def scored(self) -> FloatArray:
        """What placements are scored on: the windows [K, L, E] if any, else the load."""
        return self.load if self.samples is None else self.samples


@dataclass(frozen=True)
class ModelChoice:
    """What the user said about the model: ``--model``, ``--model-config``,
    ``--dense-layers``, ``--top-k`` (None: not given)."""

    preset: str | None = None
    config: Path | None = None
    dense_layers: int | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """The model shape and its hidden-layer count (None: not known); ``dense_known`` is False
    when nothing said how many dense layers come first (the shape then holds 0, which must
    not reach an engine file)."""

    shape: MoEModelShape
    hidden_layers: int | None
    dense_known: bool


def read_layouts(choice: ModelChoice) -> list[tuple[str, ModelLayout]]:
    """The layouts the user named, each with the option that named it."""
    layouts: list[tuple[str, ModelLayout]] = []
    if choice.preset is not None:
        with bad_input("--model"):
            layouts.append((f"--model {choice.preset}", preset_layout(choice.preset)))
    if choice.config is not None:
        with bad_input("--model-config", choice.config):
            config = json.loads(choice.config.read_text())
            if not isinstance(config, dict):
                raise LayoutError("config.json: expected a JSON object")
            layouts.append((f"--model-config {choice.config}", layout_from_config(config)))
    return layouts


def load_dense_layers(loaded: LoadInput) -> list[tuple[str, int]]:
    """The dense-layer count the load's layer index implies (its first model layer)."""
    ids = loaded.layer_ids
    if ids is None:
        return []
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise CliError(
            f"load: {loaded.source} numbers its MoE layers {ids[0]}..{ids[-1]} with gaps: "
            "dense layers between MoE layers are not supported"
        )
    return [(f"the moe_layer_index of {loaded.source}", ids[0])]


def resolve_model(loaded: LoadInput, choice: ModelChoice) -> ModelInfo:
    """The model from every source given (preset, config.json, the load's layer index, the
    options); they must agree with each other and with the load's [L, E]."""
    L, E = loaded.load.shape
    layouts = read_layouts(choice)
    dense = [(origin, layout.dense_layers_before) for origin, layout in layouts]
    dense += load_dense_layers(loaded)
    top_k = [(origin, layout.top_k) for origin, layout in layouts]
    if choice.dense_layers is not None:
        dense.append(("--dense-layers", choice.dense_layers))
    if choice.top_k is not None:
        top_k.append(("--top-k", choice.top_k))
    with bad_input("model"):
        for origin, layout in layouts:
            check_shape(layout, origin, L, E)
        before = agreed("dense layers before the first MoE layer", dense)
        hidden = agreed("hidden layers", [(o, lay.hidden_layers) for o, lay in layouts])
        k = agreed("top-k", top_k) or 1
        shape = MoEModelShape(
            moe_layers=L, experts=E, top_k=min(k, E), dense_layers_before=before or 0
        )
    return ModelInfo(shape=shape, hidden_layers=hidden, dense_known=before is not None)


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
        layer_ids = read_layer_index(spec.path, counts.shape[1])
    K = samples.shape[0]
    used = f"{start}:{stop if stop is not None else counts.shape[0]}"
    return LoadInput(
        load=samples.mean(0),
        layer_ids=layer_ids,
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
    path: Path,
    model: MoEModelShape,
    num_gpus: int,
    dense_known: bool = True,
    engine: Engine | None = None,
) -> Placement:
    """A placement file in any supported format, checked against the model and the GPUs;
    an SGLang or vLLM file (rows by model layer) only when the dense layers are known.
    Two copies of one expert on one GPU (DeepSeek's EPLB output) are read with a warning, or
    refused when ``engine`` cannot load them."""
    with bad_input(f"placement: {path}"):
        text = path.read_text()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise CliError(f"placement: {path}: not JSON ({err.msg}, line {err.lineno})") from err
        fmt = detect_format(obj)
        if fmt in ("sglang", "vllm") and not dense_known:
            raise CliError(
                f"placement: {path} is a {fmt} file (rows by model layer) and how many dense "
                "layers precede the first MoE layer is unknown: give --model, --model-config "
                "or --dense-layers"
            )
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
    placement: Placement,
    fmt: formats.Format,
    path: Path,
    hidden_layers: int | None = None,
    ranks: IntArray | None = None,
) -> None:
    """Write ``placement``: SGLang's rows for ``hidden_layers``; ``ranks`` [L, P] order an EPLB
    file's log2phy (else slot order)."""
    with bad_input("out"):
        text = formats.dumps(placement, fmt, num_hidden_layers=hidden_layers, ranks=ranks)
        path.write_text(text + "\n")
