"""Solvers behind one interface: ``solve(problem, strategy, options)``.

Importing this package registers every strategy: ``linear``, ``round-robin``, ``eplb``,
``greedy`` and, where its module is present, ``cpsat``.
"""

from importlib import import_module
from importlib.util import find_spec

from placement.solvers import baselines, eplb, greedy
from placement.solvers.base import Solution, SolveOptions, register, solve, strategies

if find_spec("placement.solvers.cpsat") is not None:
    import_module("placement.solvers.cpsat")

__all__ = [
    "Solution",
    "SolveOptions",
    "baselines",
    "eplb",
    "greedy",
    "register",
    "solve",
    "strategies",
]
