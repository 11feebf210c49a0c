"""The solve-and-score step on a small shape, and on the real routing data when present."""

from pathlib import Path

import numpy as np
import pytest
from moeplace_operator.build import fits, model_shape
from moeplace_operator.loadsource import LoadData, parse_load_csv
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.planning import inputs_fingerprint, plan, score_pinned
from moeplace_operator.spec import MoEDeploymentSpec

from placement.model import Cluster

REAL_CSV = (
    Path(__file__).resolve().parents[3]
    / "shared/data/routing/deepseek-v2-lite-chat/expert_counts.csv"
)


def spec(
    layers: int, experts: int, nodes: int, gpus: int, strategy: str = "cpsat"
) -> MoEDeploymentSpec:
    return MoEDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "moeLayers": layers, "expertsPerLayer": experts, "topK": 2},
            "gpus": {"nodeSelector": {"p": "a"}, "nodeCount": nodes, "gpusPerNode": gpus},
            "placement": {"strategy": strategy, "timeLimitSeconds": 2},
            "load": {"static": {"configMapName": "load"}},
        }
    )


def group(speeds: list[float], per_node: int) -> GPUGroup:
    cluster = Cluster.uniform(len(speeds), per_node, speeds)
    return GPUGroup(cluster, cluster.nodes, [])


def test_plan_scores_proposal_eplb_and_current() -> None:
    s = spec(2, 8, 1, 4)
    g = group([0.8, 1.0, 1.0, 1.2], 4)
    rng = np.random.default_rng(0)
    load = LoadData(rng.integers(10, 1000, size=(2, 8)).astype(float), None, "test")
    first = plan(s, g, load, None, solver_threads=1)
    assert first.current is None and first.gain_over_current == 0.0
    assert fits(first.solution.placement, model_shape(s.model), 4, 2)
    assert first.proposal.straggler <= first.eplb.straggler + 1e-9
    second = plan(s, g, load, first.solution.placement, solver_threads=1)
    assert second.current is not None
    assert second.current.straggler == pytest.approx(first.proposal.straggler)


def test_pinned_placement_must_fit_the_group() -> None:
    s = spec(2, 8, 1, 4)
    load = LoadData(np.ones((2, 8)), None, "test")
    pinned = plan(s, group([1.0] * 4, 4), load, None, solver_threads=1).solution.placement
    with pytest.raises(ValueError, match="GPUs"):
        score_pinned(pinned, spec(2, 8, 1, 2), group([1.0] * 2, 2), load)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CSV.exists(), reason="../shared/data absent")
def test_real_shape_beats_eplb_with_speed_spread() -> None:
    s = spec(26, 64, 4, 8)
    load = LoadData(parse_load_csv(REAL_CSV.read_text(), s.model), None, "real")
    speeds = list(np.linspace(0.8, 1.2, 32))
    result = plan(s, group(speeds, 8), load, None, solver_threads=1)
    assert result.gain_over_eplb > 5.0


def test_fingerprint_tracks_every_input() -> None:
    s, g = spec(2, 8, 1, 4), group([1.0, 1.0, 1.0, 1.2], 4)
    load = LoadData(np.ones((2, 8)), None, "a")
    base = inputs_fingerprint(s, g, load, None)
    assert base == inputs_fingerprint(s, g, LoadData(np.ones((2, 8)), None, "b"), None)
    assert base != inputs_fingerprint(s, g, LoadData(np.full((2, 8), 2.0), None, "a"), None)
    assert base != inputs_fingerprint(s, group([1.0] * 4, 4), load, None)
    assert base != inputs_fingerprint(spec(2, 8, 1, 4, "greedy"), g, load, None)
