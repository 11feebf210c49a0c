"""A small, fast scenario for the simulator tests (8 GPUs of one node, a few seconds of
traffic) and where the real inputs are."""

from pathlib import Path
from typing import Any

from moeplace_sim.config import GPUSetup, Policy, SimConfig, Workload

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
PROFILE = ROOT / "docs" / "gpu-x4" / "call1" / "layer_profile.json"


def small(shared: Path, **overrides: Any) -> SimConfig:
    """8 GPUs x 9 slots, Poisson arrivals for 8 s; ``overrides`` replace whole sections."""
    fields: dict[str, Any] = {
        "gpus": GPUSetup(num_gpus=8, slots_per_gpu=9, spread=2.0),
        "workload": Workload(duration_s=8.0, rate_per_gpu=8.0),
        "policy": Policy(kind="static", strategy="greedy"),
        "token_budget_per_gpu": 1024,
        "max_seqs_per_gpu": 32,
        "shared": shared,
        "profile": PROFILE,
    }
    return SimConfig(**{**fields, **overrides})
