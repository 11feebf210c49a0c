"""Options shared by the commands (typer ``Annotated`` aliases) and their enums."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from placement.validate import Engine


class OutputFormat(StrEnum):
    canonical = "canonical"
    sglang = "sglang"
    vllm = "vllm"
    eplb = "eplb"


class DispatchRule(StrEnum):
    even = "even"
    speed_aware = "speed-aware"


class EngineSetup(StrEnum):
    """Engine setups and whether they load two copies of one expert on one GPU
    (placement.validate.ENGINES)."""

    vllm = "vllm"
    sglang = "sglang"
    sglang_deepep = "sglang-deepep"


ENGINE_SETUPS: dict[EngineSetup, Engine] = {
    EngineSetup.vllm: "vllm",
    EngineSetup.sglang: "sglang",
    EngineSetup.sglang_deepep: "sglang-deepep",
}


class Hedge(StrEnum):
    expected = "expected"
    robust = "robust"


LOAD_PANEL = "Load (one of --load, --samples)"
SOLVER_PANEL = "Solver"

LoadOpt = Annotated[
    Path | None,
    typer.Option(
        "--load",
        help="Aggregate token counts: CSV moe_layer_index,expert_id,count.",
        rich_help_panel=LOAD_PANEL,
    ),
]
SamplesOpt = Annotated[
    Path | None,
    typer.Option(
        "--samples",
        help="Per-prompt counts npz (counts [N,L,E]), cut into windows of --window prompts: "
        "solvers hedge over them, scores are per window.",
        rich_help_panel=LOAD_PANEL,
    ),
]
WindowOpt = Annotated[
    int, typer.Option("--window", min=1, help="Prompts per window.", rich_help_panel=LOAD_PANEL)
]
PromptsOpt = Annotated[
    str | None,
    typer.Option(
        "--prompts",
        help="START:STOP prompts of --samples to use (0-based, STOP exclusive); default all.",
        rich_help_panel=LOAD_PANEL,
    ),
]
GpusOpt = Annotated[
    Path, typer.Option("--gpus", help="GPUS.csv (gpu,node,speed) or GPU-profile JSON.")
]
RedundantOpt = Annotated[
    int, typer.Option("--redundant", min=0, help="Redundant copies (E + R slots over G GPUs).")
]
TimeLimitOpt = Annotated[
    float,
    typer.Option(
        "--time-limit", min=0.01, help="Time limit in seconds.", rich_help_panel=SOLVER_PANEL
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.", rich_help_panel=SOLVER_PANEL)]
ThreadsOpt = Annotated[
    int,
    typer.Option("--threads", min=0, help="Worker threads; 0: all.", rich_help_panel=SOLVER_PANEL),
]
HedgeOpt = Annotated[
    Hedge,
    typer.Option(
        "--hedge",
        help="With --samples: minimise the expected or the worst window's straggler time.",
        rich_help_panel=SOLVER_PANEL,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
DenseOpt = Annotated[
    int | None,
    typer.Option(
        "--dense-layers",
        min=0,
        help="Dense layers before the first MoE layer (SGLang rows). Default: from --model, "
        "--model-config or the load's moe_layer_index (which must agree); with none of them "
        "sglang/vllm files are refused: give 0 for a model without dense layers.",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Model preset (placement.presets): its hidden, dense and MoE layers, experts, top-k.",
    ),
]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-config",
        help="The model's Hugging Face config.json: hidden/dense/MoE layers, experts, top-k.",
    ),
]
TransOpt = Annotated[
    Path | None, typer.Option("--transitions", help="layer_transition_counts.npy [L-1,E,E].")
]
DispatchOpt = Annotated[
    DispatchRule,
    typer.Option(
        "--dispatch", help="even: split over copies evenly; speed-aware: best split per batch."
    ),
]
TopKOpt = Annotated[
    int | None,
    typer.Option(
        "--top-k", min=1, help="Experts per token (metadata); default: the model's, else 1."
    ),
]
EngineOpt = Annotated[
    EngineSetup | None,
    typer.Option(
        "--engine",
        help="Engine setup that will load the placement: sglang-deepep refuses two copies of "
        "one expert on one GPU (DeepEP loads only the first); default: warn about them.",
    ),
]
NameArg = Annotated[str, typer.Argument(help="Name of the MoEDeployment object.")]
NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace; default: 'default'.")
]
