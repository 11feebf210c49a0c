"""Pure placement library: model, load, solvers, evaluator, formats. No Kubernetes, no I/O
beyond explicit file loaders, no global state."""

from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape, Placement
from placement.problem import Problem, Weights
from placement.validate import InvalidPlacement, validate

__all__ = [
    "GPU",
    "Cluster",
    "InvalidPlacement",
    "LatencyCurve",
    "MoEModelShape",
    "Placement",
    "Problem",
    "Weights",
    "validate",
]
