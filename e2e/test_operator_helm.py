"""The Helm chart: lint, render, and install against the real API server. The operator pod
does not run (kwok has no container runtime): these tests check the objects and that the
service account's RBAC allows what the operator does, and nothing much more."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cluster, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.helm]

CHART = Path(__file__).resolve().parents[1] / "helm/moeplace"


def render(cluster: Cluster, *values: str) -> list[dict[str, Any]]:
    args = [f"--set={v}" for v in values]
    out = cluster.helm(
        "template", "moeplace", str(CHART), "--namespace", "ops", "--kube-version=1.30.0", *args
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def reconciling(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The RBAC objects of that kind for reconciling (not the CRD upgrade's or the leader
    election's)."""
    own = ("-crd-upgrade", "-leader-election")
    return [d for d in docs if d["kind"] == kind and not d["metadata"]["name"].endswith(own)]


def test_lint(cluster: Cluster) -> None:
    result = cluster.helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in result.stdout


def test_values_schema_rejects_typos(cluster: Cluster) -> None:
    result = cluster.helm(
        "template",
        "x",
        str(CHART),
        "--kube-version=1.30.0",
        "--set",
        "solver.wrokers=3",
        check=False,
    )
    assert result.returncode != 0 and "wrokers" in result.stderr


def test_template_cluster_wide(cluster: Cluster) -> None:
    docs = render(cluster)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",  # the CRD upgrade's (templates/crd-upgrade-rbac.yaml)
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "ConfigMap",  # the CRD, for the upgrade
        "Deployment",
        "Lease",  # the leader election's
        "Role",
        "Role",  # get/update on that Lease
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        *["ValidatingAdmissionPolicy"] * 6,
        *["ValidatingAdmissionPolicyBinding"] * 6,
    ]
    # the tight default: every write the RBAC grants is bounded by a policy
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    assert policies == {
        f"moeplace-{p}"
        for p in (
            "node-annotation",
            "moedeployments",
            "rollout-target",
            "rollout-target-named",
            "owned-configmaps",
            "owned-configmaps-uid",
        )
    }
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    # leader election on: the new pod follows until the old one releases the Lease
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    (role,) = reconciling(docs, "ClusterRole")
    verbs = {
        (r["apiGroups"][0], res): set(r["verbs"]) for r in role["rules"] for res in r["resources"]
    }
    assert verbs[("", "nodes")] == {"get", "list", "watch", "patch"}  # re-profile requests
    assert "delete" not in verbs[("", "configmaps")]


def container_env(deploy: dict[str, Any]) -> dict[str, str]:
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


def test_template_leader_election(cluster: Cluster) -> None:
    docs = render(cluster, "replicas=2")
    (lease,) = [d for d in docs if d["kind"] == "Lease"]
    assert (lease["metadata"]["name"], lease["metadata"]["namespace"]) == ("moeplace-leader", "ops")
    assert "spec" not in lease  # the holder fields are the operator's
    election = [d for d in docs if d["metadata"]["name"] == "moeplace-leader-election"]
    role, binding = sorted(election, key=lambda d: str(d["kind"]))
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == "moeplace"  # the operator's ServiceAccount
    assert role["kind"] == "Role" and role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["moeplace-leader"],
            "verbs": ["get", "update"],
        }
    ]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] == 2
    env = container_env(deploy)
    assert env["MOEPLACE_LEADER_ELECTION_LEASE"] == "ops/moeplace-leader"
    single = render(cluster, "leaderElection.enabled=false")
    assert not [d for d in single if d["kind"] == "Lease" or "leader" in d["metadata"]["name"]]
    deploy = next(d for d in single if d["kind"] == "Deployment")
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    env = container_env(deploy)
    assert env["MOEPLACE_LEADER_ELECTION_LEASE"] == ""
    bad = ["--set", "replicas=2", "--set", "leaderElection.enabled=false"]
    result = cluster.helm("template", "x", str(CHART), "--kube-version=1.30.0", *bad, check=False)
    assert result.returncode != 0 and "needs leaderElection.enabled=true" in result.stderr


def test_template_namespaced_and_service_monitor(cluster: Cluster) -> None:
    docs = render(cluster, "watchNamespaces={a,b}", "metrics.serviceMonitor.enabled=true")
    roles = reconciling(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    (cluster_role,) = reconciling(docs, "ClusterRole")
    assert {res for r in cluster_role["rules"] for res in r["resources"]} == {
        "nodes",
        "customresourcedefinitions",
        "namespaces",  # read only: kopf matches watchNamespaces against it
    }
    assert any(d["kind"] == "ServiceMonitor" for d in docs)


def test_template_secret_reads_are_get_by_name_only(cluster: Cluster) -> None:
    docs = render(
        cluster,
        "rbac.secretReads[0].namespace=team-a",
        "rbac.secretReads[0].names={prom-creds,prom-ca}",
    )
    (role,) = [
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-secrets")
    ]
    assert role["metadata"]["namespace"] == "team-a"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["prom-creds", "prom-ca"],
            "verbs": ["get"],
        }
    ]
    cluster_wide = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    assert "secrets" not in {res for r in cluster_wide for res in r["resources"]}
    namespaced = [r for d in docs if d["kind"] == "Role" for r in d["rules"]]
    assert [r for r in namespaced if "secrets" in r["resources"]] == role["rules"]
    bad = ["--set", "rbac.secretReads[0].namespace=team-a"]
    result = cluster.helm("template", "x", str(CHART), "--kube-version=1.30.0", *bad, check=False)
    assert result.returncode != 0 and "names" in result.stderr


@pytest.fixture
def release(cluster: Cluster) -> Iterator[str]:
    namespace = f"ops-{uuid.uuid4().hex[:6]}"
    name = f"moeplace-{namespace}"
    cluster.helm("install", name, str(CHART), "--namespace", namespace, "--create-namespace")
    yield namespace
    cluster.helm("uninstall", name, "--namespace", namespace, check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def can(
    cluster: Cluster, user: str, verb: str, resource: str, namespace: str | None = None
) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    args += ["-n", namespace] if namespace else []
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def test_install_creates_objects_with_working_rbac(cluster: Cluster, release: str) -> None:
    namespace = release
    crd = json.loads(
        cluster.kubectl("get", "crd", "moedeployments.moeplace.io", "-o", "json").stdout
    )
    assert crd["spec"]["names"]["shortNames"] == ["moed"]
    deploy = json.loads(cluster.kubectl("get", "deployment", "-n", namespace, "-o", "json").stdout)[
        "items"
    ]
    assert len(deploy) == 1 and deploy[0]["spec"]["strategy"]["type"] == "RollingUpdate"
    sa = deploy[0]["spec"]["template"]["spec"]["serviceAccountName"]
    user = f"system:serviceaccount:{namespace}:{sa}"
    allowed = [
        ("list", "nodes", None),
        ("watch", "nodes", None),
        ("patch", "nodes", None),  # gpu.moeplace.io/reprofile-requested-at on speed drift
        ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("watch", "moedeployments.moeplace.io", "team-a"),
        ("patch", "moedeployments.moeplace.io/status", "team-a"),
        ("create", "configmaps", "team-a"),
        ("update", "configmaps", "team-a"),
        ("create", "events", "team-a"),
        ("patch", "deployments.apps", "team-a"),
        ("get", f"leases.coordination.k8s.io/moeplace-{namespace}-leader", namespace),
        ("update", f"leases.coordination.k8s.io/moeplace-{namespace}-leader", namespace),
    ]
    for verb, resource, ns in allowed:
        assert can(cluster, user, verb, resource, ns), f"cannot {verb} {resource}"
    denied = [
        ("delete", "configmaps", "team-a"),
        ("get", "secrets", "team-a"),
        ("delete", "nodes", None),
        ("update", "nodes", None),
        ("delete", "moedeployments.moeplace.io", "team-a"),
        ("update", "leases.coordination.k8s.io/someone-elses", namespace),
        ("create", "leases.coordination.k8s.io", namespace),
    ]
    for verb, resource, ns in denied:
        assert not can(cluster, user, verb, resource, ns), f"may {verb} {resource}"


def test_the_operator_may_only_set_its_reprofile_annotation_on_nodes(
    cluster: Cluster, release: str
) -> None:
    """RBAC grants the operator ``patch`` on nodes; the chart's ValidatingAdmissionPolicy
    narrows it to gpu.moeplace.io/reprofile-requested-at (checked by impersonating the
    operator's ServiceAccount against the real API server)."""
    namespace = release
    deploy = json.loads(cluster.kubectl("get", "deployment", "-n", namespace, "-o", "json").stdout)
    sa = deploy["items"][0]["spec"]["template"]["spec"]["serviceAccountName"]
    pool = f"pol{uuid.uuid4().hex[:6]}"
    (node,) = cluster.make_nodes(1, 1, pool=pool, prefix=pool)
    tries = iter(range(1_000))

    def as_operator(*args: str) -> Any:
        who = f"--as=system:serviceaccount:{namespace}:{sa}"
        return cluster.kubectl(*args, "--overwrite", who, check=False)

    def refused(kind: str, key: str, needle: str) -> bool:
        # a new value each try: a try that got in before the policy was in force leaves its
        # value, and sending that same value again would be a no-op no policy refuses
        result = as_operator(kind, "node", node, f"{key}={next(tries)}")
        return result.returncode != 0 and needle in result.stderr

    try:
        assert wait_for(
            "the policy to refuse a label",
            lambda: refused("label", "team", "may not change a node's labels"),
            timeout=30,
        )
        assert refused("annotate", "other.example/x", "may only set the gpu.moeplace.io/")
        stamp, key = "2026-12-01T08:00:00Z", "gpu.moeplace.io/reprofile-requested-at"
        ok = as_operator("annotate", "node", node, f"{key}={stamp}")
        assert ok.returncode == 0, ok.stderr
        annotations = json.loads(cluster.kubectl("get", "node", node, "-o", "json").stdout)[
            "metadata"
        ]["annotations"]
        assert annotations[key] == stamp
        assert "other.example/x" not in annotations
    finally:
        cluster.delete_nodes(pool=pool)
