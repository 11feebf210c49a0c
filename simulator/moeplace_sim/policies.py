"""Placements over time: static; the engines' periodic EPLB (rearrange every N steps on the last
window's load, serving stalls meanwhile); the operator's policy, re-solving on its last
calibration window every reconcile and rolling out through ``placement.policy`` (the same
rules the operator runs), paying the weight copies it moves."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

import placement.solvers  # noqa: F401  (registers the strategies)
from moeplace_sim.config import Policy, PolicyKind
from placement.evaluate import Dispatch, evaluate
from placement.model import Cluster, FloatArray, MoEModelShape, Placement
from placement.policy import RolloutMode, RolloutRules, decide_rollout, gain_percent
from placement.problem import Problem, Weights
from placement.solvers.base import SolveOptions, solve

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
MAX_SAMPLES = 8  # load samples the operator hedges on (its bootstrap draws a few, not one per step)


@dataclass(frozen=True)
class Change:
    placement: Placement
    stall_s: float
    reason: str


@dataclass(frozen=True)
class Solver:
    """How placements are solved for one run: model, slots, dispatch, time limit."""

    model: MoEModelShape
    slots_per_gpu: int
    dispatch: Dispatch
    time_limit_s: float
    seed: int = 0
    # with a traffic weight, the solvers also count token pairs changing GPU between layers
    transitions: FloatArray | None = None
    traffic_weight: float = 0.0

    def __call__(
        self,
        strategy: str,
        cluster: Cluster,
        load: FloatArray,
        samples: FloatArray | None = None,
        current: Placement | None = None,
    ) -> Placement:
        redundant = cluster.size * self.slots_per_gpu - self.model.experts
        traffic = self.traffic_weight > 0 and self.transitions is not None
        problem = Problem.build(
            self.model,
            cluster,
            load,
            redundant=redundant,
            samples=samples,
            current=current,
            transitions=self.transitions if traffic else None,
            weights=Weights(traffic=self.traffic_weight if traffic else 0.0),
        )
        options = SolveOptions(
            time_limit_s=self.time_limit_s, seed=self.seed, threads=1, dispatch=self.dispatch
        )
        return solve(problem, strategy, options).placement


@dataclass
class StaticPolicy:
    placement: Placement
    name: str = "static"

    def observe(
        self, now_s: float, load: FloatArray, tokens: int, cluster: Cluster
    ) -> Change | None:
        return None


@dataclass
class EplbPolicy:
    """vLLM's EPLB: the expert load of the last ``window`` steps, rearranged every
    ``interval`` steps with DeepSeek's algorithm; each rearrangement stalls serving."""

    placement: Placement
    solver: Solver
    window: int
    interval: int
    stall_s: float
    name: str = "eplb"
    steps: int = 0
    recent: deque[FloatArray] = field(default_factory=deque)

    def observe(
        self, now_s: float, load: FloatArray, tokens: int, cluster: Cluster
    ) -> Change | None:
        self.steps += 1
        self.recent.append(load)
        if len(self.recent) > self.window:
            self.recent.popleft()
        if self.steps % self.interval:
            return None
        self.placement = self.solver("eplb", cluster, np.sum(self.recent, axis=0))
        return Change(self.placement, self.stall_s, "EplbRearrange")


@dataclass
class OperatorPolicy:
    """Every ``reconcile_s``: solve on the steps holding the last ``window_tokens`` tokens
    (their mean as the load, each step a sample to hedge on), score against the placement in
    service on that window, and roll out when ``placement.policy.decide_rollout`` says so."""

    placement: Placement
    solver: Solver
    strategy: str
    rules: RolloutRules
    reconcile_s: float
    window_tokens: int
    expert_bytes: int
    migration_gbs: float
    migration_fixed_s: float
    name: str = "operator"
    last_reconcile_s: float = 0.0
    last_rollout_s: float | None = None
    recent: deque[tuple[int, FloatArray]] = field(default_factory=deque)
    decisions: list[str] = field(default_factory=list)

    def _window(self) -> FloatArray:
        """The newest steps holding ``window_tokens`` tokens, in at most ``MAX_SAMPLES``
        groups of consecutive steps, each scaled to one mean step."""
        kept, tokens = [], 0
        for step_tokens, load in reversed(self.recent):
            kept.append(load)
            tokens += step_tokens
            if tokens >= self.window_tokens:
                break
        groups = np.array_split(np.stack(kept), min(len(kept), MAX_SAMPLES))
        return np.stack([g.mean(axis=0) for g in groups])

    def observe(
        self, now_s: float, load: FloatArray, tokens: int, cluster: Cluster
    ) -> Change | None:
        self.recent.append((tokens, load))
        while len(self.recent) > 1 and sum(t for t, _ in self.recent) > 4 * self.window_tokens:
            self.recent.popleft()
        if now_s - self.last_reconcile_s < self.reconcile_s:
            return None
        self.last_reconcile_s = now_s
        return self.reconcile(now_s, cluster)

    def reconcile(self, now_s: float, cluster: Cluster) -> Change | None:
        steps = self._window()
        mean = steps.mean(axis=0)
        samples = steps if steps.shape[0] > 1 else None
        proposal = self.solver(self.strategy, cluster, mean, samples, current=self.placement)
        dispatch = self.solver.dispatch
        current = evaluate(self.placement, cluster, mean, dispatch=dispatch)
        scored = evaluate(proposal, cluster, mean, dispatch=dispatch, previous=self.placement)
        decision = decide_rollout(
            rules=self.rules,
            current_hash=self.placement.content_hash(),
            proposed_hash=proposal.content_hash(),
            gain=gain_percent(current.straggler, scored.straggler),
            moved=scored.moved,
            last_rollout=(
                None
                if self.last_rollout_s is None
                else EPOCH + timedelta(seconds=self.last_rollout_s)
            ),
            now=EPOCH + timedelta(seconds=now_s),
        )
        self.decisions.append(decision.reason)
        if not decision.roll:
            return None
        self.placement = proposal
        self.last_rollout_s = now_s
        # the copies load in parallel over the GPUs
        per_gpu = scored.moved / cluster.size * self.expert_bytes
        stall = self.migration_fixed_s + per_gpu / (self.migration_gbs * 1e9)
        return Change(proposal, stall, decision.reason)


PolicyImpl = StaticPolicy | EplbPolicy | OperatorPolicy


def make_policy(
    spec: Policy,
    solver: Solver,
    cluster: Cluster,
    calibration: FloatArray,
    window_tokens: int,
) -> PolicyImpl:
    """The policy and its first placement, solved on the calibration load."""
    if spec.kind is PolicyKind.EPLB:
        first = solver("eplb", cluster, calibration)
        return EplbPolicy(
            first, solver, spec.eplb_window_steps, spec.eplb_interval_steps, spec.eplb_stall_s
        )
    first = solver(spec.strategy, cluster, calibration)
    if spec.kind is PolicyKind.STATIC:
        return StaticPolicy(first, name=f"static-{spec.strategy}")
    rules = RolloutRules(
        mode=RolloutMode.AUTO,
        min_improvement_percent=spec.min_improvement_percent,
        cooldown=timedelta(seconds=spec.cooldown_s),
        max_moved_experts=spec.max_moved_experts,
    )
    return OperatorPolicy(
        first,
        solver,
        spec.strategy,
        rules,
        spec.reconcile_s,
        window_tokens,
        solver.model.expert_bytes,
        spec.migration_gbs,
        spec.migration_fixed_s,
    )
