"""Decide: the plan for this pass (cached while its inputs are unchanged, else solved in the
solver pool) and whether its candidate replaces the placement in service (the rules are
``placement.policy.decide_rollout``; this picks what they compare)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from moeplace_operator import metrics
from moeplace_operator.build import Published
from moeplace_operator.faultpoints import crash_point
from moeplace_operator.loadsource import LoadData, parse_duration
from moeplace_operator.nodes import GPUGroup, NodesUnavailableError, build_gpu_group
from moeplace_operator.planning import Plan, fitting, inputs_fingerprint, load_holds, plan
from moeplace_operator.runtime import CachedPlan, Context, DegradedError, SupersededError
from moeplace_operator.spec import ConditionType, MoEDeploymentSpec, RolloutSpec
from moeplace_operator.status import false
from placement.evaluate import Evaluation
from placement.model import Placement
from placement.policy import Decision, RolloutRules, decide_rollout, gain_percent

SUPERSEDED_POLL_S = 0.5  # how often a waiting pass checks that its solve still matters


async def plan_for(
    ctx: Context,
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    load: LoadData,
    current: Placement | None,
) -> tuple[Plan, datetime]:
    """The plan and when it was solved: the cached one while the inputs' fingerprint holds
    and the load stays within tolerance of the one it was solved for."""
    fingerprint = inputs_fingerprint(spec, group, current)
    cached = ctx.runtime.plans.get(ctx.key)
    if cached and cached.fingerprint == fingerprint and load_holds(cached.load, load):
        return cached.plan, cached.solved_at
    strategy = spec.placement.strategy.value
    started = time.monotonic()
    try:
        with metrics.SOLVES_IN_FLIGHT.track_inprogress():
            result = await solve_unless_superseded(ctx, spec, group, load, current)
    except (SupersededError, asyncio.CancelledError):
        metrics.SOLVES.labels(strategy, "SUPERSEDED").inc()
        raise
    except Exception as error:  # a solver bug must not take the operator down
        ctx.logger.exception("solve failed")
        metrics.SOLVES.labels(strategy, "ERROR").inc()
        update = false(ConditionType.PLACEMENT_SOLVED, "SolveFailed", str(error))
        raise DegradedError("SolveFailed", f"{strategy}: {error}", [update]) from error
    crash_point("after-solve")
    metrics.SOLVES.labels(strategy, result.solution.status).inc()
    metrics.SOLVE_SECONDS.labels(strategy).observe(time.monotonic() - started)
    metrics.PREDICTED_GAIN.labels(ctx.namespace, ctx.name).set(result.gain_over_current)
    metrics.GAIN_OVER_EPLB.labels(ctx.namespace, ctx.name).set(result.gain_over_eplb)
    ctx.runtime.plans[ctx.key] = CachedPlan(fingerprint, load, result, ctx.now)
    return result, ctx.now


async def solve_unless_superseded(
    ctx: Context,
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    load: LoadData,
    current: Placement | None,
) -> Plan:
    """``plan`` in the solver pool, stopped (its thread freed within a second) as soon as
    the pass no longer matters (``superseded``) or is cancelled: a solve may run for the
    spec's whole time limit, up to 600 s, queued or not."""
    stop = threading.Event()
    threads = ctx.runtime.solver_threads
    solving = asyncio.ensure_future(
        ctx.runtime.solve(plan, spec, group, load, current, threads, stop)
    )
    watched = Superseded(ctx, spec, group)
    try:
        while not solving.done():
            reason = watched.reason()
            if reason is not None:
                stop.set()
                solving.cancel()  # still queued: never starts; running: ends at the stop
                raise SupersededError(reason)
            await asyncio.wait({solving}, timeout=SUPERSEDED_POLL_S)
    except BaseException:
        stop.set()
        raise
    return solving.result()


class Superseded:
    """Why a pass's solve no longer matters, polled while it waits: the daemon stopping,
    a new generation, or another EP group (built again only when a Node changed)."""

    def __init__(self, ctx: Context, spec: MoEDeploymentSpec, group: GPUGroup) -> None:
        self.ctx, self.spec, self.group = ctx, spec, group
        self.nodes_version = ctx.live.nodes_version()

    def reason(self) -> str | None:
        live = self.ctx.live
        if live.stopping():
            return "the object is being deleted or the operator stops"
        if self.ctx.generation != self.ctx.started_generation:
            return f"the spec changed (generation {self.ctx.generation})"
        version = live.nodes_version()
        if version == self.nodes_version or self.ctx.live_nodes is None:
            return None
        self.nodes_version = version
        try:
            # the group's own nodes as the ranks to keep: what this pass would build now
            now = build_gpu_group(self.ctx.live_nodes(), self.spec.gpus, self.group.nodes)
        except NodesUnavailableError as error:
            return f"the EP group changed: {error}"
        return "the EP group changed" if now.cluster != self.group.cluster else None


@dataclass(frozen=True)
class Choice:
    """The candidate (the solver's proposal, or the Pinned placement), its figures, the gain
    it would bring, and whether it rolls out."""

    candidate: Placement
    evaluation: Evaluation
    gain: float
    decision: Decision


def rollout_rules(rollout: RolloutSpec) -> RolloutRules:
    return RolloutRules(
        mode=rollout.mode,
        min_improvement_percent=rollout.min_improvement_percent,
        cooldown=parse_duration(rollout.cooldown),
        max_moved_experts=rollout.max_moved_experts,
    )


def choose(
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    result: Plan,
    pinned: tuple[Placement, Evaluation] | None,
    in_service: Published | None,
    now: datetime,
) -> Choice:
    candidate, evaluation = pinned or (result.solution.placement, result.proposal)
    # Pinned: how much the best proposal would gain over what git holds
    gain = (
        gain_percent(result.cost(pinned[1]), result.cost(result.proposal))
        if pinned
        else result.gain_over_current
    )
    current = in_service.placement if in_service else None
    in_service_fits = in_service is not None and fitting(current, spec, group) is not None
    decision = decide_rollout(
        rules=rollout_rules(spec.rollout),
        current_hash=in_service.hash if in_service and in_service_fits else None,
        proposed_hash=candidate.content_hash(),
        gain=gain,
        moved=result.proposal.moved,
        last_rollout=in_service.rolled_out_at if in_service else None,
        now=now,
    )
    return Choice(candidate, evaluation, gain, decision)
