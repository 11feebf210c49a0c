"""One interface for every solver: ``solve(problem, strategy, options) -> Solution``.

Every solver returns a placement that has passed :func:`placement.validate.validate` (EPLB's
with two copies of one expert on one GPU allowed, as the engines run it); the
objective and bound it reports are in the problem's time unit (µs with latency curves,
token-times with speed factors), summed over layers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from placement.evaluate import evaluate, fluid_bound
from placement.model import IntArray, Placement
from placement.problem import Problem
from placement.validate import validate

# a cooperative stop request: set the event, or make the callable return True
StopSignal = threading.Event | Callable[[], bool]


def stop_requested(stop: StopSignal | None) -> bool:
    """Whether ``stop`` (``SolveOptions.stop``) asks the solver to stop now."""
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


@dataclass(frozen=True)
class SolveOptions:
    time_limit_s: float = 10.0
    seed: int = 0
    threads: int = 0  # 0: all cores
    # "expected" (mean over samples) or "robust" (worst sample) straggler time
    hedge: str = "expected"
    # how the engine splits an expert's tokens over its copies: "even" (vLLM, SGLang) or
    # "speed-aware" (the best split per batch); cpsat places copies for it
    dispatch: str = "even"
    progress: Callable[[float], None] | None = None  # called with fraction done, 0..1
    # cancels a running solve (cpsat; the heuristics finish in well under a second): it
    # returns soon after with the best placement found so far (``details["stopped"] == 1``)
    stop: StopSignal | None = None


@dataclass(frozen=True)
class Solution:
    placement: Placement
    objective: float  # the solver's objective (lower is better)
    bound: float  # proven lower bound on that objective (== objective for heuristics' LB)
    wall_s: float
    status: str  # "OPTIMAL", "FEASIBLE", "HEURISTIC"
    details: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """Relative gap (objective - bound) / objective; 0 when proven optimal."""
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.bound) / self.objective)


SolverFn = Callable[[Problem, SolveOptions], Solution]
_REGISTRY: dict[str, SolverFn] = {}
_DUPLICATES_ON_GPU: set[str] = set()  # strategies whose output may hold two copies on a GPU


def register(name: str, duplicates_on_gpu: bool = False) -> Callable[[SolverFn], SolverFn]:
    """Register a solver; ``duplicates_on_gpu`` for a baseline reproduced as the engines run
    it (DeepSeek's EPLB), the only ones exempt from the no-two-copies-per-GPU rule."""

    def wrap(fn: SolverFn) -> SolverFn:
        _REGISTRY[name] = fn
        if duplicates_on_gpu:
            _DUPLICATES_ON_GPU.add(name)
        return fn

    return wrap


def heuristic_solution(
    problem: Problem,
    table: IntArray,
    name: str,
    started: float,
    details: dict[str, float] | None = None,
) -> Solution:
    """A heuristic's [L, P] ``table`` as a :class:`Solution`: objective = straggler time on the
    problem's mean load (even split), bound = the fluid bound; ``started`` from perf_counter."""
    placement = Placement.from_table(table, problem.model, problem.cluster.size, name)
    return Solution(
        placement=placement,
        objective=evaluate(placement, problem.cluster, problem.load).straggler,
        bound=float(fluid_bound(problem.cluster, problem.load).sum()),
        wall_s=time.perf_counter() - started,
        status="HEURISTIC",
        details=details or {},
    )


def strategies() -> list[str]:
    return sorted(_REGISTRY)


def solve(
    problem: Problem, strategy: str = "cpsat", options: SolveOptions | None = None
) -> Solution:
    """Solve ``problem`` with ``strategy`` and check the result independently."""
    if strategy not in _REGISTRY:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {strategies()}")
    solution = _REGISTRY[strategy](problem, options or SolveOptions())
    validate(solution.placement, problem.model, allow_duplicates=strategy in _DUPLICATES_ON_GPU)
    return solution
