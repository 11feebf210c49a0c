"""GPU speed drift (issue 6): per-rank counters from Prometheus, the GPUsProfiled condition,
the Warning Event, the gauge and the re-profile request on the Node, with a fake API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
import numpy as np
import pytest
from fake_prometheus import FakePrometheus, load_matrix
from moeplace_operator.events import EventDedup
from moeplace_operator.loadsource import (
    MetricsUnavailableError,
    PrometheusSource,
    fetch_rank_counters,
    parse_rank_result,
    rank_query,
)
from moeplace_operator.nodes import NodeGPUs, node_gpus
from moeplace_operator.reconcile import Reconcile
from moeplace_operator.runtime import Runtime
from moeplace_operator.spec import ModelSpec, PrometheusLoad
from prometheus_client import REGISTRY

MODEL = ModelSpec(
    name="m", moe_layers=2, experts_per_layer=4, top_k=1, dense_layers_before=0, hidden_layers=2
)
NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def rank(r: Any, value: str) -> dict[str, Any]:
    return {"metric": {"rank": r}, "value": [NOW.timestamp(), value]}


def test_rank_query_and_parse() -> None:
    query = rank_query("moe_layer_tokens_total", 'a"b', "1h")
    assert query == 'sum by (rank) (increase(moe_layer_tokens_total{model="a\\"b"}[1h]))'
    got = parse_rank_result([rank("0", "3"), rank("2", "5"), rank("2", "1"), rank("9", "7")], 3)
    np.testing.assert_allclose(got, [3.0, 0.0, 6.0])  # same rank summed, out of range ignored
    np.testing.assert_allclose(parse_rank_result([rank("1", "NaN")], 2), [0.0, 0.0])
    with pytest.raises(MetricsUnavailableError, match="rank") as error:
        parse_rank_result([{"metric": {}, "value": [1, "2"]}], 2)
    assert error.value.reason == "BadRankSeries"


def test_fetch_rank_counters_two_instant_queries_over_the_window() -> None:
    prometheus = FakePrometheus(
        [],
        by_query={
            "moe_layer_compute_seconds_total": [rank("0", "2.5"), rank("1", "3")],
            "moe_layer_tokens_total": [rank("0", "1000"), rank("1", "1200")],
        },
    )
    try:
        spec = PrometheusLoad(url=prometheus.url, window="90m")
        seconds, tokens = fetch_rank_counters(PrometheusSource(spec), MODEL, NOW, 2)
        np.testing.assert_allclose(seconds, [2.5, 3.0])
        np.testing.assert_allclose(tokens, [1000.0, 1200.0])
        sent = [q["query"][0] for q in prometheus.queries]
        assert sent == [
            rank_query("moe_layer_compute_seconds_total", "m", "90m"),
            rank_query("moe_layer_tokens_total", "m", "90m"),
        ]
        assert all(float(q["time"][0]) == NOW.timestamp() for q in prometheus.queries)
    finally:
        prometheus.close()
    with pytest.raises(MetricsUnavailableError) as error:
        fetch_rank_counters(
            PrometheusSource(PrometheusLoad(url="http://127.0.0.1:1")), MODEL, NOW, 2
        )
    assert error.value.reason == "DriftQueryFailed"


# --- a reconcile, with fakes -------------------------------------------------------------------


class FakeKube:
    def __init__(self) -> None:
        self.configmaps: dict[str, Any] = {}
        self.status: dict[str, Any] = {}
        self.annotated: list[tuple[str, dict[str, str]]] = []
        self.refuse_nodes = False

    def read_configmap(self, namespace: str, name: str) -> Any:
        return self.configmaps.get(name)

    def write_configmap(self, body: Any) -> None:
        self.configmaps[body["metadata"]["name"]] = body

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.status = patch["status"]

    def annotate_node(self, name: str, annotations: dict[str, str]) -> None:
        if self.refuse_nodes:
            raise RuntimeError("403 Forbidden: nodes is forbidden")
        self.annotated.append((name, annotations))


def moed(url: str, threshold: float | None, status: dict[str, Any]) -> dict[str, Any]:
    gpus: dict[str, Any] = {"nodeSelector": {"pool": "a"}, "nodeCount": 2, "gpusPerNode": 2}
    if threshold is not None:
        gpus["speedDriftThresholdPercent"] = threshold
    return {
        "metadata": {"name": "lite", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {
            "model": {
                "name": "m",
                "moeLayers": 2,
                "expertsPerLayer": 4,
                "topK": 1,
                "denseLayersBefore": 0,
                "hiddenLayers": 2,
            },
            "gpus": gpus,
            "placement": {"strategy": "greedy"},
            "load": {"prometheus": {"url": url, "window": "30m", "samples": 3}},
        },
        "status": status,
    }


def nodes(speeds: list[str]) -> list[NodeGPUs]:
    """n0 holds ranks 0-1, n1 ranks 2-3 (nodes by name, GPU index within the node)."""
    return [
        node_gpus(
            f"n{n}",
            {"pool": "a", **{f"gpu.moeplace.io/speed-{i}": speeds[2 * n + i] for i in range(2)}},
            {},
        )
        for n in range(2)
    ]


class Scenario:
    def __init__(self, tokens: list[str], seconds: list[str]) -> None:
        self.answers = {
            "moe_layer_compute_seconds_total": [rank(str(r), s) for r, s in enumerate(seconds)],
            "moe_layer_tokens_total": [rank(str(r), t) for r, t in enumerate(tokens)],
        }
        self.prometheus = FakePrometheus(load_matrix(NOW), "matrix", by_query=self.answers)
        self.kube = FakeKube()
        self.refused = EventDedup()
        self.events: list[dict[str, Any]] = []

    def reconcile(
        self, speeds: list[str], threshold: float | None = None
    ) -> dict[str, dict[str, Any]]:
        runtime = Runtime(self.kube, ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
        body = moed(self.prometheus.url, threshold, self.kube.status)
        run = Reconcile(
            runtime,
            body,  # type: ignore[arg-type]
            nodes(speeds),
            logging.getLogger("t"),
            self.refused,
            now=NOW,
        )
        asyncio.run(run.run())
        return {c["type"]: c for c in self.kube.status["conditions"]}

    def drift_queries(self) -> int:
        return sum("by (rank)" in q.get("query", [""])[0] for q in self.prometheus.queries)


@pytest.fixture
def scenario() -> Iterator[Callable[[list[str]], Scenario]]:
    """Scenarios with 10 s of compute per rank and these per-rank token counts; their fake
    Prometheus servers stop after the test."""
    made: list[Scenario] = []

    def make(tokens: list[str]) -> Scenario:
        made.append(Scenario(tokens=tokens, seconds=["10"] * 4))
        return made[-1]

    yield make
    for one in made:
        one.prometheus.close()


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kw: got.append(kw))
    return got


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": "ns", "name": "lite"})


def test_drift_reported_once_node_annotated_then_cleared(
    events: list[dict[str, Any]], scenario: Callable[[list[str]], Scenario]
) -> None:
    # every label says 1.0; rank 0 (n0/0) computes at 0.8x and rank 3 (n1/1) at 1.2x the mean
    s = scenario(["80000", "100000", "100000", "120000"])
    conditions = s.reconcile(["1.0"] * 4)
    profiled = conditions["GPUsProfiled"]
    assert profiled["status"] == "False" and profiled["reason"] == "SpeedDrift"
    assert "n0/0 measured 0.80x vs label 1.00x (-20.0%)" in profiled["message"]
    assert "n1/1 measured 1.20x vs label 1.00x (+20.0%)" in profiled["message"]
    assert conditions["Ready"]["status"] == "True"  # the placement path is untouched
    assert s.kube.configmaps["lite-placement"]
    warnings = [e for e in events if e["reason"] == "SpeedDrift"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert s.kube.annotated == [
        ("n0", {"gpu.moeplace.io/reprofile-requested-at": "2026-12-01T08:00:00Z"}),
        ("n1", {"gpu.moeplace.io/reprofile-requested-at": "2026-12-01T08:00:00Z"}),
    ]
    assert abs(gauge("moeplace_gpu_speed_drift_percent") or 0) == pytest.approx(20)
    assert gauge("moeplace_gpu_speed_drift_gpus") == 2

    conditions = s.reconcile(["1.0"] * 4)  # same drift: no second Event, no second request
    assert len([e for e in events if e["reason"] == "SpeedDrift"]) == 1
    assert len(s.kube.annotated) == 2
    assert conditions["GPUsProfiled"]["message"].endswith("; re-profile requested")

    # the profiler re-published labels that match what serving measures: drift gone
    conditions = s.reconcile(["0.8", "1.0", "1.0", "1.2"])
    assert conditions["GPUsProfiled"]["status"] == "True"
    assert conditions["GPUsProfiled"]["reason"] == "SpeedLabels"
    assert gauge("moeplace_gpu_speed_drift_percent") == pytest.approx(0, abs=1e-9)
    assert gauge("moeplace_gpu_speed_drift_gpus") == 0


def test_within_threshold_disabled_or_too_little_data_claims_nothing(
    events: list[dict[str, Any]], scenario: Callable[[list[str]], Scenario]
) -> None:
    s = scenario(["95000", "100000", "100000", "105000"])
    assert s.reconcile(["1.0"] * 4)["GPUsProfiled"]["status"] == "True"  # 5% < 10%
    assert s.reconcile(["1.0"] * 4, threshold=4)["GPUsProfiled"]["reason"] == "SpeedDrift"
    before = s.drift_queries()
    conditions = s.reconcile(["1.0"] * 4, threshold=0)  # disabled: not even queried
    assert conditions["GPUsProfiled"]["status"] == "True"
    assert s.drift_queries() == before
    s.answers["moe_layer_tokens_total"] = []  # serving exports no per-rank counters
    conditions = s.reconcile(["1.0"] * 4, threshold=4)
    assert conditions["GPUsProfiled"]["reason"] == "SpeedLabels"
    assert gauge("moeplace_gpu_speed_drift_percent") is None  # no claim, no number
    s.answers["moe_layer_tokens_total"] = [{"metric": {"pod": "x"}, "value": [1, "5"]}]
    conditions = s.reconcile(["1.0"] * 4, threshold=4)  # aggregated wrongly: still fine
    assert conditions["GPUsProfiled"]["reason"] == "SpeedLabels"
    assert conditions["Ready"]["status"] == "True"


def test_a_refused_node_patch_never_stops_the_placement(
    events: list[dict[str, Any]], scenario: Callable[[list[str]], Scenario]
) -> None:
    s = scenario(["70000", "100000", "100000", "100000"])
    s.kube.refuse_nodes = True  # a ClusterRole without patch on nodes
    conditions = s.reconcile(["1.0"] * 4)
    assert conditions["GPUsProfiled"]["reason"] == "SpeedDrift"
    assert "re-profile request failed" in conditions["GPUsProfiled"]["message"]
    assert "403 Forbidden" in conditions["GPUsProfiled"]["message"]
    assert conditions["Ready"]["status"] == "True" and "lite-placement" in s.kube.configmaps
    assert s.kube.annotated == []
    s.kube.refuse_nodes = False
    conditions = s.reconcile(["1.0"] * 4)  # retried; the Event is not repeated
    assert conditions["GPUsProfiled"]["message"].endswith("; re-profile requested")
    assert [name for name, _ in s.kube.annotated] == ["n0"]
    assert len([e for e in events if e["reason"] == "SpeedDrift"]) == 1


def test_unprofiled_gpus_keep_their_reason_and_mention_drift(
    events: list[dict[str, Any]], scenario: Callable[[list[str]], Scenario]
) -> None:
    s = scenario(["70000", "100000", "100000", "100000"])
    group_nodes = nodes(["1.0"] * 4)
    labels = {k: v for k, v in group_nodes[1].labels.items() if not k.endswith("speed-1")}
    runtime = Runtime(s.kube, ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    body = moed(s.prometheus.url, None, {})
    partial = [group_nodes[0], node_gpus("n1", labels, {})]
    run = Reconcile(runtime, body, partial, logging.getLogger("t"), s.refused, now=NOW)  # type: ignore[arg-type]
    asyncio.run(run.run())
    profiled = {c["type"]: c for c in s.kube.status["conditions"]}["GPUsProfiled"]
    assert profiled["reason"] == "SpeedLabelsMissing"
    assert "n1/1" in profiled["message"] and "speed drift beyond 10%" in profiled["message"]
