"""One simulated run from a :class:`SimConfig`: load the data, draw the GPUs, solve the first
placement on the calibration prompts, serve the rest of the trace, summarize."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplace_sim.config import SimConfig
from moeplace_sim.costmodel import CostModel, ScaledCurve, dispatch_shares
from moeplace_sim.data import RoutingTrace, h200_layer_curve, measured_speeds, sample_speeds
from moeplace_sim.engine import Engine
from moeplace_sim.metrics import Latencies, summarize
from moeplace_sim.policies import Change, Solver, make_policy
from moeplace_sim.workload import Requests, make_requests
from placement.model import Cluster, FloatArray, MoEModelShape

# DeepSeek-V2-Lite: one dense layer first; an expert is gate, up and down of 2048 x 1408, bf16
EXPERT_BYTES = 3 * 2048 * 1408 * 2
DENSE_LAYERS = 1


@functools.cache
def routing_trace(shared: Path) -> RoutingTrace:
    return RoutingTrace.load(shared)


@functools.cache
def speed_pool(shared: Path) -> FloatArray:
    return measured_speeds(shared)


@dataclass
class Run:
    config: SimConfig
    requests: Requests
    engine: Engine
    speeds: FloatArray  # as drawn, before any co-tenant
    summary: dict[str, Any]

    @property
    def latencies(self) -> Latencies:
        return Latencies.of(self.requests, self.engine.log)


def model_shape(trace: RoutingTrace) -> MoEModelShape:
    return MoEModelShape(
        name="deepseek-v2-lite",
        moe_layers=trace.layers,
        experts=trace.experts,
        top_k=trace.top_k,
        expert_bytes=EXPERT_BYTES,
        dense_layers_before=DENSE_LAYERS,
    )


def calibration(config: SimConfig, trace: RoutingTrace) -> tuple[FloatArray, int]:
    """The first ``calibration_prompts`` prompts' load, at the scale of a full decode step
    (curves are not linear: solvers must see loads of the size they will serve), and where
    serving starts in the trace (after them: the served load is held out)."""
    tokens = int(trace.prompt_lengths[: config.calibration_prompts].sum())
    step_tokens = config.gpus.num_gpus * config.max_seqs_per_gpu
    return trace.counts(0, tokens) * (step_tokens / tokens), tokens


def simulate(config: SimConfig) -> Run:
    trace = routing_trace(config.shared)
    setup = config.gpus
    speeds = sample_speeds(speed_pool(config.shared), setup.num_gpus, setup.spread, config.seed)
    times = ScaledCurve(h200_layer_curve(config.profile), speeds, setup.compute_scale)
    cluster = times.cluster(setup.gpus_per_node, setup.solver_sees)
    model = model_shape(trace)
    calib, start = calibration(config, trace)
    solver = Solver(
        model,
        setup.slots_per_gpu,
        config.dispatch,
        config.policy.time_limit_s,
        # the trace's transitions at the calibration load's scale
        transitions=trace.transitions * (calib.sum() / trace.layers / trace.top_k / trace.tokens),
        traffic_weight=config.policy.traffic_weight,
    )
    mean_prompt = float(trace.prompt_lengths.mean())
    window_tokens = int(config.policy.window_prompts * mean_prompt)
    policy = make_policy(config.policy, solver, cluster, calib, window_tokens)
    cost = CostModel(
        gpu_times=times,
        num_gpus=setup.num_gpus,
        gpus_per_node=setup.gpus_per_node,
        links=config.links,
        dense_layers=DENSE_LAYERS,
        dense_fixed_us=config.dense_fixed_us,
        dense_us_per_token=config.dense_us_per_token,
        transitions=trace.transitions,
    )
    current = {"cluster": cluster}

    def apply(change: Change) -> None:
        shares = dispatch_shares(change.placement, current["cluster"], config.dispatch, calib)
        cost.use(change.placement, shares)

    apply(Change(policy.placement, 0.0, "Initial"))
    pending = sorted(setup.cotenants, key=lambda c: c.at_s)
    first = [True]

    def cluster_at(now: float) -> Cluster | None:
        changed = first[0]
        first[0] = False
        while pending and pending[0].at_s <= now:
            event = pending.pop(0)
            slowed = times.speeds.copy()
            slowed[event.gpus] /= event.slowdown
            times.speeds = slowed
            changed = True
        if changed:
            current["cluster"] = times.cluster(setup.gpus_per_node, setup.solver_sees)
            return current["cluster"]
        return None

    requests = make_requests(
        config.workload, setup.num_gpus, trace.prompt_lengths[config.calibration_prompts :],
        config.seed,
    )  # fmt: skip
    engine = Engine(
        requests,
        token_budget=config.token_budget_per_gpu * setup.num_gpus,
        max_seqs=config.max_seqs_per_gpu * setup.num_gpus,
        trace=trace,
        cost=cost,
        policy=policy,
        cluster_at=cluster_at,
        on_change=apply,
        start_token=start,
        kv_capacity=None
        if config.kv_tokens_per_gpu is None
        else config.kv_tokens_per_gpu * setup.num_gpus,
    )
    engine.run(config.max_time_s or 3 * config.workload.duration_s)
    summary = summarize(requests, engine.log, engine.steps, config.slo_ttft_s, config.slo_tpot_s)
    summary["policy"] = policy.name
    summary["speed_min_max"] = [float(np.min(speeds)), float(np.max(speeds))]
    return Run(config, requests, engine, speeds, summary)
