"""Decide: the plan for this pass (cached while its inputs are unchanged, else solved in the
solver pool) and whether its candidate replaces the placement in service (the rules are
``placement.policy.decide_rollout``; this picks what they compare)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from moeplace_operator import metrics
from moeplace_operator.build import Published
from moeplace_operator.faultpoints import crash_point
from moeplace_operator.loadsource import LoadData, parse_duration
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.planning import Plan, fitting, inputs_fingerprint, plan
from moeplace_operator.runtime import Context, DegradedError
from moeplace_operator.spec import ConditionType, MoEDeploymentSpec, RolloutSpec
from moeplace_operator.status import false
from placement.evaluate import Evaluation
from placement.model import Placement
from placement.policy import Decision, RolloutRules, decide_rollout, gain_percent


async def plan_for(
    ctx: Context,
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    load: LoadData,
    current: Placement | None,
) -> tuple[Plan, datetime]:
    """The plan and when it was solved: the cached one while the inputs' fingerprint holds."""
    fingerprint = inputs_fingerprint(spec, group, load, current)
    cached = ctx.runtime.plans.get(ctx.key)
    if cached and cached[0] == fingerprint:
        return cached[1], cached[2]
    strategy = spec.placement.strategy.value
    started = time.monotonic()
    try:
        with metrics.SOLVES_IN_FLIGHT.track_inprogress():
            result = await ctx.runtime.solve(
                plan, spec, group, load, current, ctx.runtime.solver_threads
            )
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
    ctx.runtime.plans[ctx.key] = (fingerprint, result, ctx.now)
    return result, ctx.now


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
