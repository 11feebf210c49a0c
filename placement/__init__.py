"""Pure placement library: model, load, solvers, evaluator, formats. No Kubernetes, no I/O
beyond explicit file loaders, no global state."""

from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape, Placement
from placement.problem import Problem, Weights
from placement.validate import InvalidPlacementError, validate

__all__ = [
    "GPU",
    "Cluster",
    "InvalidPlacementError",
    "LatencyCurve",
    "MoEModelShape",
    "Placement",
    "Problem",
    "Weights",
    "validate",
]
