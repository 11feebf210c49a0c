"""Real routing (DeepSeek-V2-Lite-Chat) on PAL speed factors; skipped without ../shared/data.

Calibrate on prompts 1..500, score on 501..1000 (the placement never sees that load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from placement.evaluate import evaluate
from placement.load import (
    LoadModelConfig,
    estimate,
    read_counts_csv,
    read_per_prompt,
    read_transitions,
    windows,
)
from placement.model import Cluster, MoEModelShape
from placement.problem import Problem
from placement.solvers import solve

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ROUTING = DATA / "routing" / "deepseek-v2-lite-chat"
PAL = DATA / "gpu-variability" / "pal-v100-rtx5000-a100" / "32gpu-variability.csv"
pytestmark = pytest.mark.skipif(
    not (ROUTING.is_dir() and PAL.is_file()), reason="shared routing/GPU data absent"
)
MODEL = MoEModelShape(name="deepseek-v2-lite-chat", moe_layers=26, experts=64, top_k=6)


def _cluster() -> Cluster:
    from placement.gpus import pal_cluster

    return pal_cluster(PAL, "A")


def test_files_load() -> None:
    load, ids = read_counts_csv(ROUTING / "expert_counts.csv")
    assert load.shape == (26, 64) and ids == list(range(1, 27))
    per_prompt = read_per_prompt(ROUTING / "per_prompt_expert_counts.npz")
    assert per_prompt.shape == (999, 26, 64)
    # every token picks 6 experts per layer
    assert np.allclose(load.sum(-1), load.sum(-1)[0])
    np.testing.assert_allclose(per_prompt.sum(0), load)
    assert read_transitions(ROUTING / "layer_transition_counts.npy").shape == (25, 64, 64)


def test_greedy_beats_eplb_on_held_out_load() -> None:
    per_prompt = read_per_prompt(ROUTING / "per_prompt_expert_counts.npz")
    cluster = _cluster()
    history = windows(per_prompt, 100, stop=500)
    est = estimate(history, LoadModelConfig())
    held_out = windows(per_prompt, 100, start=500)
    problem = Problem.build(MODEL, cluster, est.mean, redundant=32, samples=est.samples)
    results = {}
    for strategy in ("eplb", "eplb-global", "greedy"):
        p = solve(problem, strategy).placement
        results[strategy] = (
            evaluate(p, cluster, held_out),
            evaluate(p, cluster, held_out, dispatch="speed-aware"),
        )
    eplb_even = min(results["eplb"][0].straggler, results["eplb-global"][0].straggler)
    greedy_even, greedy_best = results["greedy"]
    assert greedy_even.straggler < eplb_even
    assert greedy_best.straggler < greedy_even.straggler
    assert greedy_best.ratio < 1.15  # measured 1.10 (fluid bound per 100-prompt window)
    # bounds hold on real data too
    assert (greedy_best.layer_time >= greedy_best.layer_fluid * (1 - 1e-9)).all()


def test_transitions_give_traffic_share() -> None:
    trans = read_transitions(ROUTING / "layer_transition_counts.npy")
    load, _ = read_counts_csv(ROUTING / "expert_counts.csv")
    cluster = _cluster()
    problem = Problem.build(MODEL, cluster, load, redundant=32)
    ev = evaluate(solve(problem, "round-robin").placement, cluster, load, transitions=trans)
    assert 0.9 < ev.traffic_share < 1.0  # 32 GPUs: a token mostly changes GPU
