"""Helpers for the ``moeplace`` command-line tests: small synthetic input files, a runner."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moeplace_cli.main import app
from typer.testing import CliRunner

from placement.gpus import GPUProfile
from placement.model import GPU, Cluster, LatencyCurve

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ROUTING = SHARED / "routing" / "deepseek-v2-lite-chat"
PAL = SHARED / "gpu-variability" / "pal-v100-rtx5000-a100" / "32gpu-variability.csv"
H200 = SHARED / "gpu-variability" / "h200-pair" / "expert_ffn_latency_graphs.json"

LAYERS, EXPERTS, GPUS, PROMPTS = 3, 8, 4, 40
FIRST_LAYER = 1  # as in the real CSV: model layer 0 is dense


@dataclass(frozen=True)
class Scenario:
    load: Path
    gpus: Path
    profile: Path
    transitions: Path
    samples: Path  # per-prompt counts npz: counts [PROMPTS, LAYERS, EXPERTS]
    tmp: Path


def write_load(path: Path, load: np.ndarray, first_layer: int = FIRST_LAYER) -> Path:
    lines = ["moe_layer_index,expert_id,count"]
    for layer, row in enumerate(load):
        lines += [f"{first_layer + layer},{e},{int(c)}" for e, c in enumerate(row)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_gpus(path: Path, speeds: Sequence[float], per_node: int = 2) -> Path:
    rows = [f"{g},n{g // per_node},{s}" for g, s in enumerate(speeds)]
    path.write_text("gpu,node,speed\n" + "\n".join(rows) + "\n")
    return path


def write_profile(path: Path) -> Path:
    base = np.array([10.0, 12.0, 30.0, 200.0])
    gpus = [
        GPU(
            node=f"n{g // 2}",
            curve=LatencyCurve(tokens=[1, 64, 256, 2048], micros=(base * f).tolist()),
        )
        for g, f in enumerate([1.0, 1.1, 0.95, 1.0])
    ]
    path.write_text(GPUProfile.from_cluster(Cluster(gpus=gpus)).to_json())
    return path


def make_scenario(tmp_path: Path) -> Scenario:
    rng = np.random.default_rng(7)
    load = rng.integers(50, 1000, size=(LAYERS, EXPERTS))
    trans = rng.integers(0, 50, size=(LAYERS - 1, EXPERTS, EXPERTS))
    np.save(tmp_path / "trans.npy", trans)
    per_prompt = rng.poisson(
        lam=rng.uniform(1, 20, size=(LAYERS, EXPERTS)), size=(PROMPTS, LAYERS, EXPERTS)
    )
    np.savez(tmp_path / "per_prompt.npz", counts=per_prompt.astype(np.int32))
    return Scenario(
        load=write_load(tmp_path / "load.csv", load),
        gpus=write_gpus(tmp_path / "gpus.csv", [1.0, 0.9, 1.1, 1.0]),
        profile=write_profile(tmp_path / "profile.json"),
        transitions=tmp_path / "trans.npy",
        samples=tmp_path / "per_prompt.npz",
        tmp=tmp_path,
    )


@dataclass(frozen=True)
class Ran:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        value = json.loads(self.stdout)
        assert isinstance(value, dict)
        return value


def run(*args: str | Path) -> Ran:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)
