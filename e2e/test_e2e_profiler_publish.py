"""The GPU profiler's node publication against the real API server (kwok GPU nodes).

1. A profile published onto a node is read back as the operator reads it: speed labels
   ``gpu.moeplace.io/speed-<i>`` (stale ones removed) and the curve annotations.
2. The chart's profiler RBAC and ValidatingAdmissionPolicy (``profiler.enabled=true``): with a
   token bound to a pod on node A, the profiler's ServiceAccount may patch node A's
   ``gpu.moeplace.io/`` labels and annotations, and nothing else: not node B, not other labels,
   not deleting nodes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster
from moeplace_operator.nodes import node_gpus
from moeplace_profiler.publish import PublishError, publish

from placement.gpus import ExpertShape, GPUProfile, ProfiledGPU
from placement.model import LatencyCurve
from placement.names import CURVES_ANNOTATION, PROFILED_AT_ANNOTATION

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TOKENS = [1, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]


def profile_for(node: str, speeds: list[float]) -> GPUProfile:
    return GPUProfile(
        taken_at=datetime(2026, 11, 22, 6, 30, tzinfo=UTC),
        expert_shape=ExpertShape(name="deepseek-v2-lite", hidden=2048, intermediate=1408),
        gpus=[
            ProfiledGPU(
                gpu=i,
                node=node,
                speed=s,
                curve=LatencyCurve(tokens=TOKENS, micros=[18.0 + t / (60.0 * s) for t in TOKENS]),
            )
            for i, s in enumerate(speeds)
        ],
    )


def core(client: Any) -> Any:
    from kubernetes import client as k

    return k.CoreV1Api(client)


@pytest.fixture
def nodes(cluster: Cluster) -> Iterator[list[str]]:
    pool = f"prof{uuid.uuid4().hex[:6]}"
    names = cluster.make_nodes(2, 4, pool=pool, prefix=pool)
    yield names
    cluster.delete_nodes(pool=pool)


def test_publish_and_read_back(cluster: Cluster, nodes: list[str]) -> None:
    api = core(cluster.api_client())
    node = nodes[0]
    body = publish(profile_for(node, [1.0213, 0.8]), node=node, api=api)
    got = api.read_node(node)
    labels, ann = got.metadata.labels, got.metadata.annotations
    assert labels["gpu.moeplace.io/speed-0"] == "1.0213"
    assert labels["gpu.moeplace.io/speed-1"] == "0.8000"
    assert "gpu.moeplace.io/speed-2" not in labels  # the node had 4 speed labels: stale ones go
    assert "gpu.moeplace.io/speed-3" not in labels
    assert labels["gpu.moeplace.io/pool"].startswith("prof")  # other labels untouched
    assert ann[PROFILED_AT_ANNOTATION] == "2026-11-22T06:30:00Z"
    assert json.loads(ann[CURVES_ANNOTATION]) == json.loads(
        body["metadata"]["annotations"][CURVES_ANNOTATION]
    )
    seen = node_gpus(node, labels, ann)  # exactly what the operator derives from the node
    assert seen.speeds == {0: 1.0213, 1: 0.8}
    assert seen.curves[1].tokens == TOKENS
    assert seen.curves[1].micros[-1] == pytest.approx(18.0 + 4096 / 48.0, abs=0.01)
    # publishing again (a re-profile) replaces values in place
    publish(profile_for(node, [0.99, 1.01]), node=node, api=api)
    again = api.read_node(node).metadata.labels
    assert (again["gpu.moeplace.io/speed-0"], again["gpu.moeplace.io/speed-1"]) == (
        "0.9900",
        "1.0100",
    )
    with pytest.raises(PublishError, match="no GPU on node"):
        publish(profile_for("elsewhere", [1.0]), node=node, api=api)


def eventually(fn: Callable[[], bool], timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if fn():
            return True
        time.sleep(0.5)
    return False


def test_rbac_and_policy_limit_the_profiler_to_its_own_node(
    cluster: Cluster, nodes: list[str]
) -> None:
    from kubernetes import client as k
    from kubernetes.client.exceptions import ApiException

    ns = f"prof-{uuid.uuid4().hex[:6]}"
    release = "e2eprof"
    sa = f"{release}-moeplace-profiler"
    rendered = cluster.helm(
        "template", release, str(REPO / "helm" / "moeplace"), "--namespace", ns,
        "--kube-version=1.30.0",  # the chart needs >= 1.30; helm template assumes 1.20
        "--set", "profiler.enabled=true",
        "--show-only", "templates/profiler-rbac.yaml",
    ).stdout  # fmt: skip
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl("apply", "-f", "-", input=rendered)
        can = cluster.kubectl
        who = f"--as=system:serviceaccount:{ns}:{sa}"
        assert can("auth", "can-i", "patch", "nodes", who).stdout.strip() == "yes"
        assert can("auth", "can-i", "delete", "nodes", who, check=False).stdout.strip() == "no"
        assert can("auth", "can-i", "get", "secrets", "-A", who, check=False).stdout.strip() == "no"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "profiler", "namespace": ns},
            "spec": {
                "serviceAccountName": sa,
                "nodeName": nodes[0],
                "containers": [{"name": "p", "image": "profiler:test"}],
                "tolerations": [{"operator": "Exists"}],
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        uid = cluster.kubectl("get", "pod", "profiler", "-n", ns, "-o", "jsonpath={.metadata.uid}")
        token = cluster.kubectl(
            "create", "token", sa, "-n", ns, "--bound-object-kind", "Pod",
            "--bound-object-name", "profiler", "--bound-object-uid", uid.stdout.strip(),
        ).stdout.strip()  # fmt: skip
        admin = cluster.api_client().configuration
        conf = k.Configuration()
        conf.host = admin.host
        conf.ssl_ca_cert = admin.ssl_ca_cert
        conf.verify_ssl = admin.verify_ssl
        conf.api_key = {"authorization": f"Bearer {token}"}
        api = k.CoreV1Api(k.ApiClient(conf))

        # own node: allowed (retried while the new policy propagates)
        def own_ok() -> bool:
            try:
                publish(profile_for(nodes[0], [1.05, 0.95]), node=nodes[0], api=api)
                return True
            except PublishError:
                return False

        assert eventually(own_ok), "the profiler could not patch its own node"
        assert api.read_node(nodes[0]).metadata.labels["gpu.moeplace.io/speed-0"] == "1.0500"

        def denied(fn: Callable[[], Any], needle: str) -> bool:
            try:
                fn()
            except (ApiException, PublishError) as err:
                return needle in str(getattr(err, "body", "") or err) or needle in str(err)
            return False

        # own node, but a label outside gpu.moeplace.io/: denied (retried while the policy
        # binding propagates). Each try sets a new value: a try that got through before the
        # policy was in force leaves its label behind, and re-sending that same value would be
        # a no-op update that no validation can refuse.
        tries = iter(range(1_000))

        def foreign_label_denied() -> bool:
            patch = {"metadata": {"labels": {"evil": str(next(tries))}}}
            return denied(lambda: api.patch_node(nodes[0], patch), "gpu.moeplace.io/")

        assert eventually(foreign_label_denied), "a label outside gpu.moeplace.io/ got through"
        # another node: denied by the policy (RBAC alone would allow it); the policy is in
        # force now (the check above waited for it), so the first attempt must already fail
        assert denied(lambda: publish(profile_for(nodes[1], [2.0]), node=nodes[1], api=api), "403")
        assert api.read_node(nodes[1]).metadata.labels.get("gpu.moeplace.io/speed-0") != "2.0000"
        # deleting nodes: RBAC says no
        assert denied(lambda: api.delete_node(nodes[1]), "Forbidden")
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
