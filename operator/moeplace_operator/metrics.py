"""The operator's own Prometheus metrics, served on ``/metrics`` by the entry point. Labels
stay bounded: strategy, outcome, reason; per-object gauges carry namespace and name only."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

SOLVES = Counter(
    "moeplace_solves_total",
    "Placement solves by strategy and solver status.",
    ["strategy", "status"],
)
SOLVE_SECONDS = Histogram(
    "moeplace_solve_duration_seconds",
    "Wall time of one plan (solve + EPLB baseline + scoring).",
    ["strategy"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RECONCILE_SECONDS = Histogram(
    "moeplace_reconcile_duration_seconds",
    "Wall time of one reconcile, queueing for the solver pool included.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
PREDICTED_GAIN = Gauge(
    "moeplace_predicted_gain_percent",
    "Predicted straggler-time gain of the last solve over the placement in service.",
    ["namespace", "name"],
)
GAIN_OVER_EPLB = Gauge(
    "moeplace_predicted_gain_over_eplb_percent",
    "Predicted straggler-time gain of the last solve over DeepSeek EPLB.",
    ["namespace", "name"],
)
ROLLOUTS = Counter("moeplace_rollouts_total", "Placements rolled out, by reason.", ["reason"])
REFUSALS = Counter("moeplace_rollouts_refused_total", "Rollouts refused, by reason.", ["reason"])
LEADER = Gauge(
    "moeplace_leader", "1 while this replica reconciles (holds the leader Lease, or no election)."
)
SOLVES_IN_FLIGHT = Gauge("moeplace_solves_in_flight", "Solves queued for or running in the pool.")
STALE_PLANS = Counter(
    "moeplace_stale_plans_total", "Plans dropped unpublished: the EP group changed while solving."
)
KUBE_REQUESTS = Counter(
    "moeplace_kube_requests_total",
    "Kubernetes API requests the reconciler sent (kopf's own watches, Events and finalizer "
    "patches not included), by verb and resource (with its subresource, e.g. "
    "moedeployments/status).",
    ["verb", "resource"],
)
ERRORS = Counter(
    "moeplace_reconcile_errors_total", "Reconciles that ended degraded or failed.", ["reason"]
)
SPEED_DRIFT = Gauge(
    "moeplace_gpu_speed_drift_percent",
    "Largest drift (signed) of a GPU's measured relative speed from its label in the EP group, "
    "measured / label - 1 in percent; absent without enough per-rank data.",
    ["namespace", "name"],
)
SPEED_DRIFT_GPUS = Gauge(
    "moeplace_gpu_speed_drift_gpus",
    "GPUs of the EP group whose speed drift exceeds gpus.speedDriftThresholdPercent.",
    ["namespace", "name"],
)


def _remove(gauges: tuple[Gauge, ...], namespace: str, name: str) -> None:
    for gauge in gauges:
        with contextlib.suppress(KeyError):  # never set for this object
            gauge.remove(namespace, name)


def forget_drift(namespace: str, name: str) -> None:
    """Remove the speed-drift series (no claim without enough per-rank data)."""
    _remove((SPEED_DRIFT, SPEED_DRIFT_GPUS), namespace, name)


def forget_object(namespace: str, name: str) -> None:
    """Remove a MoEDeployment's per-object series (it is gone: no stale gauge stays)."""
    _remove((PREDICTED_GAIN, GAIN_OVER_EPLB), namespace, name)
    forget_drift(namespace, name)
