"""Faults of the operator's data, on the real local cluster (issue 13): Prometheus down, slow
beyond its timeout, answering NaN or partial series, counters reset; nodes of the EP group
deleted, NotReady, cordoned or relabelled, after a rollout and in the middle of a solve.

The real operator process, the real Prometheus scraping a routing exporter (real
DeepSeek-V2-Lite counts); faults of Prometheus are injected by an HTTP proxy in front of it
(the shared Prometheus is never stopped), a counter reset by zeroing the exporter's counters.
After each fault heals: one valid placement ConfigMap, status true to it, the rollouts counted
(no flapping), and the time to converge printed (anchor: CloudNativePG recovers from a degraded
state within 60 s), as ``FAULT <name> ...`` lines.

Run: ``pytest -m "e2e and faults" e2e/test_e2e_faults_data.py -s``.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import Cluster, wait_for
from test_operator import (
    OperatorProcess,
    RoutingExporter,
    apply,
    condition,
    crd,  # noqa: F401 (a fixture)
    fresh_namespace,
    get,
    manifest,
    needs_data,
    put_load,
    routing_csv,
    wait_condition,
)

from placement.formats import parse_canonical
from placement.names import GROUP_NODES_ANNOTATION, VERSION_ANNOTATION
from placement.validate import validate

pytestmark = [pytest.mark.e2e, pytest.mark.faults, needs_data]

PREFIX = "dfault-"
ANCHOR_S = 60.0  # CloudNativePG: recovery from a degraded state within 60 s
GPUS = 2  # per node; groups of 2 nodes: 64 experts on 4 GPUs


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster,
    crd: None,  # noqa: F811 (test_operator's fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(cluster, log, env={"MOEPLACE_NAMESPACES": f"{PREFIX}*"})
    process.start()
    try:
        yield process
    finally:
        process.stop()
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print("operator log (tail):\n" + "\n".join(tail))


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    yield from fresh_namespace(cluster, PREFIX)


def placement_cm(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """The placement ConfigMap, checked whole: it parses, validates, and its hash key is
    the placement's (never lost, never half-written)."""
    cm = get(cluster, "configmap", f"{name}-placement", namespace)
    assert cm is not None, "the placement ConfigMap is gone"
    plan = parse_canonical(cm["data"]["placement.json"], allow_duplicates=True)
    validate(plan, allow_duplicates=True)
    assert cm["data"]["hash"] == plan.content_hash()
    return cm


def version(cm: dict[str, Any]) -> int:
    return int(cm["metadata"]["annotations"][VERSION_ANNOTATION])


def group_nodes(cm: dict[str, Any]) -> list[str]:
    return str(cm["metadata"]["annotations"][GROUP_NODES_ANNOTATION]).split(",")


def sample(operator: OperatorProcess, metric: str) -> float:
    found = re.search(rf"^{metric} (\S+)$", operator.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


# --- Prometheus faults ------------------------------------------------------------------------


class FaultyPrometheus:
    """An HTTP proxy in front of the real Prometheus with a switchable fault: ``None``
    (pass through), ``down`` (nothing listens: connection refused), ``slow`` (answers after
    ``slow_s``), ``nan`` (one point of the answer is NaN), ``partial`` (a tenth of the series
    left out, as a partial scrape would)."""

    def __init__(self, upstream: str, slow_s: float = 13.0) -> None:
        self.upstream, self.slow_s = upstream, slow_s
        self.fault: str | None = None
        self.server = self._serve(0)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if proxy.fault == "slow":
                    time.sleep(proxy.slow_s)
                try:
                    with urllib.request.urlopen(proxy.upstream + self.path, timeout=30) as up:
                        status, body = up.status, up.read()
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
                body = proxy.rewrite(body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError):  # the operator gave up (slow)
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def rewrite(self, body: bytes) -> bytes:
        if self.fault not in ("nan", "partial"):
            return body
        answer = json.loads(body)
        result = answer.get("data", {}).get("result", [])
        if answer.get("data", {}).get("resultType") != "matrix" or not result:
            return body
        if self.fault == "nan":
            result[len(result) // 2]["values"][-1][1] = "NaN"
        else:
            answer["data"]["result"] = [s for i, s in enumerate(result) if i % 10]
        return json.dumps(answer).encode()

    def set(self, fault: str | None) -> None:
        if fault == "down" and self.fault != "down":
            self.server.shutdown()
            self.server.server_close()
        elif fault != "down" and self.fault == "down":
            self.server = self._serve(self.port)
        self.fault = fault

    def close(self) -> None:
        if self.fault != "down":
            self.server.shutdown()
            self.server.server_close()


@dataclass
class PrometheusObject:
    """A Ready MoEDeployment whose load comes from Prometheus through ``proxy``."""

    name: str
    namespace: str
    proxy: FaultyPrometheus
    exporter: RoutingExporter


@pytest.fixture(scope="module")
def prometheus_object(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> Iterator[PrometheusObject]:
    pool = f"{namespace}-prom"
    cluster.make_nodes(2, GPUS, speeds=[[1.0, 0.8], [1.2, 0.9]], pool=pool, prefix=pool)
    model = f"lite-{namespace}"
    exporter = RoutingExporter(model)
    job = f"routing-{namespace}"
    cluster.add_scrape_target(job, f"127.0.0.1:{exporter.port}")
    proxy = FaultyPrometheus(cluster.prometheus_url)
    try:
        cluster.wait_prom(
            f'sum(rate(moe_expert_tokens_total{{model="{model}"}}[5s])) > 0', timeout=60
        )
        obj = manifest(
            "prom",
            namespace,
            pool,
            model={"name": model},
            gpus={"nodeCount": 2, "gpusPerNode": GPUS},
            placement={"strategy": "greedy"},
        )
        prometheus = {"url": proxy.url, "window": "30s", "samples": 3, "layerOffset": 1}
        obj["spec"]["load"] = {"prometheus": prometheus}
        apply(cluster, obj)
        wait_condition(cluster, "prom", namespace, "Ready", timeout=120)
        yield PrometheusObject("prom", namespace, proxy, exporter)
    finally:
        proxy.close()
        cluster.remove_scrape_target(job)
        exporter.close()
        cluster.kubectl("delete", "moed", "prom", "-n", namespace, "--timeout=60s", check=False)
        cluster.delete_nodes(pool=pool)


PROMETHEUS_FAULTS = {  # fault -> the Degraded reason and a part of its message
    "down": ("PrometheusUnreachable", "connection failed"),
    "slow": ("PrometheusUnreachable", "no answer within 10 s (query timeout)"),
    "nan": ("BadLoadSeries", "NaN"),
    "partial": ("BadLoadSeries", "series missing"),
}


@pytest.mark.parametrize("fault", PROMETHEUS_FAULTS)
def test_prometheus_fault_degrades_keeps_the_placement_and_recovers(
    cluster: Cluster, prometheus_object: PrometheusObject, fault: str
) -> None:
    target = prometheus_object
    name, namespace = target.name, target.namespace
    before = placement_cm(cluster, namespace, name)
    reason, says = PROMETHEUS_FAULTS[fault]
    started = time.monotonic()
    target.proxy.set(fault)
    try:
        obj = wait_condition(cluster, name, namespace, "Degraded", reason=reason, timeout=90)
        detected_s = time.monotonic() - started
        degraded = condition(obj, "Degraded")
        assert says in degraded["message"] and before["data"]["hash"] in degraded["message"]
        assert condition(obj, "Ready")["status"] == "False"
        assert condition(obj, "MetricsAvailable")["reason"] == reason
        during = placement_cm(cluster, namespace, name)
        assert during["data"]["hash"] == before["data"]["hash"]  # kept, not rolled out
    finally:
        target.proxy.set(None)
    healed = time.monotonic()
    obj = wait_condition(cluster, name, namespace, "Ready", timeout=ANCHOR_S)
    converged_s = time.monotonic() - healed
    assert condition(obj, "Degraded")["status"] == "False"
    assert condition(obj, "MetricsAvailable")["reason"] == "Prometheus"
    after = placement_cm(cluster, namespace, name)
    rollouts = version(after) - version(before)
    print(
        f"\nFAULT prometheus-{fault} detected_s={detected_s:.1f} converged_s={converged_s:.1f} "
        f"rollouts={rollouts}"
    )
    assert rollouts == 0  # the load did not change: nothing to roll out, no flapping
    assert converged_s < ANCHOR_S


def test_counter_reset_is_no_fault(cluster: Cluster, prometheus_object: PrometheusObject) -> None:
    """The routing counters drop to zero (a serving pod restarted): the load query's
    increase() takes the reset in its stride; the object stays Ready, nothing rolls out."""
    target = prometheus_object
    name, namespace = target.name, target.namespace
    before = placement_cm(cluster, namespace, name)
    for child, _rate in target.exporter.rates:
        child._value.set(0.0)  # what a restarted pod's counters read
    started, watched_s = time.monotonic(), 25.0  # two and a half sub-windows
    worst: list[str] = []
    while time.monotonic() - started < watched_s:
        obj = get(cluster, "moed", name, namespace)
        for kind, healthy in (("Ready", "True"), ("Degraded", "False")):
            if condition(obj, kind).get("status") != healthy:
                worst.append(f"{kind}: {condition(obj, kind)}")
        time.sleep(0.5)
    after = placement_cm(cluster, namespace, name)
    rollouts = version(after) - version(before)
    print(
        f"\nFAULT counter-reset watched_s={watched_s:.0f} unhealthy_polls={len(worst)} "
        f"rollouts={rollouts}"
    )
    assert not worst, worst[0]
    assert rollouts == 0


# --- EP group nodes ---------------------------------------------------------------------------


def cordon(cluster: Cluster, node: str) -> None:
    cluster.kubectl("cordon", node)


def not_ready(cluster: Cluster, node: str) -> None:
    """Its kubelet gone: kwok stops managing it (else it sets Ready back at once), and Ready
    turns False, as the node lifecycle controller would after the lease expires."""
    cluster.kubectl("annotate", "node", node, "kwok.x-k8s.io/node-")
    patch = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Test"}]}}
    cluster.kubectl("patch", "node", node, "--subresource=status", "-p", json.dumps(patch))


def delete(cluster: Cluster, node: str) -> None:
    cluster.kubectl("delete", "node", node)


def relabel(cluster: Cluster, node: str) -> None:
    cluster.kubectl("label", "node", node, "--overwrite", "gpu.moeplace.io/pool=elsewhere")


NODE_FAULTS: dict[str, Callable[[Cluster, str], None]] = {
    "deleted": delete,
    "not-ready": not_ready,
    "cordoned": cordon,
    "relabelled": relabel,
}


NODE_TEST_LABEL = "faults-test=nodes"


@pytest.fixture
def node_pool(cluster: Cluster, namespace: str) -> Iterator[tuple[str, list[str]]]:
    """Three nodes for a group of two: ``-0`` and ``-1`` are chosen first, ``-2`` is spare."""
    pool = f"{namespace}-{uuid.uuid4().hex[:4]}"
    names = cluster.make_nodes(
        3, GPUS, speeds=[[1.0, 0.8], [1.2, 0.9], [0.9, 1.1]], pool=pool, prefix=pool
    )
    yield pool, names
    # its MoEDeployments first: left over, their passes would crowd the next test's solve
    cluster.kubectl("delete", "moed", "-n", namespace, "-l", NODE_TEST_LABEL, "--timeout=60s")
    cluster.delete_nodes(pool=pool)
    cluster.delete_nodes(selector=f"kubernetes.io/hostname in ({','.join(names)})")


def static_object(
    cluster: Cluster,
    namespace: str,
    pool: str,
    source: dict[str, Any] | None = None,
    **placement: Any,
) -> str:
    """A MoEDeployment on ``pool`` (the static routing load unless ``source``), removed with
    the pool."""
    name = f"n{uuid.uuid4().hex[:6]}"
    obj = manifest(
        name,
        namespace,
        pool,
        gpus={"nodeCount": 2, "gpusPerNode": GPUS},
        placement={"strategy": "greedy", **placement},
    )
    obj["metadata"]["labels"] = dict([NODE_TEST_LABEL.split("=")])
    if source is not None:
        obj["spec"]["load"] = source
    apply(cluster, obj)
    return name


def test_a_slow_prometheus_does_not_hold_a_static_objects_status(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    load: None,
    node_pool: tuple[str, list[str]],
) -> None:
    """Eight objects (the Kubernetes I/O pool's size) wait on a Prometheus slower than the
    10 s query timeout; a static-load object applied beside them gets its placement and its
    Ready status about as fast as one applied alone (with one shared pool it waited for the
    slow queries' threads: ~10 s)."""
    pool, _ = node_pool
    proxy = FaultyPrometheus(cluster.prometheus_url)
    proxy.set("slow")
    try:
        started = time.monotonic()
        wait_condition(cluster, static_object(cluster, namespace, pool), namespace, "Ready")
        alone_s = time.monotonic() - started
        slow = {"prometheus": {"url": proxy.url, "window": "30s", "samples": 3}}
        for _ in range(8):
            static_object(cluster, namespace, pool, source=slow)
        time.sleep(2)  # their first load queries are waiting
        started = time.monotonic()
        wait_condition(cluster, static_object(cluster, namespace, pool), namespace, "Ready")
        beside_s = time.monotonic() - started
    finally:
        proxy.set(None)
        proxy.close()
    print(
        f"\nFAULT prometheus-slow-beside-static apply_to_ready_alone_s={alone_s:.1f} "
        f"beside_8_slow_s={beside_s:.1f}"
    )
    assert beside_s < alone_s + 5.0  # a shared pool adds the 10 s query timeout


@pytest.fixture(scope="module")
def load(cluster: Cluster, namespace: str) -> None:
    put_load(cluster, namespace, routing_csv())


@pytest.mark.parametrize("fault", NODE_FAULTS)
def test_a_group_node_lost_after_rollout_is_replaced_in_its_ranks(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    load: None,
    node_pool: tuple[str, list[str]],
    fault: str,
) -> None:
    pool, nodes = node_pool
    name = static_object(cluster, namespace, pool)
    wait_condition(cluster, name, namespace, "Ready", timeout=90)
    before = placement_cm(cluster, namespace, name)
    assert group_nodes(before) == nodes[:2]
    started = time.monotonic()
    NODE_FAULTS[fault](cluster, nodes[0])

    def replaced() -> dict[str, Any] | None:
        cm = get(cluster, "configmap", f"{name}-placement", namespace)
        return cm if cm and group_nodes(cm) == [nodes[2], nodes[1]] else None

    wait_for(f"{nodes[2]} in the ranks of {nodes[0]}", replaced, timeout=ANCHOR_S, every=0.3)
    converged_s = time.monotonic() - started
    obj = wait_condition(cluster, name, namespace, "Ready", timeout=30)
    after = placement_cm(cluster, namespace, name)
    assert obj["status"]["placement"]["hash"] == after["data"]["hash"]  # status tells the truth
    rollouts = version(after) - version(before)
    print(f"\nFAULT node-{fault} converged_s={converged_s:.1f} rollouts={rollouts}")
    assert rollouts == 1  # one new placement for the new group, no flapping
    time.sleep(6)  # another pass (reconcileIntervalSeconds 5) changes nothing
    assert version(placement_cm(cluster, namespace, name)) == version(after)


@pytest.mark.parametrize("fault", NODE_FAULTS)
def test_a_group_node_lost_mid_solve_drops_the_stale_plan(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    load: None,
    node_pool: tuple[str, list[str]],
    fault: str,
) -> None:
    """The first solve (CP-SAT, time limit 10 s) starts for [-0, -1] (the operator's
    moeplace_solves_in_flight says so); 1 s later -0 leaves: that plan is dropped (counted in
    moeplace_stale_plans_total) and the first placement written is solved for [-1, -2]."""
    pool, nodes = node_pool
    stale_before = sample(operator, "moeplace_stale_plans_total")
    started = time.monotonic()
    name = static_object(cluster, namespace, pool, strategy="cpsat", timeLimitSeconds=10)
    wait_for(
        "the solve to start",
        lambda: sample(operator, "moeplace_solves_in_flight") >= 1,
        timeout=30,
        every=0.1,
    )
    time.sleep(1)  # well inside the solve (its time limit is 10 s)
    NODE_FAULTS[fault](cluster, nodes[0])
    cm = wait_for(
        "the first placement",
        lambda: get(cluster, "configmap", f"{name}-placement", namespace),
        timeout=ANCHOR_S + 30,
        every=0.3,
    )
    converged_s = time.monotonic() - started
    stale = sample(operator, "moeplace_stale_plans_total") - stale_before
    assert stale >= 1, "the node changed outside the solve"
    assert group_nodes(cm) == [nodes[1], nodes[2]]
    obj = wait_condition(cluster, name, namespace, "Ready", timeout=30)
    cm = placement_cm(cluster, namespace, name)
    assert obj["status"]["placement"]["hash"] == cm["data"]["hash"]
    print(f"\nFAULT node-{fault}-mid-solve converged_s={converged_s:.1f} rollouts={version(cm)}")
    assert version(cm) == 1  # the stale plan was never written
