"""Per-expert load: from Prometheus (sub-window samples, decay weighting) or a static CSV.

Everything here is synchronous (prometheus-api-client is): the reconciler calls it in a worker
thread, never on the event loop. Parsing is separated from fetching so it can be unit tested.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from moeplace_operator.spec import ModelSpec, PrometheusLoad
from placement.load import LoadModelConfig, estimate
from placement.model import FloatArray

METRIC = "moe_expert_tokens_total"
QUERY_TIMEOUT_S = 10
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class MetricsUnavailableError(Exception):
    """No usable load now; ``reason`` is a condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LoadData:
    load: FloatArray  # [L, E] (decay-weighted mean over samples for Prometheus)
    samples: FloatArray | None  # [K, L, E]
    window: str  # human-readable description of what was used


def parse_duration(text: str) -> timedelta:
    """``1h30m``, ``10m``, ``45s`` -> timedelta (the CRD's Duration pattern)."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return timedelta(seconds=sum(int(n) * _UNIT_S[u] for n, u in parts))


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def default_query(model_name: str) -> str:
    escaped = model_name.replace("\\", "\\\\").replace('"', '\\"')
    return f'sum by (layer, expert) (increase({METRIC}{{model="{escaped}"}}[$window]))'


def parse_range_result(
    series: list[dict[str, Any]], model: ModelSpec, layer_offset: int, samples: int
) -> FloatArray:
    """Prometheus matrix -> [K, L, E]; the K most recent points of each series, missing points
    and out-of-shape labels ignored (zero)."""
    out = np.zeros((samples, model.moe_layers, model.experts_per_layer), dtype=np.float64)
    for one in series:
        labels = one.get("metric", {})
        try:
            layer = int(labels["layer"]) - layer_offset
            expert = int(labels["expert"])
        except (KeyError, ValueError):
            continue
        if not (0 <= layer < model.moe_layers and 0 <= expert < model.experts_per_layer):
            continue
        values = [float(v) for _, v in one.get("values", [])][-samples:]
        for k, value in enumerate(values, start=samples - len(values)):
            out[k, layer, expert] = value if np.isfinite(value) else 0.0
    return out


def fetch_prometheus(spec: PrometheusLoad, model: ModelSpec, now: datetime) -> LoadData:
    """Query ``samples`` sub-windows covering ``window`` in one range query."""
    window = parse_duration(spec.window)
    step = window / spec.samples
    query = (spec.query or default_query(model.name)).replace("$window", format_duration(step))
    client = PrometheusConnect(
        url=spec.url, disable_ssl=True, retry=Retry(total=1, backoff_factor=0.2),
        timeout=QUERY_TIMEOUT_S,
    )  # fmt: skip
    try:
        series = client.custom_query_range(
            query, start_time=now - window + step, end_time=now, step=format_duration(step)
        )
    except Exception as error:  # the client raises many types; all mean "no metrics now"
        raise MetricsUnavailableError(
            "PrometheusUnreachable", f"query to {spec.url} failed: {error}"
        ) from error
    samples = parse_range_result(series, model, spec.layer_offset, spec.samples)
    if samples.sum() <= 0:
        raise MetricsUnavailableError(
            "NoTraffic", f"no {METRIC} increase for model {model.name!r} in the last {spec.window}"
        )
    half_life = parse_duration(spec.half_life) / step if spec.half_life else None
    smoothed = estimate(samples, LoadModelConfig(half_life=half_life))
    return LoadData(smoothed.mean, smoothed.samples, f"{spec.window} in {spec.samples} samples")


def parse_load_csv(text: str, model: ModelSpec) -> FloatArray:
    """``moe_layer_index,expert_id,count`` -> [L, E]; layer indices count from the smallest
    one in the file (files number MoE layers by hidden layer, e.g. from 1)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    try:
        triples = [
            (int(r["moe_layer_index"]), int(r["expert_id"]), float(r["count"])) for r in rows
        ]
    except (KeyError, ValueError, TypeError) as error:
        raise MetricsUnavailableError(
            "BadLoadCSV", f"expected columns moe_layer_index,expert_id,count: {error}"
        ) from error
    if not triples:
        raise MetricsUnavailableError("BadLoadCSV", "the load CSV has no rows")
    first = min(layer for layer, _, _ in triples)
    load = np.zeros((model.moe_layers, model.experts_per_layer), dtype=np.float64)
    for layer, expert, count in triples:
        if not (0 <= layer - first < model.moe_layers and 0 <= expert < model.experts_per_layer):
            raise MetricsUnavailableError(
                "BadLoadCSV",
                f"row (layer {layer}, expert {expert}) is outside the model shape "
                f"{model.moe_layers}x{model.experts_per_layer}",
            )
        load[layer - first, expert] += count
    return load
