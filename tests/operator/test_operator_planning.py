"""The solve-and-score step on a small shape, and on the real routing data when present."""

from pathlib import Path

import numpy as np
import pytest
from moeplace_operator.build import fits, model_shape
from moeplace_operator.loadsource import LoadData, parse_load_csv
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.planning import inputs_fingerprint, plan, score_pinned
from moeplace_operator.spec import MoEDeploymentSpec

from placement.evaluate import evaluate
from placement.model import Cluster
from placement.problem import Problem
from placement.solvers import solve

REAL_CSV = (
    Path(__file__).resolve().parents[3]
    / "shared/data/routing/deepseek-v2-lite-chat/expert_counts.csv"
)


def spec(
    layers: int,
    experts: int,
    nodes: int,
    gpus: int,
    strategy: str = "cpsat",
    **placement: object,
) -> MoEDeploymentSpec:
    return MoEDeploymentSpec.model_validate(
        {
            "model": {
                "name": "m",
                "moeLayers": layers,
                "expertsPerLayer": experts,
                "topK": 2,
                "denseLayersBefore": 0,
                "hiddenLayers": layers,
            },
            "gpus": {"nodeSelector": {"p": "a"}, "nodeCount": nodes, "gpusPerNode": gpus},
            "placement": {"strategy": strategy, "timeLimitSeconds": 2, **placement},
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


def test_fingerprint_tracks_every_input_but_the_load() -> None:
    s, g = spec(2, 8, 1, 4), group([1.0, 1.0, 1.0, 1.2], 4)
    base = inputs_fingerprint(s, g, None)
    placed = plan(s, g, LoadData(np.ones((2, 8)), None, "a"), None, solver_threads=1)
    assert base != inputs_fingerprint(s, group([1.0] * 4, 4), None)
    assert base != inputs_fingerprint(spec(2, 8, 1, 4, "greedy"), g, None)
    assert base != inputs_fingerprint(s, g, placed.solution.placement)


def test_eplb_baseline_is_the_better_of_its_two_policies() -> None:
    rng = np.random.default_rng(3)
    load = LoadData(np.floor(rng.pareto(1.2, (3, 16)) * 100) + 1, None, "test")
    s, g = spec(3, 16, 2, 4, redundantExperts=8), group([1.0] * 8, 4)
    result = plan(s, g, load, None, solver_threads=1)
    model = model_shape(s.model)
    problem = Problem.build(model, g.cluster, load.load, redundant=8)
    policies = [
        evaluate(solve(problem, name).placement, g.cluster, load.load).straggler
        for name in ("eplb", "eplb-global")
    ]
    assert result.eplb.straggler == pytest.approx(min(policies))


def test_speed_aware_dispatch_places_and_scores_per_batch() -> None:
    rng = np.random.default_rng(5)
    samples = np.floor(rng.pareto(1.3, (4, 2, 16)) * 60) + 1
    load = LoadData(samples.mean(0), samples, "test")
    g = group(list(rng.uniform(0.8, 1.2, 8)), 4)
    even = plan(spec(2, 16, 2, 4, redundantExperts=8), g, load, None, solver_threads=1)
    aware = plan(
        spec(2, 16, 2, 4, redundantExperts=8, dispatch="speed-aware"),
        g,
        load,
        None,
        solver_threads=1,
    )
    assert (even.proposal.dispatch, aware.proposal.dispatch) == ("even", "speed-aware")
    assert aware.eplb.dispatch == "speed-aware" and aware.proposal.layer_time.shape == (4, 2)
    # scored per batch with the best split: never worse than the same placement split evenly
    split_evenly = evaluate(aware.solution.placement, g.cluster, samples).straggler
    assert aware.proposal.straggler <= split_evenly + 1e-9
    # and cpsat placed its copies for that dispatcher: no worse than the even-split placement
    even_placement_best_split = evaluate(
        even.solution.placement, g.cluster, samples, dispatch="speed-aware"
    ).straggler
    assert aware.proposal.straggler <= even_placement_best_split * (1 + 1e-9)
