"""Least privilege, proven with the chart's own ServiceAccount tokens (TokenRequest), never
admin and never ``kubectl auth can-i --as``.

One chart install per mode (the default, cluster-wide, and watchNamespaces with one namespace;
profiler RBAC on). The operator runs as a
real process whose kubeconfig holds the operator ServiceAccount's token and reconciles a
MoEDeployment to its placement ConfigMap, status and target annotation. With the same token,
every write the chart does not mean to allow is refused by the API server (RBAC 403 or a
ValidatingAdmissionPolicy denial), each asserted with its message. The profiler's token (bound
to a pod on a node) may publish speeds on that node but not move it to another pool."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cluster, wait_for
from test_operator import (
    OperatorProcess,
    deployment,
    get,
    manifest,
    needs_data,
    put_load,
    routing_csv,
    wait_condition,
)

pytestmark = [pytest.mark.e2e, pytest.mark.security]

CHART = Path(__file__).resolve().parents[1] / "helm/moeplace"
HASH = "moeplace.io/placement-hash"
OWNER = "moeplace.io/deployment"
KubectlRun = Callable[..., subprocess.CompletedProcess[str]]


def token_kubeconfig(cluster: Cluster, path: Path, sa: str, namespace: str, *bound: str) -> Path:
    """A kubeconfig for ServiceAccount ``sa``: the admin's cluster entry, a TokenRequest
    token as the only credential."""
    token = cluster.kubectl(
        "create", "token", sa, "-n", namespace, "--duration=2h", *bound
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    entry = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [entry],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": entry["name"], "user": sa}}],
        "current-context": sa,
    }
    path.write_text(json.dumps(config))
    return path


def kubectl_as(cluster: Cluster, kubeconfig: Path) -> KubectlRun:
    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [str(cluster.kubectl_bin), f"--kubeconfig={kubeconfig}", *args]
        return subprocess.run(command, input=input, capture_output=True, text=True, timeout=60)

    return run


def refused(result: subprocess.CompletedProcess[str], needle: str) -> bool:
    """Refused by the API server with a 403 (kubectl: "... is forbidden: <why>") whose
    message holds ``needle``."""
    return result.returncode != 0 and " is forbidden: " in result.stderr and needle in result.stderr


def assert_refused(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert refused(result, needle), f"not refused with {needle!r}: {result.stdout}{result.stderr}"


@dataclass
class Setup:
    cluster_wide: bool  # the chart's default: no watchNamespaces
    suffix: str
    release: str  # the chart's namespace
    team: str  # the watched namespace
    operator_sa: str
    profiler_sa: str
    nodes: list[str]
    kubeconfig: Path  # the operator's token
    as_operator: KubectlRun
    operator: OperatorProcess


def fresh(tries: Iterator[int]) -> str:
    """A new value per try: a write that got in before a policy was in force must not make
    the next try a no-op update that no policy refuses."""
    return str(next(tries))


def wait_policies_in_force(as_operator: KubectlRun, team: str, node: str) -> None:
    """The policies (and the MoEDeployment params of two of them) reach the API server's
    admission a few seconds after the install."""
    tries = iter(range(10_000))
    probes = {
        "node": lambda: refused(
            as_operator("label", "node", node, f"probe={fresh(tries)}", "--overwrite"),
            "may not change a node's labels",
        ),
        "workload": lambda: refused(
            as_operator(
                "patch",
                "deployment",
                "bystander",
                "-n",
                team,
                "--type=merge",
                "-p",
                json.dumps(template_annotation("probe.example/try", fresh(tries))),
            ),
            "may only patch a workload labelled",
        ),
        "configmap": lambda: refused(
            as_operator("create", "configmap", f"probe-{fresh(tries)}", "-n", team),
            "may only write ConfigMaps",
        ),
    }
    for what, probe in probes.items():
        wait_for(f"the {what} policy in force", probe, timeout=60, every=0.5)


def template_annotation(key: str, value: str) -> dict[str, Any]:
    return {"spec": {"template": {"metadata": {"annotations": {key: value}}}}}


def labelled(body: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    body["metadata"]["labels"] = labels
    return body


@pytest.fixture(scope="module", params=["watchNamespaces", "cluster-wide"])
def setup(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Setup]:
    """The chart's default (cluster-wide: ClusterRole) and watchNamespaces (a Role in the
    watched namespace): the policies bound the writes the same way in both."""
    cluster_wide = request.param == "cluster-wide"
    suffix = uuid.uuid4().hex[:6]
    release, team, pool = f"sec-{suffix}", f"sec-team-{suffix}", f"sec{suffix}"
    tmp = tmp_path_factory.mktemp("security")
    cluster.kubectl("create", "namespace", team)
    operator_sa = f"{release}-moeplace"
    operator = OperatorProcess(
        cluster,
        tmp / "operator.log",
        env={
            "KUBECONFIG": str(tmp / "operator.kubeconfig"),
            "MOEPLACE_NAMESPACES": "" if cluster_wide else team,
            # the chart's Lease: get/update by name are all the election needs
            "MOEPLACE_LEADER_ELECTION_LEASE": f"{release}/{operator_sa}-leader",
        },
    )
    scope = [] if cluster_wide else ["--set", f"watchNamespaces={{{team}}}"]
    try:
        cluster.helm(
            "install", release, str(CHART), "--namespace", release, "--create-namespace",
            *scope, "--set", "profiler.enabled=true",
        )  # fmt: skip
        nodes = cluster.make_nodes(4, 8, speeds="pal", pool=pool, prefix=pool)
        put_load(cluster, team, routing_csv())
        apply = lambda obj: cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))  # noqa: E731
        apply(labelled(deployment("engine", team), {OWNER: "sec"}))  # the target, opted in
        apply(labelled(deployment("decoy", team), {OWNER: "sec"}))  # labelled, not the target
        apply(deployment("bystander", team))  # unrelated
        apply(deployment(f"victim-{suffix}", "kube-system"))  # unrelated, elsewhere
        target = {"target": {"kind": "Deployment", "name": "engine"}}
        apply(manifest("sec", team, pool, rollout=target))
        kubeconfig = token_kubeconfig(cluster, tmp / "operator.kubeconfig", operator_sa, release)
        as_operator = kubectl_as(cluster, kubeconfig)
        wait_policies_in_force(as_operator, team, nodes[0])
        operator.start()
        yield Setup(
            cluster_wide,
            suffix,
            release,
            team,
            operator_sa,
            f"{operator_sa}-profiler",
            nodes,
            kubeconfig,
            as_operator,
            operator,
        )
    finally:
        # MoEDeployments first, while the operator still runs to release its finalizer
        cluster.kubectl("delete", "moed", "--all", "-n", team, "--timeout=60s", check=False)
        operator.stop()
        if operator.log.exists():
            tail = operator.log.read_text(errors="replace").splitlines()[-30:]
            print("operator log (tail):\n" + "\n".join(tail))
        cluster.helm("uninstall", release, "--namespace", release, check=False)
        cluster.kubectl(
            "delete", "deployment", f"victim-{suffix}", "-n", "kube-system", check=False
        )
        for namespace in (team, release):
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.delete_nodes(pool=pool)


@needs_data
def test_the_operator_reconciles_with_its_own_token(cluster: Cluster, setup: Setup) -> None:
    obj = wait_condition(cluster, "sec", setup.team, "Ready", timeout=120)
    cm = get(cluster, "configmap", "sec-placement", setup.team)
    assert cm is not None
    assert cm["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert cm["metadata"]["labels"][OWNER] == "sec"
    assert obj["status"]["placement"]["hash"] == cm["data"]["hash"]

    def target_hash() -> str | None:
        engine = get(cluster, "deployment", "engine", setup.team) or {}
        annotations = engine["spec"]["template"]["metadata"].get("annotations") or {}
        return annotations.get(HASH)

    assert (
        wait_for("the target's placement annotation", target_hash, timeout=60)
        == (cm["data"]["hash"])
    )
    decoy = get(cluster, "deployment", "decoy", setup.team) or {}
    assert HASH not in (decoy["spec"]["template"]["metadata"].get("annotations") or {})
    lease = get(cluster, "lease", f"{setup.operator_sa}-leader", setup.release) or {}
    assert lease["spec"]["holderIdentity"]  # it reconciled as the elected leader
    log = setup.operator.log.read_text()
    assert "Forbidden" not in log and "403" not in log, log[-3000:]


def test_secrets_are_out_of_reach(setup: Setup) -> None:
    for namespace in (setup.team, setup.release, "kube-system"):
        result = setup.as_operator("get", "secrets", "-n", namespace)
        assert_refused(result, 'cannot list resource "secrets"')
    assert_refused(
        setup.as_operator("get", "secret", "anything", "-n", setup.team),
        'cannot get resource "secrets"',
    )


def test_node_writes_other_than_the_reprofile_annotation_are_refused(setup: Setup) -> None:
    node, other = setup.nodes[1], setup.nodes[2]
    run = setup.as_operator
    assert_refused(
        run("label", "node", node, "gpu.moeplace.io/pool=elsewhere", "--overwrite"),
        "may not change a node's labels",
    )
    assert_refused(
        run("annotate", "node", node, "other.example/x=1"),
        "may only set the gpu.moeplace.io/reprofile-requested-at annotation",
    )
    uid = run("get", "node", other, "-o", "jsonpath={.metadata.uid}").stdout
    owner = {"apiVersion": "v1", "kind": "Node", "name": other, "uid": uid}
    patch = {"metadata": {"ownerReferences": [owner]}}
    assert_refused(
        run("patch", "node", node, "--type=merge", "-p", json.dumps(patch)),
        "may not change a node's ownerReferences",
    )
    patch = {"metadata": {"finalizers": ["example.com/hold"]}}
    assert_refused(
        run("patch", "node", node, "--type=merge", "-p", json.dumps(patch)),
        "may not change a node's finalizers",
    )
    assert_refused(
        run("patch", "node", node, "--type=merge", "-p", '{"spec":{"unschedulable":true}}'),
        "may not change a node's spec",
    )
    assert_refused(run("delete", "node", node), 'cannot delete resource "nodes"')
    stamp = "gpu.moeplace.io/reprofile-requested-at=2026-12-02T16:00:00Z"
    allowed = run("annotate", "node", node, stamp, "--overwrite")
    assert allowed.returncode == 0, allowed.stderr


def test_workloads_other_than_the_target_annotation_are_refused(setup: Setup) -> None:
    run, team = setup.as_operator, setup.team

    def patch(kind: str, name: str, body: dict[str, Any], namespace: str = team) -> Any:
        return run("patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps(body))

    rolled = template_annotation(HASH, "feedfacecafe")
    assert_refused(patch("deployment", "bystander", rolled), "may only patch a workload labelled")
    assert_refused(
        patch("deployment", "decoy", rolled),
        "MoEDeployment sec does not name Deployment/decoy as its rollout target",
    )
    assert_refused(
        patch("deployment", "engine", {"spec": {"replicas": 5}}),
        "may not change a workload's spec other than",
    )
    assert_refused(
        patch("deployment", "engine", template_annotation("other.example/x", "1")),
        "may only set the moeplace.io/placement-hash annotation",
    )
    assert_refused(
        patch("deployment", "engine", {"metadata": {"labels": {OWNER: "sec", "x": "y"}}}),
        "may not change a workload's labels",
    )
    # a workload in kube-system: outside a watched namespace RBAC refuses, cluster-wide the
    # policy does (the client, not kubectl patch: that reads first and would be refused the get)
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(config.new_client_from_config(config_file=str(setup.kubeconfig)))
    with pytest.raises(ApiException) as refusal:
        apps.patch_namespaced_deployment(f"victim-{setup.suffix}", "kube-system", rolled)
    assert refusal.value.status == 403
    needle = (
        "may only patch a workload labelled"
        if setup.cluster_wide
        else 'cannot patch resource "deployments"'
    )
    assert needle in json.loads(refusal.value.body)["message"]


def test_configmaps_it_does_not_own_are_refused(cluster: Cluster, setup: Setup) -> None:
    run, team = setup.as_operator, setup.team
    assert_refused(run("create", "configmap", "stolen", "-n", team), "may only write ConfigMaps")
    # the user's load ConfigMap, relabelled to look like ours: not taken over
    routing = get(cluster, "configmap", "routing", team)
    assert routing is not None
    moed = get(cluster, "moed", "sec", team)
    assert moed is not None
    owner = {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "name": "sec",
        "uid": moed["metadata"]["uid"],
        "controller": True,
    }
    routing["metadata"]["labels"] = {
        "app.kubernetes.io/managed-by": "moeplace",
        OWNER: "sec",
        "moeplace.io/role": "placement",
    }
    routing["metadata"]["ownerReferences"] = [owner]
    assert_refused(
        run("replace", "-f", "-", input=json.dumps(routing)), "may only write ConfigMaps"
    )
    # a ConfigMap of a MoEDeployment's name, never written by the operator: not taken over
    user_made = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "other-placement", "namespace": team},
        "data": {"placement.json": "{}"},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(user_made))
    forged = get(cluster, "configmap", "other-placement", team)
    assert forged is not None
    forged["metadata"]["labels"] = {**routing["metadata"]["labels"], OWNER: "other"}
    forged["metadata"]["ownerReferences"] = [{**owner, "name": "other"}]
    assert_refused(
        run("replace", "-f", "-", input=json.dumps(forged)),
        "may not take over a ConfigMap that it did not write",
    )
    # its own ConfigMap, but pointing at another MoEDeployment's uid
    stolen_uid = {**owner, "uid": str(uuid.uuid4())}
    mine = get(cluster, "configmap", "sec-placement", team)
    assert mine is not None
    mine["metadata"]["ownerReferences"] = [stolen_uid]
    assert_refused(
        run("replace", "-f", "-", input=json.dumps(mine)),
        "controller reference does not point at the MoEDeployment",
    )
    assert_refused(
        run("delete", "configmap", "sec-placement", "-n", team),
        'cannot delete resource "configmaps"',
    )
    assert_refused(
        run("create", "configmap", "x", "-n", "kube-system"),
        "may only write ConfigMaps"
        if setup.cluster_wide
        else 'cannot create resource "configmaps"',
    )


def test_a_target_without_consent_degrades_with_the_reason(cluster: Cluster, setup: Setup) -> None:
    """The operator's write path under the policy: a rollout target its owner did not label
    is reported (Degraded, TargetForbidden), with the label that would allow it."""
    pool = cluster.kubectl(
        "get", "node", setup.nodes[0], "-o", "jsonpath={.metadata.labels.gpu\\.moeplace\\.io/pool}"
    ).stdout
    target = {"target": {"kind": "Deployment", "name": "bystander"}}
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps(manifest("nolabel", setup.team, pool, rollout=target))
    )
    obj = wait_condition(
        cluster, "nolabel", setup.team, "Degraded", reason="TargetForbidden", timeout=120
    )
    message = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")["message"]
    assert "label it moeplace.io/deployment=nolabel" in message
    assert "may only patch a workload labelled" in message
    bystander = get(cluster, "deployment", "bystander", setup.team) or {}
    assert HASH not in (bystander["spec"]["template"]["metadata"].get("annotations") or {})


def test_the_profiler_may_publish_speeds_but_not_move_its_node(
    cluster: Cluster, setup: Setup, tmp_path: Path
) -> None:
    node = setup.nodes[3]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "profiler", "namespace": setup.release},
        "spec": {
            "serviceAccountName": setup.profiler_sa,
            "nodeName": node,
            "containers": [{"name": "p", "image": "profiler:test"}],
            "tolerations": [{"operator": "Exists"}],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    uid = cluster.kubectl(
        "get", "pod", "profiler", "-n", setup.release, "-o", "jsonpath={.metadata.uid}"
    ).stdout.strip()
    bound = ("--bound-object-kind=Pod", "--bound-object-name=profiler", f"--bound-object-uid={uid}")
    kubeconfig = token_kubeconfig(
        cluster, tmp_path / "profiler.kubeconfig", setup.profiler_sa, setup.release, *bound
    )
    run = kubectl_as(cluster, kubeconfig)
    speed = run("label", "node", node, "gpu.moeplace.io/speed-0=0.9500", "--overwrite")
    assert speed.returncode == 0, speed.stderr
    assert_refused(
        run("label", "node", node, "gpu.moeplace.io/pool=other", "--overwrite"),
        "may only change the gpu.moeplace.io/speed-<i> labels",
    )
    assert_refused(
        run("annotate", "node", node, "gpu.moeplace.io/reprofile-requested-at=now", "--overwrite"),
        "may only change the gpu.moeplace.io/latency-curves, profiled-at and expert-shape",
    )
    patch = {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod",
             "name": "profiler", "uid": uid}]}}  # fmt: skip
    assert_refused(
        run("patch", "node", node, "--type=merge", "-p", json.dumps(patch)),
        "may not change a node's ownerReferences",
    )
    assert_refused(
        run("label", "node", setup.nodes[0], "gpu.moeplace.io/speed-0=2.0", "--overwrite"),
        "may only patch the node its own pod runs on",
    )
    labels = json.loads(cluster.kubectl("get", "node", node, "-o", "json").stdout)["metadata"][
        "labels"
    ]
    assert labels["gpu.moeplace.io/speed-0"] == "0.9500"
    assert labels["gpu.moeplace.io/pool"] != "other"


def test_a_configmap_it_did_not_write_degrades_with_the_reason(
    cluster: Cluster, setup: Setup
) -> None:
    """A user's ConfigMap already named <MoEDeployment>-placement is not overwritten: the
    MoEDeployment is Degraded (ConfigMapForbidden) and the user's data stays."""
    user_made = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "taken-placement", "namespace": setup.team},
        "data": {"mine": "keep"},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(user_made))
    pool = cluster.kubectl(
        "get", "node", setup.nodes[0], "-o", "jsonpath={.metadata.labels.gpu\\.moeplace\\.io/pool}"
    ).stdout
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest("taken", setup.team, pool)))
    obj = wait_condition(
        cluster, "taken", setup.team, "Degraded", reason="ConfigMapForbidden", timeout=120
    )
    message = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")["message"]
    assert "ConfigMap taken-placement not written" in message
    assert "may not take over a ConfigMap that it did not write" in message
    kept = get(cluster, "configmap", "taken-placement", setup.team) or {}
    assert kept["data"] == {"mine": "keep"}


def test_a_proposal_is_written_under_the_policies(cluster: Cluster, setup: Setup) -> None:
    """Propose mode writes <name>-proposal: the policies let the operator's other write
    through (no false refusal)."""
    pool = cluster.kubectl(
        "get", "node", setup.nodes[0], "-o", "jsonpath={.metadata.labels.gpu\\.moeplace\\.io/pool}"
    ).stdout
    body = manifest("prop", setup.team, pool, rollout={"mode": "Propose"})
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    obj = wait_condition(
        cluster, "prop", setup.team, "Ready", reason="ProposalPublished", timeout=120
    )
    proposal = get(cluster, "configmap", "prop-proposal", setup.team)
    assert proposal is not None
    assert proposal["metadata"]["labels"]["moeplace.io/role"] == "proposal"
    assert proposal["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    # deleting it: the operator removes its finalizer under the MoEDeployment policy
    cluster.kubectl("delete", "moed", "prop", "-n", setup.team, "--timeout=60s")
    assert get(cluster, "moed", "prop", setup.team) is None


def test_moedeployment_specs_are_refused(setup: Setup) -> None:
    run, team = setup.as_operator, setup.team

    def patch(body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return run("patch", "moed", "sec", "-n", team, "--type=merge", "-p", json.dumps(body))

    assert_refused(
        patch({"spec": {"rollout": {"minImprovementPercent": 0}}}),
        "may not change a MoEDeployment's spec",
    )
    assert_refused(
        patch({"metadata": {"annotations": {"other.example/x": "1"}}}),
        "may only change a MoEDeployment's moeplace.io/ annotations",
    )
    assert_refused(
        patch({"metadata": {"finalizers": ["moeplace.io/finalizer", "example.com/hold"]}}),
        "may only add or remove the moeplace.io/finalizer",
    )
    assert_refused(
        run("delete", "moed", "sec", "-n", team), 'cannot delete resource "moedeployments"'
    )
