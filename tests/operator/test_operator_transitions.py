"""Layer-to-layer transitions for trafficWeight: parsers, scaling, the plan, and what a
reconcile reports when they are missing or present."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
import numpy as np
import pytest
from fake_prometheus import FakePrometheus
from moeplace_operator.events import EventDedup
from moeplace_operator.loadsource import (
    LoadData,
    MetricsUnavailableError,
    PrometheusSource,
    default_transitions_query,
    fetch_prometheus_transitions,
    parse_static_transitions,
    parse_transitions_result,
    scale_transitions,
)
from moeplace_operator.nodes import GPUGroup, node_gpus
from moeplace_operator.planning import build_problem, load_holds, plan
from moeplace_operator.reconcile import Reconcile
from moeplace_operator.runtime import Context, Runtime
from moeplace_operator.spec import (
    ModelSpec,
    MoEDeploymentSpec,
    PlacementSummary,
    PrometheusLoad,
)
from moeplace_operator.status import status_patch

from placement.model import Cluster
from placement.policy import gain_percent

MODEL = ModelSpec(
    name="m", moe_layers=3, experts_per_layer=4, top_k=2, dense_layers_before=0, hidden_layers=3
)
HEADER = "moe_layer_index,src_expert,dst_expert,count\n"


def csv_of(counts: np.ndarray, first_layer: int = 1) -> str:
    rows = [
        f"{layer + first_layer},{i},{j},{counts[layer, i, j]:g}\n"
        for layer, i, j in zip(*np.nonzero(counts), strict=True)
    ]
    return HEADER + "".join(rows)


def configmap(data: dict[str, str] | None = None, binary: dict[str, bytes] | None = None) -> Any:
    encoded = {k: base64.b64encode(v).decode() for k, v in (binary or {}).items()}
    return {"metadata": {"name": "routing"}, "data": data or {}, "binaryData": encoded}


# --- Prometheus instant vector ---------------------------------------------------------------


def series(layer: Any, src: Any, dst: Any, value: str) -> dict[str, Any]:
    return {"metric": {"layer": layer, "src": src, "dst": dst}, "value": [1.0, value]}


def test_prometheus_transitions_validated_and_summed() -> None:
    result = [
        series("1", "0", "3", "5"),
        series("1", "0", "3", "2"),  # another series of the same pair (not aggregated): summed
        series("2", "1", "1", "4"),
        series("3", "1", "1", "9"),  # the last MoE layer has no next layer: ignored
        series("2", "2", "2", "NaN"),
    ]
    counts = parse_transitions_result(result, MODEL, layer_offset=1)
    assert counts.shape == (2, 4, 4)
    assert counts[0, 0, 3] == 7 and counts[1, 1, 1] == 4 and counts.sum() == 11
    assert parse_transitions_result([], MODEL, layer_offset=0).sum() == 0


@pytest.mark.parametrize(
    ("result", "match"),
    [
        ([{"metric": {"layer": "1", "src": "0"}, "value": [1, "3"]}], "dst"),
        ([series("1", "x", "0", "3")], "src"),
        ([series("1", "0", "0", "many")], "value"),
        ([series("1", "0", "4", "3")], "outside"),
    ],
)
def test_prometheus_transitions_rejected_readably(result: Any, match: str) -> None:
    with pytest.raises(MetricsUnavailableError, match=match) as error:
        parse_transitions_result(result, MODEL, layer_offset=1)
    assert error.value.reason == "BadTransitions"


def test_default_transitions_query() -> None:
    query = default_transitions_query('a"b')
    assert query.startswith("sum by (layer, src, dst) (increase(moe_expert_transitions_total{")
    assert 'model="a\\"b"' in query and "[$window]" in query


def test_fetch_prometheus_transitions_instant_query_over_the_window() -> None:
    from datetime import UTC, datetime

    prometheus = FakePrometheus([series("1", "2", "3", "8")])
    try:
        spec = PrometheusLoad(url=prometheus.url, window="2h", layer_offset=1)
        now = datetime(2026, 1, 1, tzinfo=UTC)
        counts = fetch_prometheus_transitions(PrometheusSource(spec), MODEL, now)
        assert counts[0, 2, 3] == 8 and counts.sum() == 8
        (query,) = prometheus.queries
        assert query["query"] == [default_transitions_query("m").replace("$window", "2h")]
        assert float(query["time"][0]) == now.timestamp()
    finally:
        prometheus.close()
    empty = FakePrometheus([])
    try:
        with pytest.raises(MetricsUnavailableError, match="transitions=True") as error:
            fetch_prometheus_transitions(
                PrometheusSource(PrometheusLoad(url=empty.url)), MODEL, now
            )
        assert error.value.reason == "NoTransitions"
    finally:
        empty.close()
    with pytest.raises(MetricsUnavailableError) as error:
        fetch_prometheus_transitions(
            PrometheusSource(PrometheusLoad(url="http://127.0.0.1:1")), MODEL, now
        )
    assert error.value.reason == "TransitionsQueryFailed"


# --- static ConfigMap --------------------------------------------------------------------------


def test_static_transitions_csv_gzip_and_npy() -> None:
    counts = np.arange(2 * 4 * 4, dtype=np.float64).reshape(2, 4, 4)
    text = csv_of(counts)
    got = parse_static_transitions(configmap({"t.csv": text}), "t.csv", MODEL)
    assert (got == counts).all()
    zipped = configmap(binary={"t.csv.gz": gzip.compress(text.encode())})
    assert (parse_static_transitions(zipped, "t.csv.gz", MODEL) == counts).all()
    raw = io.BytesIO()
    np.save(raw, counts.astype(np.int64))
    npy = configmap(binary={"t.npy.gz": gzip.compress(raw.getvalue())})
    assert (parse_static_transitions(npy, "t.npy.gz", MODEL) == counts).all()


@pytest.mark.parametrize(
    ("cm", "reason", "match"),
    [
        (configmap({"load.csv": "x"}), "TransitionsMissing", "key t not found"),
        (configmap({"t": "a,b\n1,2\n"}), "BadTransitions", "columns"),
        (configmap({"t": HEADER + "1,0,0,1\n3,0,0,1\n"}), "BadTransitions", "consecutive"),
        (configmap({"t": HEADER + "1,0,0,1\n2,0,0,1\n3,0,0,1\n"}), "BadTransitions", "3 distinct"),
        (configmap(binary={"t": b"\x1f\x8bnot gzip"}), "BadTransitions", "routing key t"),
        (
            configmap(binary={"t": gzip.compress((HEADER + "1,0,0,1\n2,0,0,1\n").encode())[:-12]}),
            "BadTransitions",
            "truncated",
        ),
        (configmap(binary={"t": b"\x93NUMPY garbage"}), "BadTransitions", "routing key t"),
        ({"metadata": {"name": "routing"}, "binaryData": {"t": "!!"}}, "BadTransitions", "t"),
    ],
)
def test_static_transitions_problems_have_reasons(cm: Any, reason: str, match: str) -> None:
    with pytest.raises(MetricsUnavailableError, match=match) as error:
        parse_static_transitions(cm, "t", MODEL)
    assert error.value.reason == reason


def test_npy_of_the_wrong_shape_is_rejected() -> None:
    raw = io.BytesIO()
    np.save(raw, np.ones((3, 4, 4)))
    with pytest.raises(MetricsUnavailableError, match="needs \\(2, 4, 4\\)"):
        parse_static_transitions(configmap(binary={"t": raw.getvalue()}), "t", MODEL)


def test_scale_transitions_to_the_load() -> None:
    load = np.full((3, 4), 10.0)  # 40 token-expert pairs per layer = 20 tokens at top-2
    raw = np.ones((2, 4, 4))  # 32 pairs: a sample; the load needs 2 * 40 = 80 per boundary
    scaled, factor = scale_transitions(raw, load, top_k=2)
    assert factor == pytest.approx(5.0) and scaled.sum() == pytest.approx(160)
    with pytest.raises(MetricsUnavailableError) as error:
        scale_transitions(np.zeros((2, 4, 4)), load, top_k=2)
    assert error.value.reason == "NoTransitions"


# --- the plan ----------------------------------------------------------------------------------


def diagonal_instance(weight: float) -> tuple[MoEDeploymentSpec, GPUGroup, LoadData]:
    """4 layers x 8 experts on 4 GPUs x 2 slots; every token keeps its expert from layer to
    layer (T[l] = diag), with a mild skew so that balancing alone does not co-locate them."""
    layers, experts = 4, 8
    spec = MoEDeploymentSpec.model_validate(
        {
            "model": {
                "name": "m",
                "moeLayers": layers,
                "expertsPerLayer": experts,
                "topK": 1,
                "denseLayersBefore": 0,
                "hiddenLayers": layers,
            },
            "gpus": {"nodeSelector": {"p": "a"}, "nodeCount": 1, "gpusPerNode": 4},
            "placement": {"strategy": "cpsat", "timeLimitSeconds": 1, "trafficWeight": weight},
            "load": {"static": {"configMapName": "load"}},
        }
    )
    rng = np.random.default_rng(7)
    load = rng.integers(80, 120, size=(layers, experts)).astype(float)
    trans = np.stack([np.diag(load[layer]) for layer in range(layers - 1)])
    cluster = Cluster.uniform(4, 4, [1.0, 1.0, 1.0, 1.0])
    return spec, GPUGroup(cluster, cluster.nodes, []), LoadData(load, None, "t", trans)


def test_transitions_reach_the_problem_and_the_cached_plan_check() -> None:
    spec, group, load = diagonal_instance(1.0)
    problem = build_problem(spec, group, load, None)
    assert problem.transitions is not None and problem.weights.traffic == 1.0
    without = LoadData(load.load, None, "t")
    assert load_holds(load, load) and not load_holds(load, without)


def test_traffic_weight_lowers_the_traffic_share_and_gains_count_it() -> None:
    ignored = plan(*diagonal_instance(0.0), None, solver_threads=1)
    spec, group, load = diagonal_instance(1.0)
    # the weight-0 placement is in service: the traffic-aware one must win on the full cost
    weighted = plan(spec, group, load, ignored.solution.placement, solver_threads=1)
    assert np.isfinite(ignored.proposal.traffic_share)  # scored whenever transitions are known
    assert np.isfinite(weighted.eplb.traffic_share)
    print(
        f"\ntraffic share: weight 0 {ignored.proposal.traffic_share:.3f}, weight 1 "
        f"{weighted.proposal.traffic_share:.3f}, EPLB {weighted.eplb.traffic_share:.3f}; "
        f"gain over the weight-0 placement {weighted.gain_over_current:.1f}%"
    )
    assert weighted.proposal.traffic_share < ignored.proposal.traffic_share - 0.2
    assert weighted.current is not None and load.transitions is not None
    crossing = weighted.current.traffic_share * load.transitions.sum()
    assert weighted.cost(weighted.current) == pytest.approx(
        weighted.current.straggler + 1.0 * crossing
    )
    straggler_gain = gain_percent(weighted.current.straggler, weighted.proposal.straggler)
    assert weighted.gain_over_current > max(10, straggler_gain + 10)
    assert ignored.cost(ignored.proposal) == ignored.proposal.straggler  # weight 0: unchanged


# --- a reconcile, with a fake API ----------------------------------------------------------------


class FakeKube:
    def __init__(self, configmaps: dict[str, Any]) -> None:
        self.configmaps = configmaps
        self.status: dict[str, Any] = {}
        self.patches: list[dict[str, Any]] = []

    def read_configmap(self, namespace: str, name: str) -> Any:
        return self.configmaps.get(name)

    def write_configmap(self, body: Any) -> None:
        self.configmaps[body["metadata"]["name"]] = body

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.patches.append(patch)
        self.status = patch["status"]


def moed(weight: float, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "lite", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {
            "model": {
                "name": "m",
                "moeLayers": 3,
                "expertsPerLayer": 4,
                "topK": 2,
                "denseLayersBefore": 0,
                "hiddenLayers": 3,
            },
            "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 1, "gpusPerNode": 2},
            "placement": {"strategy": "greedy", "trafficWeight": weight},
            "load": {"static": {"configMapName": "routing"}},
        },
        "status": status,
    }


def run_reconcile(kube: FakeKube, weight: float, refused: EventDedup) -> dict[str, Any]:
    runtime = Runtime(kube, ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    nodes = [node_gpus("n0", {"pool": "a", "gpu.moeplace.io/speed-0": "1.0"}, {})]
    body = moed(weight, kube.status)
    asyncio.run(Reconcile(runtime, body, nodes, logging.getLogger("t"), refused).run())  # type: ignore[arg-type]
    return {c["type"]: c for c in kube.status["conditions"]}


def test_missing_transitions_are_reported_then_used(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kw: events.append(kw))
    load_csv = "moe_layer_index,expert_id,count\n" + "".join(
        f"{layer},{e},{10 + layer + e}\n" for layer in (1, 2, 3) for e in range(4)
    )
    kube = FakeKube({"routing": configmap({"load.csv": load_csv})})
    refused = EventDedup()

    conditions = run_reconcile(kube, 0.5, refused)
    solved = conditions["PlacementSolved"]
    assert solved["status"] == "True" and solved["reason"] == "SolvedWithoutTraffic"
    assert "trafficWeight 0.5 ignored" in solved["message"]
    assert "TransitionsMissing" in solved["message"]
    assert (
        "transitions unavailable (TransitionsMissing)" in conditions["MetricsAvailable"]["message"]
    )
    assert conditions["Ready"]["status"] == "True"  # never degraded for this
    warnings = [e for e in events if e["reason"] == "TransitionsUnavailable"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert kube.status["placement"]["trafficSharePercent"] is None  # null: none known

    run_reconcile(kube, 0.5, refused)  # same cause: no second Event
    assert len([e for e in events if e["reason"] == "TransitionsUnavailable"]) == 1

    trans = np.ones((2, 4, 4))
    kube.configmaps["routing"]["data"]["transitions.csv"] = csv_of(trans)
    conditions = run_reconcile(kube, 0.5, refused)
    assert conditions["PlacementSolved"]["reason"] == "Solved"
    assert "tokens changing GPU between layers" in conditions["PlacementSolved"]["message"]
    assert (
        "transitions from ConfigMap routing key transitions.csv"
        in (conditions["MetricsAvailable"]["message"])
    )
    summary = kube.status["placement"]
    assert summary["trafficSharePercent"].endswith("%")
    assert summary["eplbTrafficSharePercent"].endswith("%")

    # weight back to 0: transitions are not read, the shares are removed (null in the patch)
    conditions = run_reconcile(kube, 0.0, refused)
    assert conditions["PlacementSolved"]["reason"] == "Solved"
    assert kube.patches[-1]["status"]["placement"]["trafficSharePercent"] is None


def test_status_patch_clears_unknown_traffic_shares() -> None:
    patch = status_patch(generation=1, conditions=[], summary=PlacementSummary(hash="h"))
    assert patch["status"]["placement"] == {
        "hash": "h",
        "trafficSharePercent": None,
        "eplbTrafficSharePercent": None,
    }


def test_transitions_are_read_again_only_when_their_source_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Megabytes of query answer per read: a Prometheus read is reused for one sub-window
    (window / samples), a static one while the ConfigMap's resourceVersion holds."""
    from datetime import UTC, datetime, timedelta

    from moeplace_operator import observe

    reads: list[str] = []

    def fake_fetch(source: Any, model: Any, now: datetime) -> np.ndarray:
        reads.append("prometheus")
        return np.ones((2, 4, 4))

    def fake_parse(found: Any, key: str, model: Any) -> np.ndarray:
        reads.append(f"configmap {found['metadata'].get('resourceVersion')}")
        return np.ones((2, 4, 4))

    monkeypatch.setattr(observe, "fetch_prometheus_transitions", fake_fetch)
    monkeypatch.setattr(observe, "parse_static_transitions", fake_parse)
    runtime = Runtime(FakeKube({}), ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)

    def read(body: dict[str, Any], minutes: float, configmap: Any = None) -> None:
        now = start + timedelta(minutes=minutes)
        step = Context(runtime, body, [], logging.getLogger("t"), EventDedup(), now)  # type: ignore[arg-type]
        spec = MoEDeploymentSpec.model_validate(body["spec"])
        # what ``read_load`` resolves first
        prometheus = PrometheusSource(spec.load.prometheus) if spec.load.prometheus else None
        asyncio.run(observe.read_transitions(step, spec, prometheus, configmap))

    body = moed(0.5, {})
    body["spec"]["load"] = {"prometheus": {"url": "http://p:9090", "window": "1h", "samples": 6}}
    read(body, 0)
    read(body, 9)  # within the 10-minute sub-window: reused
    read(body, 11)  # one sub-window later: read again
    body["spec"]["load"]["prometheus"]["window"] = "2h"
    read(body, 12)  # the query changed: read again
    assert reads == ["prometheus"] * 3

    reads.clear()
    static = moed(0.5, {})
    version = {"metadata": {"name": "routing", "resourceVersion": "7"}, "data": {}}
    read(static, 20, version)
    read(static, 500, version)  # same version: reused however late
    read(static, 501, {**version, "metadata": {"name": "routing", "resourceVersion": "8"}})
    assert reads == ["configmap 7", "configmap 8"]
    runtime.forget("ns/lite")
    assert "ns/lite" not in runtime.transitions
