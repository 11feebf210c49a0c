"""Smoke tests of the real local cluster: API, CRD + CEL, garbage collection, RBAC, kwok GPU
nodes, scheduling and Prometheus. No mocks: everything talks to the processes e2e/cluster runs.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Cluster
from prometheus_client import CollectorRegistry, Gauge, start_http_server

pytestmark = pytest.mark.e2e

GROUP = "smoke.moeplace.io"
CEL_MESSAGE = "replicas must not exceed maxReplicas"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["replicas", "maxReplicas"],
                                "properties": {
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.replicas <= self.maxReplicas",
                                        "message": CEL_MESSAGE,
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, replicas: int, max_replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicas": replicas, "maxReplicas": max_replicas},
        }
    )


@pytest.fixture(scope="module")
def widget_crd(cluster: Cluster) -> Iterator[str]:
    """The Widget CRD, created once (early, so the garbage collector discovers it in time)."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/widgets.{GROUP}")
    yield f"widgets.{GROUP}"
    cluster.kubectl("delete", "crd", f"widgets.{GROUP}", "--wait=false", check=False)


def test_readyz(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "--raw", "/readyz").stdout
    assert out.strip() == "ok"
    from kubernetes import client

    version = client.VersionApi(cluster.api_client()).get_code()
    assert str(version.git_version).startswith("v1.36.")


def test_rbac_is_enforced(cluster: Cluster) -> None:
    sa = "system:serviceaccount:default:nobody"
    denied = cluster.kubectl("auth", "can-i", "list", "nodes", f"--as={sa}", check=False)
    assert denied.stdout.strip() == "no"
    assert cluster.kubectl("auth", "can-i", "list", "nodes").stdout.strip() == "yes"


def test_crd_with_cel_rule(cluster: Cluster, widget_crd: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=widget("good", 2, 3))
    bad = cluster.kubectl("apply", "-f", "-", input=widget("bad", 5, 3), check=False)
    assert bad.returncode != 0
    assert CEL_MESSAGE in bad.stderr, bad.stderr
    # The structural schema is enforced too: a string where an integer belongs is refused.
    typed = widget("typed", 1, 3).replace('"replicas": 1', '"replicas": "one"')
    wrong = cluster.kubectl("apply", "-f", "-", input=typed, check=False)
    assert wrong.returncode != 0
    cluster.kubectl("delete", "widget", "good", "-n", "default")


def test_owned_configmap_is_garbage_collected(cluster: Cluster, widget_crd: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=widget("owner", 1, 1))
    uid = cluster.kubectl("get", "widget", "owner", "-n", "default", "-o=jsonpath={.metadata.uid}")
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned-by-widget",
            "namespace": "default",
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/v1",
                    "kind": "Widget",
                    "name": "owner",
                    "uid": uid.stdout.strip(),
                }
            ],
        },
        "data": {"k": "v"},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(cm))
    cluster.kubectl("delete", "widget", "owner", "-n", "default")
    # GC learns new resource types at its discovery resync (~30 s).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        got = cluster.kubectl("get", "configmap", "owned-by-widget", "-n", "default", check=False)
        if got.returncode != 0 and "NotFound" in got.stderr:
            return
        time.sleep(1)
    pytest.fail("ConfigMap owned by a deleted Widget was not garbage-collected within 90 s")


def _nodes(cluster: Cluster, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "nodes", "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _ready(node: dict[str, Any]) -> bool:
    conds = node["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def test_thousand_gpu_nodes(cluster: Cluster) -> None:
    pool = "smoke-thousand"
    selector = f"gpu.moeplace.io/pool={pool}"
    t0 = time.monotonic()
    names = cluster.make_nodes(1000, 8, speeds="pal", pool=pool, prefix="smoke")
    print(f"created 1000 kwok nodes in {time.monotonic() - t0:.1f} s")
    try:
        nodes = _nodes(cluster, selector)
        assert len(nodes) == 1000
        assert {n["metadata"]["name"] for n in nodes} == set(names)
        for n in nodes:
            assert n["status"]["capacity"]["nvidia.com/gpu"] == "8"
            assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
            labels = n["metadata"]["labels"]
            speeds = [float(labels[f"gpu.moeplace.io/speed-{i}"]) for i in range(8)]
            assert all(0.5 < s < 1.5 for s in speeds)
            assert n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        # PAL's GPU 0 (class A): PerfVar 1.0145 -> speed 0.9857.
        first = next(n for n in nodes if n["metadata"]["name"] == "smoke-0")
        assert first["metadata"]["labels"]["gpu.moeplace.io/speed-0"] == "0.9857"
        # kwok takes the nodes over: they turn Ready.
        deadline = time.monotonic() + 120
        ready = 0
        while time.monotonic() < deadline:
            ready = sum(_ready(n) for n in _nodes(cluster, selector))
            if ready == 1000:
                break
            time.sleep(2)
        print(f"1000 nodes Ready {time.monotonic() - t0:.1f} s after the first create")
        assert ready == 1000, f"only {ready} of 1000 kwok nodes Ready"
    finally:
        cluster.delete_nodes(pool=pool)
    assert cluster.kubectl("get", "nodes", "-l", selector, "-o=name").stdout == ""


def test_gpu_pod_is_scheduled_and_runs(cluster: Cluster) -> None:
    pool = "smoke-sched"
    cluster.make_nodes(2, 4, speeds=[[1.0, 1.0, 0.9, 1.1], [1.0] * 4], pool=pool, prefix="sched")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gpu-pod", "namespace": "default"},
        "spec": {
            "nodeSelector": {"gpu.moeplace.io/pool": pool},
            "containers": [
                {
                    "name": "c",
                    "image": "example.invalid/none:0",
                    "resources": {"limits": {"nvidia.com/gpu": "3"}},
                }
            ],
        },
    }
    try:
        # The ServiceAccount admission plugin needs `default/default`, made by the controller.
        deadline = time.monotonic() + 30
        while cluster.kubectl("get", "sa", "default", "-n", "default", check=False).returncode:
            assert time.monotonic() < deadline, "no default ServiceAccount after 30 s"
            time.sleep(0.5)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        cluster.kubectl(
            "wait", "--for=jsonpath={.status.phase}=Running", "--timeout=60s", "pod/gpu-pod"
        )
        node = cluster.kubectl("get", "pod", "gpu-pod", "-o=jsonpath={.spec.nodeName}").stdout
        assert node in ("sched-0", "sched-1")
    finally:
        cluster.kubectl("delete", "pod", "gpu-pod", "--wait=false", check=False)
        cluster.delete_nodes(pool=pool)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_scrapes_a_registered_target(cluster: Cluster) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("moeplace_smoke_value", "smoke-test gauge", registry=registry)
    gauge.set(42)
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        cluster.add_scrape_target("smoke", f"127.0.0.1:{port}", {"smoke": "yes"})
        result = cluster.wait_prom('moeplace_smoke_value{job="smoke",smoke="yes"}', timeout=60)
        assert float(result[0]["value"][1]) == 42.0
        assert cluster.prom_query('up{job="smoke"}')[0]["value"][1] == "1"
    finally:
        cluster.remove_scrape_target("smoke")
        server.shutdown()
        thread.join(timeout=5)
