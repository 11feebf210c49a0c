"""Per-expert load: from Prometheus (sub-window samples, decay weighting) or a static CSV; and
the layer-to-layer transitions of the traffic term (Prometheus instant query or a ConfigMap key).

Everything here is synchronous (prometheus-api-client is): the reconciler calls it in a worker
thread, never on the event loop. Parsing is separated from fetching so it can be unit tested.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import numpy as np
from prometheus_api_client import PrometheusConnect
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs it (not typing's) before 3.12
from urllib3.util.retry import Retry

from moeplace_operator.spec import ModelSpec, PrometheusLoad
from placement.evaluate import Dispatch as DispatchRule
from placement.load import (
    LoadFileError,
    LoadModelConfig,
    estimate,
    read_model_transitions_csv,
    read_transitions,
    sampling_for,
)
from placement.model import FloatArray

METRIC = "moe_expert_tokens_total"
TRANSITIONS_METRIC = "moe_expert_transitions_total"
SECONDS_METRIC = "moe_layer_compute_seconds_total"
TOKENS_METRIC = "moe_layer_tokens_total"
MAX_TRANSITIONS_BYTES = 256 * 2**20  # decompressed; a [L-1, E, E] float64 of 25 x 64 x 64 is 0.8 MB
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
    transitions: FloatArray | None = None  # [L-1, E, E], scaled to the load (scale_transitions)


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


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def default_query(model_name: str) -> str:
    escaped = _label_value(model_name)
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


def prometheus_client(spec: PrometheusLoad) -> PrometheusConnect:
    return PrometheusConnect(
        url=spec.url, disable_ssl=True, retry=Retry(total=1, backoff_factor=0.2),
        timeout=QUERY_TIMEOUT_S,
    )  # fmt: skip


def fetch_prometheus(
    spec: PrometheusLoad, model: ModelSpec, now: datetime, dispatch: DispatchRule = "even"
) -> LoadData:
    """Query ``samples`` sub-windows covering ``window`` in one range query. The samples the
    solver hedges over (``placement.load.sampling_for`` the dispatch rule): bootstrap
    resamples of their mean for even split, the sub-windows themselves for the best split."""
    window = parse_duration(spec.window)
    step = window / spec.samples
    query = (spec.query or default_query(model.name)).replace("$window", format_duration(step))
    client = prometheus_client(spec)
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
    sampling = sampling_for(dispatch)
    smoothed = estimate(samples, LoadModelConfig(half_life=half_life, sampling=sampling))
    hedged = f", {smoothed.samples.shape[0]} bootstrap samples" if sampling == "bootstrap" else ""
    return LoadData(
        smoothed.mean, smoothed.samples, f"{spec.window} in {spec.samples} samples{hedged}"
    )


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


# Layer-to-layer transitions (the traffic term). Reasons of MetricsUnavailableError raised here:
# TransitionsQueryFailed, NoTransitions, TransitionsMissing, BadTransitions. They never degrade
# the object: the placement is solved without the term and PlacementSolved says why.


class _PairLabels(TypedDict):
    layer: int
    src: int
    dst: int


class _PairSeries(TypedDict):
    """One series of an instant query: labels and ``[timestamp, "value"]`` (TypedDicts: ten
    times faster to validate than models, 0.1 s for DeepSeek-V2-Lite's 102,400 series)."""

    metric: _PairLabels
    value: tuple[float, float]


_PAIR_SERIES = TypeAdapter(list[_PairSeries])


def instant_query(
    client: PrometheusConnect, url: str, query: str, now: datetime, reason: str
) -> list[dict[str, Any]]:
    """``query`` evaluated at ``now``; any failure -> MetricsUnavailableError(``reason``)."""
    try:
        series: list[dict[str, Any]] = client.custom_query(query, params={"time": now.timestamp()})
    except Exception as error:  # the client raises many types; all mean "not available now"
        raise MetricsUnavailableError(
            reason, f"query {query!r} to {url} failed: {error}"
        ) from error
    return series


def default_transitions_query(model_name: str) -> str:
    selector = f'{TRANSITIONS_METRIC}{{model="{_label_value(model_name)}"}}'
    return f"sum by (layer, src, dst) (increase({selector}[$window]))"


T = TypeVar("T")


def _validated(
    adapter: TypeAdapter[list[T]], series: list[dict[str, Any]], reason: str, what: str, needs: str
) -> list[T]:
    """``series`` checked by ``adapter``; a readable MetricsUnavailableError(``reason``) that
    names the first bad series and what each one ``needs`` otherwise."""
    try:
        return adapter.validate_python(series)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MetricsUnavailableError(
            reason,
            f"{error.error_count()} invalid {what} series; first at {where}: {first['msg']} "
            f"(each series needs {needs})",
        ) from error


def parse_transitions_result(
    series: list[dict[str, Any]], model: ModelSpec, layer_offset: int
) -> FloatArray:
    """Prometheus instant vector -> [L-1, E, E] (series of the same pair are summed; layers
    outside the model's L-1 boundaries are ignored, like the load's; NaN counts as 0). Every
    series must carry integer labels ``layer``, ``src`` and ``dst`` (pydantic-validated): a
    query that aggregates them away is a configuration error, not "no traffic"."""
    parsed = _validated(
        _PAIR_SERIES, series, "BadTransitions", "transition", "integer labels layer, src, dst"
    )
    L, E = model.moe_layers, model.experts_per_layer
    out = np.zeros(max(L - 1, 0) * E * E, dtype=np.float64)
    if not parsed:
        return out.reshape(max(L - 1, 0), E, E)
    labels = [s["metric"] for s in parsed]
    cols = np.array([(x["layer"], x["src"], x["dst"]) for x in labels], dtype=np.int64)
    cols[:, 0] -= layer_offset
    values = np.array([s["value"][1] for s in parsed], dtype=np.float64)
    outside = (cols[:, 1:] < 0) | (cols[:, 1:] >= E)
    if outside.any():
        bad = labels[int(np.argmax(outside.any(axis=1)))]
        raise MetricsUnavailableError(
            "BadTransitions",
            f"expert ids src={bad['src']}, dst={bad['dst']} outside the model's 0..{E - 1}",
        )
    keep = (cols[:, 0] >= 0) & (cols[:, 0] < L - 1) & np.isfinite(values) & (values > 0)
    flat = (cols[keep, 0] * E + cols[keep, 1]) * E + cols[keep, 2]
    out += np.bincount(flat, weights=values[keep], minlength=out.size)
    return out.reshape(L - 1, E, E)


def fetch_prometheus_transitions(
    spec: PrometheusLoad, model: ModelSpec, now: datetime
) -> FloatArray:
    """One instant query over the whole window -> [L-1, E, E] (unscaled)."""
    query = spec.transitions_query or default_transitions_query(model.name)
    query = query.replace("$window", format_duration(parse_duration(spec.window)))
    series = instant_query(prometheus_client(spec), spec.url, query, now, "TransitionsQueryFailed")
    transitions = parse_transitions_result(series, model, spec.layer_offset)
    if transitions.sum() <= 0:
        raise MetricsUnavailableError(
            "NoTransitions",
            f"no {TRANSITIONS_METRIC} increase for model {model.name!r} in the last "
            f"{spec.window} (serving exports it only when enabled: ServingMetrics(..., "
            "transitions=True))",
        )
    return transitions


def _gunzip(raw: bytes) -> bytes:
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    out = inflater.decompress(raw, MAX_TRANSITIONS_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"more than {MAX_TRANSITIONS_BYTES} bytes once decompressed")
    if not inflater.eof:
        raise ValueError("truncated gzip data")
    return out


def parse_static_transitions(
    configmap: Mapping[str, Any], key: str, model: ModelSpec
) -> FloatArray:
    """[L-1, E, E] (unscaled) from a ConfigMap key: ``data`` holds the CSV
    ``moe_layer_index,src_expert,dst_expert,count``; ``binaryData`` the same CSV or an .npy
    array, either optionally gzipped (told apart by their magic bytes). CSV layer indices are
    those of the source layer and must cover exactly the model's L-1 boundaries."""
    name = configmap.get("metadata", {}).get("name", "?")
    where = f"ConfigMap {name} key {key}"
    data, binary = configmap.get("data") or {}, configmap.get("binaryData") or {}
    L, E = model.moe_layers, model.experts_per_layer
    if key not in data and key not in binary:
        raise MetricsUnavailableError("TransitionsMissing", f"{where} not found")
    try:
        raw = data[key].encode() if key in data else base64.b64decode(binary[key], validate=True)
        if raw[:2] == b"\x1f\x8b":
            raw = _gunzip(raw)
        if raw[:6] == b"\x93NUMPY":
            transitions = read_transitions(io.BytesIO(raw))
            if transitions.shape != (L - 1, E, E):
                raise ValueError(f"shape {transitions.shape}, the model needs ({L - 1}, {E}, {E})")
            return transitions
        return read_model_transitions_csv(raw.decode("utf-8"), L, E, origin=where)
    except (LoadFileError, ValueError, binascii.Error, zlib.error) as error:
        message = str(error) if str(error).startswith(where) else f"{where}: {error}"
        raise MetricsUnavailableError("BadTransitions", message) from error


def scale_transitions(
    transitions: FloatArray, load: FloatArray, top_k: int
) -> tuple[FloatArray, float]:
    """Scale transitions to the load's token count, and the factor used.

    A token routed to k experts in each layer adds k to ``load[l]`` and k * k pairs to
    ``transitions[l]``, so consistent inputs have ``sum(transitions) == k * sum(load[:-1])``.
    Only the proportions of the transitions are measured reliably: the load is a per-sub-window
    mean (Prometheus) while the transitions cover the whole window, and they may come from one
    rank (a sample of the traffic) or a snapshot of another period. One factor makes
    ``trafficWeight`` mean "cost per token changing GPU" on the load's scale."""
    total = float(transitions.sum())
    if total <= 0 or not np.isfinite(total):
        raise MetricsUnavailableError("NoTransitions", "all transition counts are zero")
    target = top_k * float(np.asarray(load)[:-1].sum())
    factor = target / total if target > 0 else 1.0
    return np.asarray(transitions * factor, dtype=np.float64), factor


# Per-rank compute counters (GPU speed drift, ``placement.drift.speed_drift``). Reasons of
# MetricsUnavailableError raised here: DriftQueryFailed, BadRankSeries. Neither degrades the
# object nor stops the placement: the reconciler only reports drift when it can measure it.


class _RankLabels(TypedDict):
    rank: int


class _RankSeries(TypedDict):
    metric: _RankLabels
    value: tuple[float, float]


_RANK_SERIES = TypeAdapter(list[_RankSeries])


def rank_query(metric: str, model_name: str, window: str) -> str:
    selector = f'{metric}{{model="{_label_value(model_name)}"}}'
    return f"sum by (rank) (increase({selector}[{window}]))"


def parse_rank_result(series: list[dict[str, Any]], ranks: int) -> FloatArray:
    """Prometheus instant vector with an integer ``rank`` label -> [ranks]; series of one rank
    are summed; ranks outside 0..ranks-1 and NaN values are ignored (missing ranks are 0)."""
    parsed = _validated(_RANK_SERIES, series, "BadRankSeries", "per-rank", "an integer label rank")
    out = np.zeros(ranks, dtype=np.float64)
    for one in parsed:
        rank, value = one["metric"]["rank"], one["value"][1]
        if 0 <= rank < ranks and np.isfinite(value):
            out[rank] += value
    return out


def fetch_rank_counters(
    spec: PrometheusLoad, model: ModelSpec, now: datetime, ranks: int
) -> tuple[FloatArray, FloatArray]:
    """Expert compute seconds and token-expert pairs per rank over the whole ``window``: two
    instant queries -> ([ranks] seconds, [ranks] tokens), rank r = GPU r of the EP group."""
    window = format_duration(parse_duration(spec.window))
    client = prometheus_client(spec)
    out: list[FloatArray] = []
    for metric in (SECONDS_METRIC, TOKENS_METRIC):
        query = rank_query(metric, model.name, window)
        series = instant_query(client, spec.url, query, now, "DriftQueryFailed")
        out.append(parse_rank_result(series, ranks))
    return out[0], out[1]
