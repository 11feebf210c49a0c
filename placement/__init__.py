"""Pure placement library: model, load, solvers, evaluator, formats. No Kubernetes, no I/O
beyond explicit file loaders, no global state."""

from placement.dispatch import TimeModel, best_split, even_split
from placement.evaluate import Evaluation, evaluate, fluid_bound, replica_bound
from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape, Placement
from placement.problem import Problem, Weights
from placement.validate import InvalidPlacementError, validate

__all__ = [
    "GPU",
    "Cluster",
    "Evaluation",
    "InvalidPlacementError",
    "LatencyCurve",
    "MoEModelShape",
    "Placement",
    "Problem",
    "TimeModel",
    "Weights",
    "best_split",
    "evaluate",
    "even_split",
    "fluid_bound",
    "replica_bound",
    "validate",
]
