"""Prometheus metrics of one serving rank: routing per expert, compute time per layer, reloads.

Exported series (base units, bounded labels; ``layer`` is the 0-based MoE layer index, i.e. the
row of the placement's ``phy2log``; no rank label on the per-expert counter, so
``sum by (layer, expert) (rate(moe_expert_tokens_total[5m]))`` over all ranks is the load):

* ``moe_expert_tokens_total{model, layer, expert}``: tokens routed to each logical expert, counted
  by the rank that owns the token (each token counted once across ranks, top-k times in total).
* ``moe_layer_compute_seconds_total{model, layer, rank}`` and ``moe_layer_tokens_total{model,
  layer, rank}``: expert compute time and token-expert pairs this rank processed per layer
  (their ratio of rates is the rank's measured time per token).
* ``moe_layer_straggler_seconds_total{model, layer}``: sum over steps of the slowest rank's time
  per layer (exported by the reporting rank only); ``moe_steps_total{model, rank}``.
* ``moe_placement_version{model, rank, state}`` (state ``latest`` = newest valid version seen,
  ``active`` = version in use), ``moe_placement_reloads_total{model, rank, result}``,
  ``moe_placement_switch_seconds{model, rank}`` (histogram of agree + move + switch time).

The hot path (:meth:`ServingMetrics.observe_routing`, :meth:`ServingMetrics.observe_layers`) only
adds into numpy arrays; the per-series objects are built at scrape time by a custom collector.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_EXPERT_LABELS = ["model", "layer", "expert"]
SWITCH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class _ArrayCollector(Collector):
    """Counters backed by numpy arrays, turned into samples only when scraped."""

    def __init__(self, model: str, rank: int, layers: int, experts: int, reporter: bool) -> None:
        self.model, self.rank, self.reporter = model, str(rank), reporter
        self.lock = threading.Lock()
        self.expert_tokens = np.zeros((layers, experts), dtype=np.int64)
        self.layer_seconds = np.zeros(layers, dtype=np.float64)
        self.layer_tokens = np.zeros(layers, dtype=np.int64)
        self.straggler_seconds = np.zeros(layers, dtype=np.float64)

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self.lock:
            tokens = self.expert_tokens.tolist()
            seconds, pairs = self.layer_seconds.tolist(), self.layer_tokens.tolist()
            straggler = self.straggler_seconds.tolist()
        routed = CounterMetricFamily(
            "moe_expert_tokens", "Tokens routed to each logical expert.", labels=_EXPERT_LABELS
        )
        for layer, row in enumerate(tokens):
            for expert, count in enumerate(row):
                routed.add_metric([self.model, str(layer), str(expert)], count)
        yield routed
        yield self._per_layer("moe_layer_compute_seconds", "Expert compute seconds.", seconds)
        yield self._per_layer("moe_layer_tokens", "Token-expert pairs computed.", pairs)
        if self.reporter:
            family = CounterMetricFamily(
                "moe_layer_straggler_seconds",
                "Sum over steps of the slowest rank's expert time per layer.",
                labels=["model", "layer"],
            )
            for layer, value in enumerate(straggler):
                family.add_metric([self.model, str(layer)], value)
            yield family

    def _per_layer(self, name: str, doc: str, values: Sequence[float]) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model", "layer", "rank"])
        for layer, value in enumerate(values):
            family.add_metric([self.model, str(layer), self.rank], value)
        return family


class ServingMetrics:
    """All metrics of one rank, registered on ``registry`` (a fresh one by default).

    ``reporter``: this rank also exports the per-layer straggler counter (one rank per group).
    """

    def __init__(
        self,
        model: str,
        layers: int,
        experts: int,
        rank: int = 0,
        reporter: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.layers, self.experts = layers, experts
        self._arrays = _ArrayCollector(model, rank, layers, experts, reporter)
        self.registry.register(self._arrays)
        self._offsets = (np.arange(layers, dtype=np.int64) * experts)[None, :, None]
        labels = {"model": model, "rank": str(rank)}
        self.steps = Counter(
            "moe_steps", "Forward steps served.", list(labels), registry=self.registry
        ).labels(**labels)
        version = Gauge(
            "moe_placement_version",
            "Placement version: newest valid seen (latest) and in use (active).",
            [*labels, "state"],
            registry=self.registry,
        )
        self.latest_version = version.labels(**labels, state="latest")
        self.active_version = version.labels(**labels, state="active")
        reloads = Counter(
            "moe_placement_reloads",
            "Placement files read, by result (ok, invalid).",
            [*labels, "result"],
            registry=self.registry,
        )
        self.reloads_ok = reloads.labels(**labels, result="ok")
        self.reloads_invalid = reloads.labels(**labels, result="invalid")
        self.switch_seconds = Histogram(
            "moe_placement_switch_seconds",
            "Time from agreeing on a new placement version to using it (agree + move + switch).",
            list(labels),
            buckets=SWITCH_BUCKETS,
            registry=self.registry,
        ).labels(**labels)

    def observe_routing(self, topk_ids: npt.NDArray[np.integer]) -> None:
        """Count one step's routing. ``topk_ids``: [T, L, k] logical expert ids of this rank's
        tokens (any integer dtype)."""
        flat = topk_ids.astype(np.int64)
        flat += self._offsets
        counts = np.bincount(flat.ravel(), minlength=self.layers * self.experts)
        with self._arrays.lock:
            self._arrays.expert_tokens.ravel().__iadd__(counts)

    def observe_layers(
        self,
        seconds: npt.NDArray[np.float64],
        pairs: npt.NDArray[np.int64],
        straggler_seconds: npt.NDArray[np.float64] | None = None,
    ) -> None:
        """Add one step's per-layer compute. All arrays [L]: this rank's expert seconds and
        token-expert pairs, and (reporter only) the slowest rank's seconds."""
        with self._arrays.lock:
            self._arrays.layer_seconds += seconds
            self._arrays.layer_tokens += pairs
            if straggler_seconds is not None:
                self._arrays.straggler_seconds += straggler_seconds
        self.steps.inc()

    def expert_tokens(self) -> npt.NDArray[np.int64]:
        """[L, E] copy of the routed-token counts so far."""
        with self._arrays.lock:
            return self._arrays.expert_tokens.copy()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` for this registry on ``addr:port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
