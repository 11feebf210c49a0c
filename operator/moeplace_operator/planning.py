"""The CPU-bound part of a reconcile: solve, score against the placement in service and EPLB.
Runs in the solver pool (a worker thread), never on the event loop; no Kubernetes I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import placement.solvers  # noqa: F401  (registers the strategies)
from moeplace_operator.build import fits, gain_percent, model_shape
from moeplace_operator.loadsource import LoadData
from moeplace_operator.nodes import GPUGroup
from moeplace_operator.spec import MoEDeploymentSpec
from placement.evaluate import Evaluation, evaluate
from placement.model import Placement
from placement.problem import Problem, Weights
from placement.solvers.base import Solution, SolveOptions, solve
from placement.validate import validate


@dataclass(frozen=True)
class Plan:
    solution: Solution
    proposal: Evaluation  # the solver's placement on the calibration load
    eplb: Evaluation  # DeepSeek EPLB on the same load: the baseline users run today
    current: Evaluation | None  # the placement in service, when it fits this group

    @property
    def gain_over_current(self) -> float:
        return (
            gain_percent(self.current.straggler, self.proposal.straggler) if self.current else 0.0
        )

    @property
    def gain_over_eplb(self) -> float:
        return gain_percent(self.eplb.straggler, self.proposal.straggler)


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
        current=current,
        weights=Weights(
            traffic=spec.placement.traffic_weight, migration=spec.placement.migration_weight
        ),
    )


def plan(
    spec: MoEDeploymentSpec,
    group: GPUGroup,
    load: LoadData,
    current: Placement | None,
    solver_threads: int,
) -> Plan:
    """Solve with the spec's strategy and score it, EPLB and ``current`` on the same load with
    even dispatch (what the engines do)."""
    in_service = fitting(current, spec, group)
    problem = build_problem(spec, group, load, in_service)
    options = SolveOptions(
        time_limit_s=spec.placement.time_limit_seconds,
        seed=spec.placement.seed,
        threads=solver_threads,
        hedge=spec.placement.hedge.value,
    )
    solution = solve(problem, spec.placement.strategy.value, options)
    baseline = solve(problem, "eplb", options)
    cluster = group.cluster
    return Plan(
        solution=solution,
        proposal=evaluate(solution.placement, cluster, load.load, previous=in_service),
        eplb=evaluate(baseline.placement, cluster, load.load),
        current=evaluate(in_service, cluster, load.load) if in_service else None,
    )


def inputs_fingerprint(
    spec: MoEDeploymentSpec, group: GPUGroup, load: LoadData, current: Placement | None
) -> str:
    """Everything a plan depends on: equal fingerprints mean re-solving would only spend CPU
    (a steady state costs no solves, so 100 objects do not queue behind each other)."""
    digest = hashlib.sha256()
    digest.update(spec.model_dump_json().encode())
    digest.update(group.cluster.model_dump_json().encode())
    digest.update(load.load.tobytes())
    if load.samples is not None:
        digest.update(load.samples.tobytes())
    digest.update((current.content_hash() if current else "-").encode())
    return digest.hexdigest()


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
    return evaluate(pinned, group.cluster, load.load)
