"""Strategy names the command line accepts: the library's registered strategies, plus
``cpsat-best``, cpsat placing copies for a speed-aware dispatcher that splits each batch
optimally over them (cpsat with ``SolveOptions(dispatch="speed-aware")``; not a registered
strategy). A
strategy the library registers under the same name takes precedence."""

from __future__ import annotations

from dataclasses import replace

from moeplace_cli.errors import CliError
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions

CPSAT_BEST = "cpsat-best"


def available() -> list[str]:
    from placement.solvers import strategies

    names = strategies()
    if "cpsat" in names and CPSAT_BEST not in names:
        names.append(CPSAT_BEST)
    return sorted(names)


def check(name: str) -> None:
    names = available()
    if name not in names:
        raise CliError(f"unknown strategy {name!r}; choose from {', '.join(names)}")


def defaults(speed_aware: bool) -> list[str]:
    """``compare``'s strategies: every registered one, plus cpsat-best when scoring with the
    speed-aware split."""
    from placement.solvers import strategies

    return available() if speed_aware else strategies()


def solve_named(problem: Problem, name: str, options: SolveOptions) -> Solution:
    """Solve with ``name``; the result is validated against the problem's model."""
    from placement.solvers import solve, strategies

    if name in strategies():
        return solve(problem, name, options)
    if name != CPSAT_BEST:
        raise CliError(f"unknown strategy {name!r}; choose from {', '.join(available())}")
    return solve(problem, "cpsat", replace(options, dispatch="speed-aware"))
