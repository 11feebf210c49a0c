"""Faults of the operator's data sources (issue 13), with fakes: a slow Prometheus beside a
static-load object, partial load series, and an EP group whose Nodes change under a solve.
The same faults on the real cluster: e2e/test_e2e_faults_data.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
import pytest
from fake_prometheus import FakePrometheus, load_matrix
from moeplace_operator import decide, loadsource
from moeplace_operator.build import read_published
from moeplace_operator.events import EventDedup
from moeplace_operator.loadsource import (
    MetricsUnavailableError,
    PrometheusSource,
    fetch_prometheus,
    parse_range_result,
)
from moeplace_operator.nodes import NodeGPUs, build_gpu_group, node_gpus
from moeplace_operator.reconcile import Reconcile
from moeplace_operator.runtime import Runtime
from moeplace_operator.spec import GPUSpec, ModelSpec, PrometheusLoad
from prometheus_client import REGISTRY

from placement.names import (
    GROUP_NODES_ANNOTATION,
    ROLLED_OUT_AT_ANNOTATION,
    VERSION_ANNOTATION,
)

pytestmark = pytest.mark.faults

MODEL = ModelSpec(
    name="m", moe_layers=2, experts_per_layer=4, top_k=1, dense_layers_before=0, hidden_layers=2
)
NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
LOAD_CSV = "moe_layer_index,expert_id,count\n" + "".join(
    f"{layer},{e},{10 * (e + 1)}\n" for layer in range(2) for e in range(4)
)


@pytest.fixture(autouse=True)
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kw: got.append(kw))
    return got


class FakeKube:
    """ConfigMaps and status by object name (one namespace)."""

    def __init__(self) -> None:
        self.configmaps: dict[str, Any] = {"routing": {"data": {"load.csv": LOAD_CSV}}}
        self.status: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []

    def read_configmap(self, namespace: str, name: str) -> Any:
        return self.configmaps.get(name)

    def write_configmap(self, body: Any) -> None:
        self.configmaps[body["metadata"]["name"]] = body
        self.writes.append(body["metadata"]["name"])

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.status[name] = patch["status"]

    def conditions(self, name: str) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.status[name]["conditions"]}


def moed(name: str, load: dict[str, Any], status: dict[str, Any] | None = None) -> kopf.Body:
    return kopf.Body(
        {
            "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "generation": 1},
            "spec": {
                "model": {
                    "name": "m",
                    "moeLayers": 2,
                    "expertsPerLayer": 4,
                    "topK": 1,
                    "denseLayersBefore": 0,
                    "hiddenLayers": 2,
                },
                "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 2, "gpusPerNode": 2},
                "placement": {"strategy": "greedy"},
                "load": load,
                "rollout": {"cooldown": "0s"},
            },
            "status": status or {},
        }
    )


def node(name: str, speeds: tuple[str, str] = ("1.0", "0.8"), **kw: Any) -> NodeGPUs:
    labels = {"pool": kw.pop("pool", "a")}
    labels |= {f"gpu.moeplace.io/speed-{i}": s for i, s in enumerate(speeds)}
    return node_gpus(name, labels, {}, **kw)


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# --- a slow Prometheus beside a static load ---------------------------------------------------


def test_a_slow_prometheus_holds_no_status_write_of_a_static_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight objects read a Prometheus that answers after 4 s (timeout 2 s), as many as the
    Kubernetes I/O pool has threads; a static-load object reconciles beside them. Its pass
    must not wait for their queries (it did when both shared one pool: 1.8 s), and each slow
    object is Degraded with a message that says it timed out (it said "connection failed",
    after two attempts)."""
    monkeypatch.setattr(loadsource, "QUERY_TIMEOUT_S", 2)
    slow = FakePrometheus(load_matrix(NOW), "matrix", delay_s=4.0)
    kube = FakeKube()
    runtime = Runtime(kube, ThreadPoolExecutor(2), solver_threads=1)  # type: ignore[arg-type]
    dedup = EventDedup()
    prometheus_load = {"prometheus": {"url": slow.url, "window": "30m", "samples": 3}}
    bodies = [moed(f"slow-{i}", prometheus_load) for i in range(runtime.io_pool._max_workers)]
    static_s: list[float] = []

    async def timed_static() -> None:
        await asyncio.sleep(0.2)  # the slow queries have taken their threads
        started = time.monotonic()
        body = moed("static", {"static": {"configMapName": "routing"}})
        await Reconcile(runtime, body, nodes_ab(), logging.getLogger("t"), dedup).run()
        static_s.append(time.monotonic() - started)

    async def all_passes() -> None:
        slow_passes = [
            Reconcile(runtime, b, nodes_ab(), logging.getLogger("t"), dedup).run() for b in bodies
        ]
        await asyncio.gather(*slow_passes, timed_static())

    started = time.monotonic()
    try:
        asyncio.run(all_passes())
    finally:
        slow.close()
    slow_s = time.monotonic() - started
    print(
        f"\nFAULT prometheus-slow static_pass_s={static_s[0]:.2f} beside 8 slow passes "
        f"(all done in {slow_s:.1f} s)"
    )
    assert kube.conditions("static")["Ready"]["status"] == "True"
    assert static_s[0] < 1.0  # a shared pool: 1.8 s, behind the slow queries
    for body in bodies:
        degraded = kube.conditions(body["metadata"]["name"])["Degraded"]
        assert degraded["reason"] == "PrometheusUnreachable"
        assert "no answer within 2 s (query timeout)" in degraded["message"]
    assert [w for w in kube.writes if w.startswith("slow")] == []  # no placement without load


def test_a_refused_connection_is_not_called_a_timeout() -> None:
    source = PrometheusSource(PrometheusLoad(url="http://127.0.0.1:1"))
    with pytest.raises(MetricsUnavailableError) as error:
        fetch_prometheus(source, MODEL, NOW)
    assert str(error.value).endswith("connection failed")


def nodes_ab() -> list[NodeGPUs]:
    return [node("n-a"), node("n-b", ("1.2", "0.9"))]


# --- partial and reset series -----------------------------------------------------------------


def series(cells: list[tuple[int, int]], times: list[int], value: str = "5") -> list[Any]:
    return [
        {"metric": {"layer": str(layer), "expert": str(e)}, "values": [[t, value] for t in times]}
        for layer, e in cells
    ]


ALL_CELLS = [(layer, e) for layer in range(2) for e in range(4)]


def test_missing_series_are_refused_not_counted_as_zero() -> None:
    with pytest.raises(MetricsUnavailableError, match=r"2 of 8 \(layer, expert\) series") as e:
        parse_range_result(series(ALL_CELLS[:6], [0, 600, 1200]), MODEL, 0, 3)
    assert e.value.reason == "BadLoadSeries" and "first layer 1, expert 2" in str(e.value)


def test_a_series_with_a_gap_is_refused() -> None:
    full = series(ALL_CELLS[:-1], [0, 600, 1200])
    with pytest.raises(MetricsUnavailableError, match="1 series lack points") as e:
        parse_range_result(full + series(ALL_CELLS[-1:], [0, 1200]), MODEL, 0, 3)
    assert e.value.reason == "BadLoadSeries" and "first layer 1, expert 3" in str(e.value)


def test_a_young_counter_fills_the_latest_samples_only() -> None:
    """Serving started 10 minutes ago: every series has the same single point."""
    samples = parse_range_result(series(ALL_CELLS, [1200]), MODEL, 0, 3)
    assert samples[:2].sum() == 0 and (samples[2] == 5).all()


# --- the EP group: stable ranks, nodes that change under a solve -----------------------------


SPEC = GPUSpec(node_selector={"pool": "a"}, node_count=2, gpus_per_node=2)


def test_group_keeps_its_ranks_and_replaces_only_a_node_that_left() -> None:
    in_service = ["n-c", "n-a"]  # ranks 0-1 on n-c, 2-3 on n-a
    nodes = [node("n-a"), node("n-c"), node("n-0-earlier")]
    assert build_gpu_group(nodes, SPEC, in_service).nodes == ["n-c", "n-a"]
    assert build_gpu_group(nodes, SPEC).nodes == ["n-0-earlier", "n-a"]  # none in service
    cordoned = [node("n-a"), node("n-c", usable=False), node("n-b"), node("n-0-earlier")]
    assert build_gpu_group(cordoned, SPEC, in_service).nodes == ["n-0-earlier", "n-a"]
    relabelled = [node("n-a", pool="b"), node("n-c"), node("n-b")]
    assert build_gpu_group(relabelled, SPEC, in_service).nodes == ["n-c", "n-b"]
    assert build_gpu_group(nodes, SPEC, ["n-a", "n-a"]).nodes == ["n-a", "n-0-earlier"]


MUTATIONS: dict[str, Callable[[list[NodeGPUs]], list[NodeGPUs]]] = {
    "deleted": lambda nodes: nodes[1:],
    "not-ready-or-cordoned": lambda nodes: [node("n-a", usable=False), *nodes[1:]],
    "relabelled": lambda nodes: [node("n-a", pool="b"), *nodes[1:]],
    "speed-changed": lambda nodes: [node("n-a", ("0.5", "0.8")), *nodes[1:]],
}


@pytest.fixture
def mid_solve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[..., Any]], None]]:
    """``mid_solve(change)``: ``change()`` runs once, inside the next solve."""
    original = decide.plan
    pending: list[Callable[..., Any]] = []

    def plan(*args: Any) -> Any:
        result = original(*args)
        while pending:
            pending.pop()()
        return result

    monkeypatch.setattr(decide, "plan", plan)
    yield pending.append


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_group_changed_mid_solve_drops_the_stale_plan(
    mutation: str, mid_solve: Callable[[Callable[..., Any]], None]
) -> None:
    """n-a leaves the group (or changes speed) while the first placement is solved for
    [n-a, n-b]: that plan is dropped, the placement written is solved for the group as it is
    now, once; a later node that sorts first shifts no rank and writes nothing."""
    live = [node("n-a"), node("n-b", ("1.2", "0.9")), node("n-c", ("0.9", "1.1"))]
    kube = FakeKube()
    runtime = Runtime(kube, ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    dedup = EventDedup()

    def change() -> None:
        live[:] = MUTATIONS[mutation](live)

    def one_pass() -> None:
        body = moed("lite", {"static": {"configMapName": "routing"}}, kube.status.get("lite"))
        run = Reconcile(runtime, body, list(live), logging.getLogger("t"), dedup)
        run.live_nodes = lambda: list(live)
        asyncio.run(run.run())

    stale_before = counter("moeplace_stale_plans_total")
    mid_solve(change)
    one_pass()
    expected = ["n-a", "n-b"] if mutation == "speed-changed" else ["n-b", "n-c"]
    written = kube.configmaps["lite-placement"]
    assert written["metadata"]["annotations"][GROUP_NODES_ANNOTATION] == ",".join(expected)
    assert kube.writes == ["lite-placement"]
    assert counter("moeplace_stale_plans_total") - stale_before == 1
    published = read_published(written)
    assert published is not None and list(published.nodes) == expected
    assert kube.conditions("lite")["Ready"]["status"] == "True"
    live.append(node("a-first", ("2.0", "2.0")))
    one_pass()
    assert kube.writes == ["lite-placement"]  # same group, same ranks: nothing rewritten


def test_recording_the_group_keeps_the_placement_version() -> None:
    """A placement map written before the EP group was recorded (an upgrade from a release
    without the group-nodes annotation) gets the annotation on the next pass, with the same
    content, version and rollout time: serving has nothing to reload, cooldown keeps running."""
    live = [node("n-a"), node("n-b", ("1.2", "0.9"))]
    kube = FakeKube()
    runtime = Runtime(kube, ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    dedup = EventDedup()

    def one_pass() -> None:
        body = moed("lite", {"static": {"configMapName": "routing"}}, kube.status.get("lite"))
        run = Reconcile(runtime, body, list(live), logging.getLogger("t"), dedup)
        run.live_nodes = lambda: list(live)
        asyncio.run(run.run())

    one_pass()
    first = kube.configmaps["lite-placement"]
    annotations = first["metadata"]["annotations"]
    before = {k: annotations[k] for k in (VERSION_ANNOTATION, ROLLED_OUT_AT_ANNOTATION)}
    del annotations[GROUP_NODES_ANNOTATION]  # as an older release wrote it
    one_pass()
    assert kube.writes == ["lite-placement", "lite-placement"]
    again = kube.configmaps["lite-placement"]
    assert again["metadata"]["annotations"][GROUP_NODES_ANNOTATION] == "n-a,n-b"
    assert {k: again["metadata"]["annotations"][k] for k in before} == before
    assert again["data"] == first["data"]
    one_pass()
    assert len(kube.writes) == 2  # recorded: nothing more to write
