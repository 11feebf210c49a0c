"""The simulator's invariants on the real trace: tokens conserved, limits and lower bounds
respected, latency monotone in load, policies acting as specified."""

from pathlib import Path

import numpy as np
import pytest
from moeplace_sim.config import CoTenant, GPUSetup, Links, Policy, Workload
from moeplace_sim.costmodel import ScaledCurve, dispatch_shares
from moeplace_sim.data import h200_layer_curve
from moeplace_sim.sim import routing_trace, simulate
from sim_helpers import PROFILE, small

from placement.evaluate import fluid_bound
from placement.model import Cluster

pytestmark = pytest.mark.simulator


def test_trace_counts_match_direct_counting_with_wrap(shared: Path) -> None:
    trace = routing_trace(shared)
    for start, n in [
        (0, 1),
        (63, 65),
        (1000, 4096),
        (trace.tokens - 100, 300),
        (5, 2 * trace.tokens + 7),
    ]:
        taken = np.take(trace.expert_ids, np.arange(start, start + n), axis=0, mode="wrap")
        direct = np.zeros((trace.layers, trace.experts))
        for layer in range(trace.layers):
            direct[layer] = np.bincount(taken[:, layer].ravel(), minlength=trace.experts)
        np.testing.assert_array_equal(trace.counts(start, n), direct)


def test_every_token_is_served_once(shared: Path) -> None:
    run = simulate(small(shared))
    req, log = run.requests, run.engine.log
    assert run.summary["finished"] == len(req) > 100
    # prefill tokens + one decode step per output token after the first
    assert log.routed_tokens == int(req.prompt.sum() + (req.output - 1).sum())
    assert sum(run.engine.steps.tokens) == log.routed_tokens


def test_limits_and_lower_bounds_hold(shared: Path) -> None:
    workload = Workload(duration_s=4.0, rate_per_gpu=40.0)
    config = small(shared, workload=workload, token_budget_per_gpu=64, max_seqs_per_gpu=16)
    run = simulate(config)
    steps = run.engine.steps
    budget = config.token_budget_per_gpu * config.gpus.num_gpus
    assert max(steps.tokens) == budget  # overloaded: the budget is reached, never passed
    assert max(steps.seqs) == config.max_seqs_per_gpu * config.gpus.num_gpus
    lat = run.latencies
    finite = np.isfinite(lat.e2e_s)
    assert (lat.ttft_s[finite] > 0).all() and (lat.e2e_s[finite] >= lat.ttft_s[finite]).all()
    # a decode token takes at least the fastest step
    assert np.nanmin(lat.tpot_s[finite]) >= min(steps.step_us) * 1e-6 * (1 - 1e-9)
    # each layer's slowest GPU is no faster than all GPUs sharing the layer's tokens perfectly
    times = run.engine.cost.gpu_times
    curve = times.curve  # type: ignore[attr-defined]
    profiled = Cluster.model_validate(
        {"gpus": [{"node": "n", "curve": {"tokens": curve.tokens,
                   "micros": (np.asarray(curve.micros) / s).tolist()}} for s in run.speeds]}
    )  # fmt: skip
    trace = routing_trace(shared)
    load = trace.counts(0, budget)
    cost = run.engine.cost.step(load, budget)
    assert (cost.expert_max_us >= fluid_bound(profiled, load) * (1 - 1e-9)).all()


def test_latency_grows_with_load(shared: Path) -> None:
    p90, step = [], []
    for rate in (10.0, 40.0, 120.0):
        summary = simulate(
            small(shared, workload=Workload(duration_s=4.0, rate_per_gpu=rate))
        ).summary
        p90.append(summary["ttft_s"]["p90"])
        step.append(summary["mean_step_ms"])
    assert p90[0] < p90[1] < p90[2]
    assert step[0] < step[1] < step[2]
    assert p90[2] > 5 * p90[0]  # the overloaded run queues


def test_eplb_rearranges_every_interval_and_stalls(shared: Path) -> None:
    policy = Policy(kind="eplb", eplb_interval_steps=200, eplb_window_steps=50, eplb_stall_s=0.5)
    run = simulate(small(shared, policy=policy))
    steps = len(run.engine.steps.tokens)
    changes = run.engine.steps.changes
    assert len(changes) == steps // 200 > 0
    assert run.summary["stall_s"] == pytest.approx(0.5 * len(changes))


def test_operator_rolls_out_when_a_gpu_slows_and_steps_get_faster(shared: Path) -> None:
    gpus = GPUSetup(
        num_gpus=8, slots_per_gpu=9, spread=0.0,
        cotenants=[CoTenant(at_s=1.0, gpus=[3], slowdown=1.6)],
    )  # fmt: skip
    workload = Workload(duration_s=8.0, rate_per_gpu=20.0)
    base = {"gpus": gpus, "workload": workload}
    static = simulate(small(shared, policy=Policy(kind="static", strategy="greedy"), **base))
    operator = simulate(
        small(
            shared,
            policy=Policy(kind="operator", strategy="greedy", reconcile_s=2.0, cooldown_s=1.0),
            **base,
        )
    )
    reasons = operator.engine.policy.decisions  # type: ignore[union-attr]
    assert "GainAboveThreshold" in reasons
    assert operator.summary["straggler_share"] < static.summary["straggler_share"]
    # steps get faster; the rollout's weight copies are paid as a stall
    assert operator.summary["mean_step_ms"] < static.summary["mean_step_ms"]
    assert operator.summary["stall_s"] > 0 == static.summary["stall_s"]


def test_speed_aware_shares_split_each_expert_fully(shared: Path) -> None:
    run = simulate(small(shared, dispatch="speed-aware", workload=Workload(duration_s=1.0)))
    shares = run.engine.cost.shares
    np.testing.assert_allclose(shares.sum(-1), 1.0, rtol=1e-9)
    placement = run.engine.policy.placement
    held = dispatch_shares(placement, Cluster.uniform(8, 8), "even", np.ones((26, 64))) > 0
    assert (shares[~held] == 0).all()  # no tokens for a GPU without a copy


def test_a_traffic_weight_keeps_more_tokens_on_their_gpu(shared: Path) -> None:
    links = Links(pattern="layer-to-layer")
    plain = simulate(small(shared, links=links))
    policy = Policy(kind="static", strategy="greedy", traffic_weight=1.0)
    weighted = simulate(small(shared, links=links, policy=policy))
    assert weighted.summary["a2a_share"] < plain.summary["a2a_share"]


def test_solvers_see_each_gpus_own_curve_when_curves_are_profiled() -> None:
    speeds = np.array([1.0, 0.8, 1.15])
    truth = ScaledCurve(h200_layer_curve(PROFILE), speeds, flops=5.09)
    labels = truth.cluster(3)
    assert [g.curve for g in labels.gpus] == [None] * 3
    np.testing.assert_allclose(labels.speeds, speeds)
    seen = truth.cluster(3, "curves")
    tokens = np.array([0.0, 3.0, 40.0, 333.0, 1000.0, 2500.0, 4000.0, 9000.0])
    for g, gpu in enumerate(seen.gpus):
        assert gpu.speed == 1.0 and gpu.curve is not None  # the curve carries the speed
        served = truth(np.repeat(tokens[:, None], 3, axis=1))[:, g]
        np.testing.assert_allclose(gpu.time(tokens), served, rtol=0.01)
    # the launch-bound floor stays: a few tokens cost as much as a few hundred
    assert seen.gpus[0].time(3.0) == pytest.approx(seen.gpus[0].time(20.0), rel=1e-6)


def test_a_kv_cache_limit_preempts_and_every_dropped_token_is_routed_again(
    shared: Path,
) -> None:
    free = simulate(small(shared))
    tight = simulate(small(shared, kv_tokens_per_gpu=1000))
    log, req = tight.engine.log, tight.requests
    capacity = 1000 * 8
    assert free.engine.log.max_kv_tokens > capacity  # the limit binds
    assert 0 < log.max_kv_tokens <= capacity
    assert log.preemptions > 0 and tight.summary["finished"] == len(req)
    # each preempted request prefills again what it held (prompt + its tokens so far)
    base = int(req.prompt.sum() + (req.output - 1).sum())
    assert log.routed_tokens == base + log.recomputed_tokens > base
    assert tight.summary["e2e_s"]["p90"] > free.summary["e2e_s"]["p90"]
    tighter = simulate(small(shared, kv_tokens_per_gpu=600))
    assert tighter.summary["e2e_s"]["p90"] > tight.summary["e2e_s"]["p90"]


def test_a_kv_cache_that_can_hold_every_request_changes_nothing(shared: Path) -> None:
    free = simulate(small(shared))
    everything = int((free.requests.prompt + free.requests.output).sum())
    roomy = simulate(small(shared, kv_tokens_per_gpu=everything // 8 + 1))
    assert roomy.engine.log.preemptions == 0
    assert roomy.engine.steps.tokens == free.engine.steps.tokens
    np.testing.assert_array_equal(roomy.engine.log.finish_s, free.engine.log.finish_s)


def test_a_kv_cache_smaller_than_one_request_is_refused(shared: Path) -> None:
    with pytest.raises(ValueError, match="could never finish"):
        simulate(small(shared, kv_tokens_per_gpu=10))
