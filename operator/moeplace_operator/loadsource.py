"""Per-expert load: from Prometheus (sub-window samples, decay weighting) or a static CSV; and
the layer-to-layer transitions of the traffic term (Prometheus instant query or a ConfigMap key).

Prometheus access is guarded (``resolve_source``): the URL must match the operator's allowlist,
credentials and the CA bundle come from Secrets/ConfigMaps, TLS is verified, redirects are not
followed, and a failure becomes a fixed message (host, HTTP status, category): the client's
exception text carries the response body, which must never reach status, Events or logs.

Everything here is synchronous (prometheus-api-client is): the reconciler calls it in a worker
thread, never on the event loop. Parsing is separated from fetching so it can be unit tested.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import ssl
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
import requests
import urllib3
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from pydantic import TypeAdapter, ValidationError
from requests.adapters import HTTPAdapter
from typing_extensions import TypedDict  # pydantic needs it (not typing's) before 3.12
from urllib3.util.retry import Retry

from moeplace_operator.kube import SecretForbiddenError
from moeplace_operator.spec import KeyRef, ModelSpec, PrometheusLoad, duration_seconds
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
from placement.names import (
    EXPERT_TOKENS_METRIC,
    EXPERT_TRANSITIONS_METRIC,
    LAYER_SECONDS_METRIC,
    LAYER_TOKENS_METRIC,
    LOAD_CSV_COLUMNS,
)

MAX_TRANSITIONS_BYTES = 256 * 2**20  # decompressed; a [L-1, E, E] float64 of 25 x 64 x 64 is 0.8 MB
QUERY_TIMEOUT_S = 10  # per query: an answer slower than this is no answer (not retried)


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
    return timedelta(seconds=duration_seconds(text))


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
    selector = f'{EXPERT_TOKENS_METRIC}{{model="{escaped}"}}'
    return f"sum by (layer, expert) (increase({selector}[$window]))"


def parse_range_result(
    series: list[dict[str, Any]], model: ModelSpec, layer_offset: int, samples: int
) -> FloatArray:
    """Prometheus matrix -> [K, L, E]: the K most recent sample times, series of one (layer,
    expert) summed, out-of-shape labels ignored. Refused (``BadLoadSeries``) rather than counted
    as zero: a NaN, infinite or negative point; a (layer, expert) of the model without a series
    (serving exports every expert, zeros included: one missing is a broken scrape or query);
    a series without a point at a sample time that others have (a partial scrape). Either would
    move experts on data that is not there. No series at all is ``NoTraffic`` (the caller's)."""
    shape = (model.moe_layers, model.experts_per_layer)
    cells: dict[tuple[int, int], dict[float, float]] = {}
    for one in series:
        labels = one.get("metric", {})
        try:
            cell = (int(labels["layer"]) - layer_offset, int(labels["expert"]))
        except (KeyError, ValueError):
            continue
        if not (0 <= cell[0] < shape[0] and 0 <= cell[1] < shape[1]):
            continue
        points = cells.setdefault(cell, {})
        for at, text in one.get("values", []):
            value = float(text)
            if not (np.isfinite(value) and value >= 0):
                raise MetricsUnavailableError(
                    "BadLoadSeries",
                    f"load query: the series of layer {cell[0] + layer_offset}, expert "
                    f"{cell[1]} holds NaN, infinite or negative points (token counts must be "
                    "finite and >= 0)",
                )
            points[float(at)] = points.get(float(at), 0.0) + value
    out = np.zeros((samples, *shape), dtype=np.float64)
    if not cells:
        return out
    times = sorted({at for points in cells.values() for at in points})[-samples:]
    _check_complete(cells, shape, times, layer_offset)
    for (layer, expert), points in cells.items():
        out[samples - len(times) :, layer, expert] = [points[at] for at in times]
    return out


def _check_complete(
    cells: Mapping[tuple[int, int], Mapping[float, float]],
    shape: tuple[int, int],
    times: Sequence[float],
    layer_offset: int,
) -> None:
    """Every (layer, expert) has a series with a point at each of ``times``, or
    MetricsUnavailableError(BadLoadSeries) naming how many do not and the first of them."""
    missing = [cell for cell in np.ndindex(*shape) if cell not in cells]
    if missing:
        layer, expert = missing[0]
        raise MetricsUnavailableError(
            "BadLoadSeries",
            f"load query: {len(missing)} of {shape[0] * shape[1]} (layer, expert) series "
            f"missing, first layer {layer + layer_offset}, expert {expert} (serving exports "
            "every expert, zeros included: a partial scrape or a query that drops series)",
        )
    gaps = sorted(cell for cell, points in cells.items() if any(t not in points for t in times))
    if gaps:
        layer, expert = gaps[0]
        raise MetricsUnavailableError(
            "BadLoadSeries",
            f"load query: {len(gaps)} series lack points at sample times the others have, "
            f"first layer {layer + layer_offset}, expert {expert} (a partial scrape)",
        )


class ObjectReader(Protocol):
    """What ``resolve_source`` reads through (``kube.Kube``; fakes in tests)."""

    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None: ...


@dataclass(frozen=True)
class PrometheusSource:
    """A Prometheus load spec with what it needs to be queried: the Authorization header's
    value (never printed) and the PEM of its CA bundle (None: the system's roots)."""

    spec: PrometheusLoad
    authorization: str | None = field(default=None, repr=False)
    ca_pem: str | None = None

    @property
    def origin(self) -> str:
        return origin(self.spec.url)


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what messages name (a path or query is not shown)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # messages must never fail: a bad port is refused by validation
        port = ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _url_key(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname or "", port, parts.path.rstrip("/")


def check_allowed(url: str, allowed: Sequence[str]) -> None:
    """``url`` must have the scheme, host and port of an ``allowed`` entry and its path or a
    path under it (whole segments: ``https://p/a`` allows ``https://p/a/b``, not ``/ab``).
    An empty allowlist allows every URL."""
    if not allowed:
        return
    try:
        scheme, host, port, path = _url_key(url)
        rules = [_url_key(rule) for rule in allowed]
    except ValueError:
        raise MetricsUnavailableError("PrometheusUrlNotAllowed", "unparsable url") from None
    dotted = any(part in {".", ".."} for part in path.split("/")) or "%2e" in path.lower()
    for r_scheme, r_host, r_port, r_path in rules:
        under = path == r_path or path.startswith(f"{r_path}/")
        if (scheme, host, port) == (r_scheme, r_host, r_port) and under and not dotted:
            return
    raise MetricsUnavailableError(
        "PrometheusUrlNotAllowed",
        f"{origin(url)}{path} is outside the operator's Prometheus allowlist "
        f"(chart value prometheus.allowedUrls: {', '.join(allowed)}); not queried",
    )


def _secret_value(reader: ObjectReader, namespace: str, ref: KeyRef) -> str:
    try:
        data = reader.read_secret(namespace, ref.name)
    except SecretForbiddenError:
        raise MetricsUnavailableError(
            "PrometheusSecretForbidden",
            f"the operator may not read Secret {ref.name} (list it in the chart value "
            "rbac.secretReads)",
        ) from None
    value = (data or {}).get(ref.key)
    if value is None:
        raise MetricsUnavailableError(
            "PrometheusSecretMissing", f"Secret {ref.name} key {ref.key} not found"
        )
    return value


def _single_line(value: str, ref: KeyRef) -> str:
    """Credentials go into a header: printable ASCII only (a trailing newline is dropped)."""
    value = value.strip()
    if not value or not all(" " <= c <= "~" for c in value):
        raise MetricsUnavailableError(
            "BadPrometheusCredentials",
            f"Secret {ref.name} key {ref.key}: not one line of printable ASCII",
        )
    return value


def _authorization(spec: PrometheusLoad, reader: ObjectReader, namespace: str) -> str | None:
    if spec.bearer_token_secret is not None:
        ref = spec.bearer_token_secret
        return f"Bearer {_single_line(_secret_value(reader, namespace, ref), ref)}"
    if spec.basic_auth is not None:
        user_ref, password_ref = spec.basic_auth.username, spec.basic_auth.password
        user = _single_line(_secret_value(reader, namespace, user_ref), user_ref)
        password = _single_line(_secret_value(reader, namespace, password_ref), password_ref)
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


def _ca_pem(spec: PrometheusLoad, reader: ObjectReader, namespace: str) -> str | None:
    if spec.ca is None:
        return None
    if spec.ca.secret is not None:
        ref, where = spec.ca.secret, f"Secret {spec.ca.secret.name} key {spec.ca.secret.key}"
        pem: str | None = _secret_value(reader, namespace, ref)
    else:
        assert spec.ca.config_map is not None  # the CRD's CEL rule: exactly one
        ref, where = (
            spec.ca.config_map,
            f"ConfigMap {spec.ca.config_map.name} key {spec.ca.config_map.key}",
        )
        pem = ((reader.read_configmap(namespace, ref.name) or {}).get("data") or {}).get(ref.key)
    if pem is None:
        raise MetricsUnavailableError("PrometheusCAMissing", f"CA bundle {where} not found")
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise MetricsUnavailableError(
            "BadPrometheusCA", f"CA bundle {where}: no PEM certificate"
        ) from None
    return pem


def resolve_source(
    spec: PrometheusLoad, namespace: str, reader: ObjectReader, allowed: Sequence[str]
) -> PrometheusSource:
    """The allowlist checked (nothing is read for a refused URL), then the credentials and the
    CA bundle read from the MoEDeployment's namespace: every pass, so a rotation is seen."""
    check_allowed(spec.url, allowed)
    return PrometheusSource(
        spec, _authorization(spec, reader, namespace), _ca_pem(spec, reader, namespace)
    )


class _CABundleAdapter(HTTPAdapter):
    """Verifies the server against one CA bundle only (requests would add its own roots)."""

    def __init__(self, context: ssl.SSLContext, retry: Retry) -> None:
        self._context = context
        super().__init__(max_retries=retry)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, ssl_context=self._context, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"  # the context holds the CA; hostnames are checked


def prometheus_client(source: PrometheusSource) -> PrometheusConnect:
    """TLS verified (the CA bundle or the system's roots), no redirect followed (it could lead
    outside the allowlist; requests would keep the Authorization header on the same host)."""
    url = source.spec.url.rstrip("/")
    # a refused or reset connection is tried once more; a slow answer is not: waiting twice
    # would hold the query's worker for twice QUERY_TIMEOUT_S and call it "connection failed"
    retry = Retry(total=1, read=0, backoff_factor=0.2)
    session = requests.Session()
    session.max_redirects = 0
    headers = {"Authorization": source.authorization} if source.authorization else None
    client = PrometheusConnect(
        url=url, headers=headers, retry=retry, timeout=QUERY_TIMEOUT_S, session=session
    )
    if source.ca_pem is not None:  # after the client mounted its own adapter on the url
        session.mount(
            url, _CABundleAdapter(ssl.create_default_context(cadata=source.ca_pem), retry)
        )
    return client


def failure_message(error: Exception, source: PrometheusSource) -> str:
    """A fixed description of a failed query: never the exception's text, which may hold the
    response body (prometheus-api-client puts it there) or the request URL."""
    if isinstance(error, PrometheusApiClientException):
        code = re.match(r"HTTP Status Code (\d{3})", str(error))
        status = int(code.group(1)) if code else 0
        refused = " (credentials refused)" if status in (401, 403) else ""
        category = f"HTTP {status}{refused}" if status else "HTTP error"
    elif isinstance(error, requests.exceptions.SSLError):
        category = "TLS verification failed (load.prometheus.ca?)"
    elif isinstance(error, requests.exceptions.TooManyRedirects):
        category = "redirected (redirects are not followed)"
    elif isinstance(error, requests.exceptions.Timeout) or _timed_out(error):
        category = f"no answer within {QUERY_TIMEOUT_S} s (query timeout)"
    elif isinstance(error, requests.exceptions.ConnectionError):
        category = "connection failed"
    elif isinstance(error, (ValueError, KeyError, TypeError, AttributeError)):
        category = "not a Prometheus API answer"
    else:
        category = f"query failed ({type(error).__name__})"
    return f"Prometheus at {source.origin}: {category}"


def _timed_out(error: Exception) -> bool:
    """requests reports an exhausted retry of a read timeout as a ConnectionError whose
    urllib3 cause (``MaxRetryError.reason``) is the timeout (a refused connection's cause,
    NewConnectionError, is a ConnectTimeoutError to urllib3: not this)."""
    cause = error.args[0] if error.args else None
    return isinstance(getattr(cause, "reason", None), urllib3.exceptions.ReadTimeoutError)


def _query(
    source: PrometheusSource, reason: str, what: str, call: Callable[[], Any]
) -> list[dict[str, Any]]:
    """``call``'s series; any failure -> MetricsUnavailableError(``reason``) with a fixed
    message (``from None``: a logged traceback would print the body in the cause)."""
    try:
        series = call()
    except Exception as error:  # the client raises many types; all mean "not available now"
        message = failure_message(error, source)
        raise MetricsUnavailableError(reason, f"{what}: {message}") from None
    if not isinstance(series, list) or not all(isinstance(one, dict) for one in series):
        raise MetricsUnavailableError(
            reason, f"{what}: Prometheus at {source.origin}: not a list of series"
        )
    return series


def last_step_boundary(now: datetime, step: timedelta) -> datetime:
    """``now`` rounded down to a multiple of ``step`` since the epoch. The range query ends
    there, so every tick within one sub-window reads the same samples and the inputs'
    fingerprint holds: no re-solve and no status write until a sub-window completes."""
    seconds = step.total_seconds()
    return datetime.fromtimestamp(now.timestamp() // seconds * seconds, tz=now.tzinfo or UTC)


def fetch_prometheus(
    source: PrometheusSource, model: ModelSpec, now: datetime, dispatch: DispatchRule = "even"
) -> LoadData:
    """Query ``samples`` sub-windows covering ``window`` in one range query. The samples the
    solver hedges over (``placement.load.sampling_for`` the dispatch rule): bootstrap
    resamples of their mean for even split, the sub-windows themselves for the best split."""
    spec = source.spec
    window = parse_duration(spec.window)
    step = window / spec.samples
    query = (spec.query or default_query(model.name)).replace("$window", format_duration(step))
    client = prometheus_client(source)
    end = last_step_boundary(now, step)
    series = _query(
        source,
        "PrometheusUnreachable",
        "load query",
        lambda: client.custom_query_range(
            query, start_time=end - window + step, end_time=end, step=format_duration(step)
        ),
    )
    try:
        samples = parse_range_result(series, model, spec.layer_offset, spec.samples)
    except (ValueError, TypeError, AttributeError):  # their text may quote the answer
        raise MetricsUnavailableError(
            "BadLoadSeries",
            f"load query: Prometheus at {source.origin}: not a matrix of numeric samples",
        ) from None
    if samples.sum() <= 0:
        raise MetricsUnavailableError(
            "NoTraffic",
            f"no {EXPERT_TOKENS_METRIC} increase for model {model.name!r} in the last "
            f"{spec.window}",
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
    layer_column, expert_column, count_column = LOAD_CSV_COLUMNS
    try:
        triples = [
            (int(r[layer_column]), int(r[expert_column]), float(r[count_column])) for r in rows
        ]
    except (KeyError, ValueError, TypeError) as error:
        raise MetricsUnavailableError(
            "BadLoadCSV", f"expected columns {','.join(LOAD_CSV_COLUMNS)}: {error}"
        ) from error
    if not triples:
        raise MetricsUnavailableError("BadLoadCSV", "the load CSV has no rows")
    first = min(layer for layer, _, _ in triples)
    load = np.zeros((model.moe_layers, model.experts_per_layer), dtype=np.float64)
    seen = np.zeros(load.shape, dtype=bool)
    for layer, expert, count in triples:
        where = f"row (layer {layer}, expert {expert})"
        if not (0 <= layer - first < model.moe_layers and 0 <= expert < model.experts_per_layer):
            raise MetricsUnavailableError(
                "BadLoadCSV",
                f"{where} is outside the model shape {model.moe_layers}x{model.experts_per_layer}",
            )
        if not (np.isfinite(count) and count >= 0):
            raise MetricsUnavailableError(
                "BadLoadCSV", f"{where} has count {count}: counts must be finite and >= 0"
            )
        if seen[layer - first, expert]:
            raise MetricsUnavailableError("BadLoadCSV", f"{where} appears twice")
        seen[layer - first, expert] = True
        load[layer - first, expert] = count
    check_load_rows(load, np.asarray(seen.any(axis=1)), first)
    return load


def check_load_rows(load: FloatArray, has_rows: npt.NDArray[np.bool_], first: int) -> None:
    """Every MoE layer has rows, and the tokens are finite and not all zero: a file cut short,
    or counts so large they sum to infinity, must not be solved as if true."""
    missing = np.flatnonzero(~has_rows)
    if missing.size:
        raise MetricsUnavailableError(
            "BadLoadCSV",
            f"MoE layer {missing[0]} (layer {first + missing[0]} in the file) has no rows; "
            f"the model has {len(load)} MoE layers",
        )
    with np.errstate(over="ignore"):  # an overflow is what is checked for
        total = float(load.sum())
    if not (np.isfinite(total) and total > 0):
        raise MetricsUnavailableError(
            "BadLoadCSV", f"the counts sum to {total}: they must be finite and not all zero"
        )


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
    client: PrometheusConnect, source: PrometheusSource, query: str, now: datetime, reason: str
) -> list[dict[str, Any]]:
    """``query`` evaluated at ``now``; any failure -> MetricsUnavailableError(``reason``)."""
    return _query(
        source,
        reason,
        f"query {query[:200]!r}",
        lambda: client.custom_query(query, params={"time": now.timestamp()}),
    )


def default_transitions_query(model_name: str) -> str:
    selector = f'{EXPERT_TRANSITIONS_METRIC}{{model="{_label_value(model_name)}"}}'
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
        ) from None  # the ValidationError's text quotes the input


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
    source: PrometheusSource, model: ModelSpec, now: datetime
) -> FloatArray:
    """One instant query over the whole window -> [L-1, E, E] (unscaled)."""
    spec = source.spec
    query = spec.transitions_query or default_transitions_query(model.name)
    query = query.replace("$window", format_duration(parse_duration(spec.window)))
    series = instant_query(prometheus_client(source), source, query, now, "TransitionsQueryFailed")
    transitions = parse_transitions_result(series, model, spec.layer_offset)
    if transitions.sum() <= 0:
        raise MetricsUnavailableError(
            "NoTransitions",
            f"no {EXPERT_TRANSITIONS_METRIC} increase for model {model.name!r} in the last "
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
    source: PrometheusSource, model: ModelSpec, now: datetime, ranks: int
) -> tuple[FloatArray, FloatArray]:
    """Expert compute seconds and token-expert pairs per rank over the whole ``window``: two
    instant queries -> ([ranks] seconds, [ranks] tokens), rank r = GPU r of the EP group.
    Evaluated at the load query's last sub-window boundary, so the drift figures (and the
    status that reports them) hold still between boundaries like the load does."""
    spec = source.spec
    window = parse_duration(spec.window)
    at = last_step_boundary(now, window / spec.samples)
    client = prometheus_client(source)
    out: list[FloatArray] = []
    for metric in (LAYER_SECONDS_METRIC, LAYER_TOKENS_METRIC):
        query = rank_query(metric, model.name, format_duration(window))
        series = instant_query(client, source, query, at, "DriftQueryFailed")
        out.append(parse_rank_result(series, ranks))
    return out[0], out[1]
