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
* ``moe_expert_transitions_total{model, layer, src, dst}`` (opt-in: ``transitions=True``): per
  token, every pair of its top-k experts in MoE layer ``layer`` (``src``) and in ``layer + 1``
  (``dst``), k * k pairs per token (MoETuner's cross-layer term, the operator's
  ``trafficWeight`` input). Exactly (L-1) * E * E series per rank that enables it, zeros
  included (25 * 64 * 64 = 102,400 for DeepSeek-V2-Lite): enable it on one rank per group
  (its tokens are a sample of the routing; the operator rescales the counts to the load), or
  publish :meth:`ServingMetrics.transitions_csv` snapshots instead of scraping it.
* ``moe_placement_version{model, rank, state}`` (state ``latest`` = newest valid version seen,
  ``active`` = version in use), ``moe_placement_reloads_total{model, rank, result}``,
  ``moe_placement_switch_seconds{model, rank}`` (histogram of agree + move + switch time).

The hot path (:meth:`ServingMetrics.observe_routing`, :meth:`ServingMetrics.observe_layers`) only
adds into numpy arrays (one ``np.bincount`` per step, two with transitions); the per-series
objects are built at scrape time by a custom collector.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from placement.names import (
    EXPERT_TOKENS_METRIC,
    EXPERT_TRANSITIONS_METRIC,
    LAYER_SECONDS_METRIC,
    LAYER_TOKENS_METRIC,
    TRANSITIONS_CSV_COLUMNS,
)

_EXPERT_LABELS = ["model", "layer", "expert"]
SWITCH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class _ArrayCollector(Collector):
    """Counters backed by numpy arrays, turned into samples only when scraped."""

    def __init__(
        self, model: str, rank: int, layers: int, experts: int, reporter: bool, transitions: bool
    ) -> None:
        self.model, self.rank, self.reporter = model, str(rank), reporter
        self.lock = threading.Lock()
        self.expert_tokens = np.zeros((layers, experts), dtype=np.int64)
        # [L-1, E, E] (empty when not enabled)
        shape = (max(layers - 1, 0), experts, experts) if transitions else (0, experts, experts)
        self.transitions = np.zeros(shape, dtype=np.int64)
        self.layer_seconds = np.zeros(layers, dtype=np.float64)
        self.layer_tokens = np.zeros(layers, dtype=np.int64)
        self.straggler_seconds = np.zeros(layers, dtype=np.float64)

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self.lock:
            tokens = self.expert_tokens.tolist()
            seconds, pairs = self.layer_seconds.tolist(), self.layer_tokens.tolist()
            straggler = self.straggler_seconds.tolist()
            transitions = self.transitions.tolist()
        routed = CounterMetricFamily(
            EXPERT_TOKENS_METRIC, "Tokens routed to each logical expert.", labels=_EXPERT_LABELS
        )
        for layer, row in enumerate(tokens):
            for expert, count in enumerate(row):
                routed.add_metric([self.model, str(layer), str(expert)], count)
        yield routed
        yield self._per_layer(LAYER_SECONDS_METRIC, "Expert compute seconds.", seconds)
        yield self._per_layer(LAYER_TOKENS_METRIC, "Token-expert pairs computed.", pairs)
        if self.reporter:
            family = CounterMetricFamily(
                "moe_layer_straggler_seconds",
                "Sum over steps of the slowest rank's expert time per layer.",
                labels=["model", "layer"],
            )
            for layer, value in enumerate(straggler):
                family.add_metric([self.model, str(layer)], value)
            yield family
        if transitions:
            yield self._transitions(transitions)

    def _transitions(self, counts: list[list[list[int]]]) -> CounterMetricFamily:
        family = CounterMetricFamily(
            EXPERT_TRANSITIONS_METRIC,
            "Token pairs with expert src in MoE layer `layer` and dst in layer + 1.",
            labels=["model", "layer", "src", "dst"],
        )
        names = [str(e) for e in range(self.expert_tokens.shape[1])]
        for layer, block in enumerate(counts):
            label = str(layer)
            for src, row in zip(names, block, strict=True):
                for dst, count in zip(names, row, strict=True):
                    family.add_metric([self.model, label, src, dst], count)
        return family

    def _per_layer(self, name: str, doc: str, values: Sequence[float]) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model", "layer", "rank"])
        for layer, value in enumerate(values):
            family.add_metric([self.model, str(layer), self.rank], value)
        return family


class ServingMetrics:
    """All metrics of one rank, registered on ``registry`` (a fresh one by default).

    ``reporter``: this rank also exports the per-layer straggler counter (one rank per group).
    ``transitions``: also count and export consecutive-layer expert transitions (opt-in: see
    the module docstring for its cardinality); ``transitions_stride`` s > 1 counts them for
    every s-th token of a step only (starting at a position that rotates from step to step):
    s times cheaper, and the operator needs their proportions only.
    """

    def __init__(
        self,
        model: str,
        layers: int,
        experts: int,
        rank: int = 0,
        reporter: bool = False,
        registry: CollectorRegistry | None = None,
        transitions: bool = False,
        transitions_stride: int = 1,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.layers, self.experts = layers, experts
        self._arrays = _ArrayCollector(model, rank, layers, experts, reporter, transitions)
        self.registry.register(self._arrays)
        self._offsets = (np.arange(layers, dtype=np.int64) * experts)[None, :, None]
        if transitions_stride < 1:
            raise ValueError(f"transitions_stride must be >= 1, got {transitions_stride}")
        self.count_transitions = transitions and layers > 1
        self.transitions_stride, self._phase = transitions_stride, 0
        # [L-1, 1, 1]: first flat index of each layer boundary's E x E block
        boundaries = np.arange(max(layers - 1, 0), dtype=np.int64)
        self._pair_offsets = (boundaries * experts * experts)[:, None, None]
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
        pairs = self._transition_counts(topk_ids) if self.count_transitions else None
        arrays = self._arrays
        with arrays.lock:
            arrays.expert_tokens += counts.reshape(arrays.expert_tokens.shape)
            if pairs is not None:
                arrays.transitions += pairs.reshape(arrays.transitions.shape)

    def add_expert_tokens(self, counts: npt.NDArray[np.integer]) -> None:
        """Add ``counts`` [L, E] tokens per logical expert (an engine's own counters)."""
        if counts.shape != (self.layers, self.experts):
            raise ValueError(
                f"counts of shape {counts.shape}, expected {(self.layers, self.experts)}"
            )
        with self._arrays.lock:
            self._arrays.expert_tokens += counts.astype(np.int64)

    def _transition_counts(self, topk_ids: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
        """[(L-1) * E * E] pair counts of one step: for every (sampled) token and layer l, each
        of its k experts in l with each of its k experts in l+1 (layer-major, so
        ``np.bincount`` fills one E x E block at a time)."""
        stride = self.transitions_stride
        sample = topk_ids[self._phase :: stride] if stride > 1 else topk_ids
        self._phase = (self._phase + 1) % stride
        # int64: np.bincount would convert narrower indices to it anyway
        ids = np.ascontiguousarray(sample.transpose(1, 0, 2), dtype=np.int64)  # [L, T, k]
        src = ids[:-1] * self.experts + self._pair_offsets  # [L-1, T, k]
        flat = src[..., :, None] + ids[1:, :, None, :]  # [L-1, T, k, k]
        size = (self.layers - 1) * self.experts * self.experts
        return np.bincount(flat.ravel(), minlength=size)

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

    def transitions(self) -> npt.NDArray[np.int64]:
        """[L-1, E, E] copy of the transition counts so far (all zeros unless enabled)."""
        with self._arrays.lock:
            return self._arrays.transitions.copy()

    def transitions_csv(self, layer_offset: int = 0) -> str:
        """The transition counts so far as ``moe_layer_index,src_expert,dst_expert,count`` rows
        (non-zero pairs only; ``moe_layer_index`` = source MoE layer + ``layer_offset``): what
        the operator's static load ConfigMap takes under ``transitions.csv`` (gzip it into
        ``binaryData`` when it exceeds the ConfigMap's 1 MiB)."""
        counts = self.transitions()
        layer, src, dst = np.nonzero(counts)
        out = io.StringIO()
        out.write(",".join(TRANSITIONS_CSV_COLUMNS) + "\n")
        rows = zip(
            (layer + layer_offset).tolist(),
            src.tolist(),
            dst.tolist(),
            counts[layer, src, dst].tolist(),
            strict=True,
        )
        out.writelines(f"{a},{b},{c},{d}\n" for a, b, c, d in rows)
        return out.getvalue()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` for this registry on ``addr:port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
