"""Scale (issue 13): 1,000 kwok nodes x 8 GPUs, 200 small MoEDeployments whose load comes from
the real Prometheus (fake serving counters, with noise), and one DeepSeek-V3-shaped deployment
(58 MoE layers x 256 experts, top-8) on 64 GPUs with a 60 s time limit, all reconciled by one
operator process. Prints: time to all Ready, steady-state solves, status writes and API
requests per reconcile, operator CPU and RSS, the V3 solve while the others keep reconciling
(their reconcile rate, a small spec change on another object), and deleting everything."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Cluster, wait_for
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families
from test_operator import (  # noqa: F401  (crd: the module's CRD fixture)
    NAMESPACE_PREFIX,
    OperatorProcess,
    condition,
    crd,
    get,
)

pytestmark = [pytest.mark.e2e, pytest.mark.scale]

NODES, GPUS, POOLS = 1000, 8, 8  # the V3 pool's 8 nodes included
SMALL, LAYERS, EXPERTS = 200, 4, 16  # each on 1 node x 8 GPUs of pool s<i % (POOLS - 1)>
MODELS = 20  # small object i serves model i % MODELS: 1,280 series to scrape each second
V3_LAYERS, V3_EXPERTS, V3_NODES, V3_LIMIT_S = 58, 256, 8, 60
INTERVAL_S = 15  # reconcileIntervalSeconds of the small objects
WINDOW_S, SAMPLES = 60, 3  # their Prometheus load: 3 sub-windows of 20 s
STEADY_S = 60  # the steady-state measurement
GROUP, VERSION, PLURAL = "moeplace.io", "v1alpha1", "moedeployments"


class RoutingCounters:
    """moe_expert_tokens_total{model, layer, expert} of every small model on one port, served
    by hand (12,800 series): each scrape adds rate x elapsed x (1 +- 1 %) to each counter,
    so consecutive sub-windows differ a little, as real routing does."""

    def __init__(self, models: list[str], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        shares = rng.pareto(1.2, (len(models), LAYERS, EXPERTS)) + 0.2
        shares /= shares.sum(axis=2, keepdims=True)
        self.rates = (shares * 2_000.0).ravel()  # tokens/s per (model, layer, expert)
        self.values = np.zeros_like(self.rates)
        self.labels = [
            f'moe_expert_tokens_total{{model="{m}",layer="{layer}",expert="{e}"}} '
            for m in models
            for layer in range(LAYERS)
            for e in range(EXPERTS)
        ]
        self.rng, self.last, self.lock = rng, time.monotonic(), threading.Lock()
        counters = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = counters.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def exposition(self) -> str:
        with self.lock:
            now = time.monotonic()
            noise = 1 + self.rng.uniform(-0.01, 0.01, self.rates.shape)
            self.values += self.rates * (now - self.last) * noise
            self.last = now
            values = self.values.tolist()
        lines = [f"{label}{value:.1f}" for label, value in zip(self.labels, values, strict=True)]
        return "# TYPE moe_expert_tokens_total counter\n" + "\n".join(lines) + "\n"

    def close(self) -> None:
        self.server.shutdown()


def small_manifest(index: int, namespace: str, prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": f"m{index:03d}", "namespace": namespace},
        "spec": {
            "model": {
                "name": f"small-{namespace}-{index % MODELS}",
                "moeLayers": LAYERS,
                "expertsPerLayer": EXPERTS,
                "topK": 2,
                "denseLayersBefore": 0,
                "hiddenLayers": LAYERS,
            },
            "gpus": {
                "nodeSelector": {"gpu.moeplace.io/pool": f"{namespace}-s{index % (POOLS - 1)}"},
                "nodeCount": 1,
                "gpusPerNode": GPUS,
            },
            # greedy: all Ready then times the operator, not a queue of 400 CP-SAT solves (1 s
            # each, first and after the rollout) on two shared cores; V3 below solves with cpsat
            "placement": {"strategy": "greedy", "redundantExperts": 8},
            "load": {
                "prometheus": {
                    "url": prometheus_url,
                    "window": f"{WINDOW_S}s",
                    "samples": SAMPLES,
                }
            },
            "rollout": {"minImprovementPercent": 5, "cooldown": "0s"},
            "reconcileIntervalSeconds": INTERVAL_S,
        },
    }


def v3_load_csv(seed: int = 3) -> str:
    """A skewed synthetic routing count for the V3 shape (layers numbered from 3, after the
    three dense layers)."""
    rng = np.random.default_rng(seed)
    counts = np.floor(rng.pareto(1.1, (V3_LAYERS, V3_EXPERTS)) * 400) + 10
    rows = [
        f"{layer + 3},{e},{int(counts[layer, e])}"
        for layer in range(V3_LAYERS)
        for e in range(V3_EXPERTS)
    ]
    return "moe_layer_index,expert_id,count\n" + "\n".join(rows) + "\n"


def v3_manifest(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "v3", "namespace": namespace},
        "spec": {
            "model": {
                "name": "deepseek-v3",
                "moeLayers": V3_LAYERS,
                "expertsPerLayer": V3_EXPERTS,
                "topK": 8,
                "denseLayersBefore": 3,
                "hiddenLayers": V3_LAYERS + 3,
            },
            "gpus": {
                "nodeSelector": {"gpu.moeplace.io/pool": f"{namespace}-v3"},
                "nodeCount": V3_NODES,
                "gpusPerNode": GPUS,
            },
            "placement": {
                "strategy": "cpsat",
                "timeLimitSeconds": V3_LIMIT_S,
                "redundantExperts": 64,  # 5 slots per GPU
            },
            "load": {"static": {"configMapName": "v3-routing"}},
            "rollout": {"minImprovementPercent": 5, "cooldown": "0s"},
            "reconcileIntervalSeconds": 30,
        },
    }


class OperatorFigures:
    """The operator's /metrics and /proc figures, as totals at one moment."""

    def __init__(self, operator: OperatorProcess) -> None:
        assert operator.proc is not None
        families = {f.name: f for f in text_string_to_metric_families(operator.metrics())}

        def total(family: str, sample: str, **labels: str) -> float:
            found = families.get(family)
            return sum(
                s.value
                for s in (found.samples if found else [])
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
            )

        self.at = time.monotonic()
        self.solves = total("moeplace_solves", "moeplace_solves_total")
        self.reconciles = total(
            "moeplace_reconcile_duration_seconds", "moeplace_reconcile_duration_seconds_count"
        )
        self.requests = total("moeplace_kube_requests", "moeplace_kube_requests_total")
        self.status_writes = total(
            "moeplace_kube_requests",
            "moeplace_kube_requests_total",
            verb="patch",
            resource="moedeployments/status",
        )
        stat = Path(f"/proc/{operator.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        self.cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        status = Path(f"/proc/{operator.proc.pid}/status").read_text()
        rss_kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
        self.rss_mb = int(rss_kb) / 1024

    def per_minute(self, since: OperatorFigures, field: str) -> float:
        return (getattr(self, field) - getattr(since, field)) * 60 / (self.at - since.at)


def ready_generations(custom: Any, namespace: str) -> dict[str, int]:
    """Name -> the generation its Ready=True condition was computed for (Ready ones only)."""
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    ready = {}
    for obj in listed["items"]:
        found = condition(obj, "Ready")
        if found.get("status") == "True":
            ready[obj["metadata"]["name"]] = int(found.get("observedGeneration", 0))
    return ready


def wait_all_ready(custom: Any, namespace: str, count: int, timeout: float) -> None:
    """Until ``count`` objects are Ready; the failure names the other objects' reasons."""
    deadline = time.monotonic() + timeout
    while len(ready_generations(custom, namespace)) < count:
        if time.monotonic() > deadline:
            listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            reasons = collections.Counter(
                condition(obj, "Ready").get("reason", "no status yet") for obj in listed["items"]
            )
            raise AssertionError(f"not {count} Ready after {timeout} s: {dict(reasons)}")
        time.sleep(2.0)


def create_all(custom: Any, namespace: str, prometheus_url: str) -> None:
    """The small objects, created by 8 clients at once (kubectl applies a List one by one)."""

    def create(index: int) -> None:
        body = small_manifest(index, namespace, prometheus_url)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(SMALL)))


def delete_all(custom: Any, namespace: str, timeout: float) -> float:
    """One collection DELETE; seconds until every object is gone (the operator, still
    running, releases each finalizer when its daemon has stopped)."""
    started = time.monotonic()
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    wait_for(
        "every MoEDeployment gone",
        lambda: (
            not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        ),
        timeout=timeout,
        every=1.0,
    )
    return time.monotonic() - started


@pytest.fixture
def scale_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace and its 1,000 kwok nodes (pools <namespace>-s0..s6 and <namespace>-v3)."""
    namespace = f"{NAMESPACE_PREFIX}scale-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    per_pool = (NODES - V3_NODES) // (POOLS - 1)
    pools = [(f"{namespace}-s{p}", per_pool) for p in range(POOLS - 1)]
    pools.append((f"{namespace}-v3", NODES - per_pool * (POOLS - 1)))
    started = time.monotonic()
    for pool, count in pools:
        cluster.make_nodes(count, GPUS, speeds="pal", pool=pool, prefix=pool)
    print(f"\n{NODES} kwok nodes x {GPUS} GPUs created in {time.monotonic() - started:.1f} s")
    try:
        yield namespace
    finally:  # the test deletes its objects while the operator runs; leftovers lose the finalizer
        custom = client.CustomObjectsApi(cluster.api_client())
        unfinalized = {"metadata": {"finalizers": None}}
        for obj in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
            name = obj["metadata"]["name"]
            with contextlib.suppress(client.ApiException):
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, unfinalized
                )
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for pool, _ in pools:
            cluster.delete_nodes(pool=pool)


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("crd")
def test_scale_1000_nodes_200_prometheus_objects_and_a_v3_solve(
    cluster: Cluster, scale_namespace: str, tmp_path: Path
) -> None:
    namespace = scale_namespace
    models = [f"small-{namespace}-{i}" for i in range(MODELS)]
    counters = RoutingCounters(models)
    job = f"scale-{namespace}"
    cluster.add_scrape_target(job, f"127.0.0.1:{counters.port}")
    history_from = time.monotonic()
    operator = OperatorProcess(cluster, tmp_path / "operator.log")
    custom = client.CustomObjectsApi(cluster.api_client())
    try:
        cluster.wait_prom(f'count(moe_expert_tokens_total{{model="{models[-1]}"}}) > 0', 60)
        operator.start()
        # ---- 200 Prometheus-backed objects: time to all Ready
        started = time.monotonic()
        create_all(custom, namespace, cluster.prometheus_url)
        wait_all_ready(custom, namespace, SMALL, timeout=300)
        all_ready_s = time.monotonic() - started
        # ---- steady state, once the load window holds only full sub-windows
        # (sub-windows are aligned to multiples of their length: one more may be partial)
        full_from = history_from + WINDOW_S + 2 * WINDOW_S / SAMPLES
        time.sleep(max(0.0, full_from - time.monotonic()))
        time.sleep(INTERVAL_S)  # the passes that saw the last partial window are done
        before = OperatorFigures(operator)
        time.sleep(STEADY_S)
        after = OperatorFigures(operator)
        solves = after.per_minute(before, "solves")
        writes = after.per_minute(before, "status_writes")
        reconciles = after.per_minute(before, "reconciles")
        per_reconcile = (after.requests - before.requests) / max(
            after.reconciles - before.reconciles, 1
        )
        cpu = after.per_minute(before, "cpu_s")
        print(
            f"{SMALL} Prometheus-backed MoEDeployments ({LAYERS}x{EXPERTS}, {GPUS} GPUs each) on "
            f"{NODES} nodes: all Ready in {all_ready_s:.1f} s; steady state over {STEADY_S} s: "
            f"{solves:.1f} solves/min, {writes:.1f} status writes/min, {reconciles:.0f} "
            f"reconciles/min, {per_reconcile:.2f} API requests/reconcile, operator CPU "
            f"{cpu:.1f} s/min, RSS {after.rss_mb:.0f} MB"
        )
        # ---- the V3 solve while the others keep reconciling
        routing = {"metadata": {"name": "v3-routing"}, "data": {"load.csv": v3_load_csv()}}
        client.CoreV1Api(custom.api_client).create_namespaced_config_map(namespace, routing)
        v3_started = time.monotonic()
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, v3_manifest(namespace)
        )
        during_from = OperatorFigures(operator)
        time.sleep(5)  # the V3 solve has started
        change_started = time.monotonic()
        seed = {"spec": {"placement": {"seed": 1}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "m007", seed)
        wait_for(
            "m007 reconciled at generation 2",
            lambda: ready_generations(custom, namespace).get("m007", 0) >= 2,
            timeout=120,
            every=0.5,
        )
        change_s = time.monotonic() - change_started
        obj = wait_for(
            "v3 Ready",
            lambda: (
                (o := get(cluster, "moed", "v3", namespace))
                and condition(o, "Ready").get("status") == "True"
                and o
            ),
            timeout=V3_LIMIT_S * 3,
            every=1.0,
        )
        v3_ready_s = time.monotonic() - v3_started
        # the others' rate over at least one of their intervals: over a shorter window (a
        # solve of a few seconds) it is the phase of their timers, not a stall (seen: 295/min
        # over 7 s in a fresh clone, 800/min steady)
        time.sleep(max(0.0, INTERVAL_S - v3_ready_s))
        during = OperatorFigures(operator)
        during_reconciles = during.per_minute(during_from, "reconciles")
        solved = condition(obj, "PlacementSolved")["message"]
        v3_solve_s = float(solved.split(" in ", 1)[1].split("s,", 1)[0])
        gap = solved.split("gap ", 1)[1].split(",", 1)[0]
        print(
            f"DeepSeek-V3 shape ({V3_LAYERS}x{V3_EXPERTS}, top-8, {V3_NODES * GPUS} GPUs, "
            f"{V3_LIMIT_S} s limit): solved in {v3_solve_s:.1f} s (gap {gap}), Ready "
            f"{v3_ready_s:.1f} s after apply; meanwhile {during_reconciles:.0f} reconciles/min "
            f"of the others, a small spec change on another object reconciled in "
            f"{change_s:.1f} s"
        )
        # ---- delete everything
        delete_s = delete_all(custom, namespace, timeout=300)
        print(f"delete of {SMALL + 1} MoEDeployments: {delete_s:.1f} s")
    finally:
        if custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
            with contextlib.suppress(AssertionError):  # the fixture strips what stays
                delete_all(custom, namespace, timeout=120)
        operator.stop()
        cluster.remove_scrape_target(job)
        counters.close()
        lines = (tmp_path / "operator.log").read_text(errors="replace").splitlines()
        tail = [line for line in lines if "is cancelled" not in line][-30:]
        print("operator log (tail):\n" + "\n".join(tail))
    # bounds with margin over what was measured on the 2-core machine (README, Scale)
    assert all_ready_s < 300
    assert solves <= 2.0, "a steady load must not re-solve"
    assert writes <= 5.0, "a steady state must not rewrite status"
    assert per_reconcile <= 1.5
    assert cpu < 60.0 and after.rss_mb < 1024
    assert v3_solve_s <= V3_LIMIT_S * 1.1
    assert during_reconciles >= 0.5 * reconciles, "the V3 solve must not stall the others"
    assert change_s < 60.0
    assert delete_s < 180
