"""The CPU-bound part of a reconcile: solve, score against the placement in service and EPLB.
Runs in the solver pool (a worker thread), never on the event loop; no Kubernetes I/O."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np

import placement.solvers  # noqa: F401  (registers the strategies)
from moeplace_operator.build import fits, model_shape
from moeplace_operator.loadsource import LoadData
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.spec import Dispatch, MoEDeploymentSpec
from placement.evaluate import Evaluation, evaluate
from placement.model import FloatArray, Placement
from placement.policy import gain_percent
from placement.problem import Problem, Weights
from placement.solvers.base import Solution, SolveOptions, StopSignal, solve
from placement.validate import validate


@dataclass(frozen=True)
class Plan:
    solution: Solution
    proposal: Evaluation  # the solver's placement on the calibration load
    eplb: Evaluation  # DeepSeek EPLB (the better policy) on the same load: what users run
    current: Evaluation | None  # the placement in service, when it fits this group
    traffic_weight: float = 0.0  # with transitions, gains count the traffic term too
    transition_tokens: float = 0.0  # sum of the (scaled) transitions; 0 without them

    def cost(self, scored: Evaluation) -> float:
        """What gains compare: straggler time, plus trafficWeight x tokens changing GPU
        between layers when transitions are known (the solver's objective, so a placement
        that trades straggler time for less traffic is judged as the solver judged it)."""
        if self.traffic_weight <= 0 or not math.isfinite(scored.traffic_share):
            return scored.straggler
        return scored.straggler + self.traffic_weight * scored.traffic_share * (
            self.transition_tokens
        )

    @property
    def gain_over_current(self) -> float:
        return (
            gain_percent(self.cost(self.current), self.cost(self.proposal)) if self.current else 0.0
        )

    @property
    def gain_over_eplb(self) -> float:
        return gain_percent(self.cost(self.eplb), self.cost(self.proposal))


def slots_per_gpu(spec: MoEDeploymentSpec, group: GPUGroup) -> int:
    return (spec.model.experts_per_layer + spec.placement.redundant_experts) // group.cluster.size


def fitting(
    current: Placement | None, spec: MoEDeploymentSpec, group: GPUGroup
) -> Placement | None:
    """The placement in service if it is for this shape and EP group, else None."""
    if current is None:
        return None
    shape = model_shape(spec.model)
    if not fits(current, shape, group.cluster.size, slots_per_gpu(spec, group)):
        return None
    return current


def build_problem(
    spec: MoEDeploymentSpec, group: GPUGroup, load: LoadData, current: Placement | None
) -> Problem:
    return Problem.build(
        model_shape(spec.model),
        group.cluster,
        load.load,
        redundant=spec.placement.redundant_experts,
        samples=load.samples,
        transitions=load.transitions,
        current=current,
        weights=Weights(
            traffic=spec.placement.traffic_weight, migration=spec.placement.migration_weight
        ),
    )


def scored_load(spec: MoEDeploymentSpec, load: LoadData) -> FloatArray:
    """What placements are scored on: [L, E] for even dispatch (the split does not depend on
    the batch); the [K, L, E] samples for speed-aware dispatch, whose split is per batch."""
    if spec.placement.dispatch is Dispatch.SPEED_AWARE and load.samples is not None:
        return load.samples
    return load.load


def score(
    placement: Placement,
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    load: LoadData,
    previous: Placement | None = None,
) -> Evaluation:
    """``placement`` on the spec's scored load, under its dispatch rule."""
    return evaluate(
        placement,
        group.cluster,
        scored_load(spec, load),
        dispatch=spec.placement.dispatch.rule,
        transitions=load.transitions,
        previous=previous,
    )


def plan(
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    load: LoadData,
    current: Placement | None,
    solver_threads: int,
    stop: StopSignal | None = None,
) -> Plan:
    """Solve with the spec's strategy and score it, EPLB and ``current`` on the same load
    under the spec's dispatch rule. EPLB is the better of its two policies (hierarchical,
    global) on this load: what an engine running EPLB would do at best. ``stop`` ends the
    solve early (its best placement so far is returned)."""
    in_service = fitting(current, spec, group)
    problem = build_problem(spec, group, load, in_service)
    options = SolveOptions(
        time_limit_s=spec.placement.time_limit_seconds,
        seed=spec.placement.seed,
        threads=solver_threads,
        hedge=spec.placement.hedge.value,
        dispatch=spec.placement.dispatch.rule,
        stop=stop,
    )
    solution = solve(problem, spec.placement.strategy.value, options)
    policies = [
        score(solve(problem, name, options).placement, spec, group, load)
        for name in ("eplb", "eplb-global")
    ]
    result = Plan(
        solution=solution,
        proposal=score(solution.placement, spec, group, load, previous=in_service),
        eplb=policies[0],
        current=score(in_service, spec, group, load) if in_service else None,
        traffic_weight=spec.placement.traffic_weight,
        transition_tokens=float(load.transitions.sum()) if load.transitions is not None else 0.0,
    )
    return replace(result, eplb=min(policies, key=result.cost))


# A plan stands while the load stays this close to the one it was solved for: Prometheus'
# extrapolated increases move a little at every sub-window, and re-solving for that would
# only spend CPU and rewrite status (200 objects would queue behind each other).
SHARE_TOLERANCE = 0.001  # each expert's share of its layer's tokens: 0.1 percentage point
TOTAL_TOLERANCE = 0.05  # all tokens: 5 %


def inputs_fingerprint(spec: MoEDeploymentSpec, group: GPUGroup, current: Placement | None) -> str:
    """Everything a plan depends on but the load (``load_holds`` judges that): equal
    fingerprints and a load that holds mean re-solving would only spend CPU."""
    digest = hashlib.sha256()
    digest.update(spec.model_dump_json().encode())
    digest.update(group.cluster.model_dump_json().encode())
    digest.update((current.content_hash() if current else "-").encode())
    return digest.hexdigest()


def _shares_hold(solved: FloatArray, now: FloatArray) -> bool:
    """Same shape, each layer's shares (first axis: the layer) within SHARE_TOLERANCE, the
    total within TOTAL_TOLERANCE."""
    if solved.shape != now.shape:
        return False
    rows_then = solved.reshape(solved.shape[0], -1)
    rows_now = now.reshape(now.shape[0], -1)
    shares_then = rows_then / np.maximum(rows_then.sum(axis=1, keepdims=True), 1e-12)
    shares_now = rows_now / np.maximum(rows_now.sum(axis=1, keepdims=True), 1e-12)
    total_then, total_now = float(solved.sum()), float(now.sum())
    return bool(
        np.abs(shares_then - shares_now).max(initial=0.0) <= SHARE_TOLERANCE
        and abs(total_now - total_then) <= TOTAL_TOLERANCE * max(total_then, 1e-12)
    )


def load_holds(solved: LoadData, now: LoadData) -> bool:
    """Whether a plan solved for load ``solved`` still stands for ``now``: the per-layer
    expert shares and the total (and likewise the layer-to-layer transitions) within the
    tolerances. The hedging samples are not compared: they follow from the load."""
    if (solved.samples is None) != (now.samples is None):
        return False
    if (solved.transitions is None) != (now.transitions is None):
        return False
    if solved.transitions is not None and now.transitions is not None:
        return _shares_hold(solved.transitions, now.transitions) and _shares_hold(
            solved.load, now.load
        )
    return _shares_hold(solved.load, now.load)


def score_pinned(
    pinned: Placement, spec: MoEDeploymentSpec, group: GPUGroup, load: LoadData
) -> Evaluation:
    """Validate the pinned placement against this spec and group, then score it.

    Raises InvalidPlacementError or ValueError with a readable message."""
    validate(pinned, model_shape(spec.model))
    if fitting(pinned, spec, group) is None:
        raise ValueError(
            f"pinned placement is for {pinned.num_gpus} GPUs x {pinned.slots_per_gpu} slots, "
            f"the EP group has {group.cluster.size} GPUs x {slots_per_gpu(spec, group)} slots"
        )
    return score(pinned, spec, group, load)
