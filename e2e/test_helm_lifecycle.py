"""The chart's life on the real cluster with real helm: what it renders (probes, image digest,
the profiler DaemonSet, kubeVersion), a server-side dry run of all of it, and install ->
MoEDeployments -> upgrade to a chart whose CRD adds a field -> uninstall.

Helm never upgrades crds/; the chart ships the CRD in a ConfigMap too and the operator applies
it at start (moeplace_operator/crdupgrade.py). kwok runs no containers, so the operator runs
here as a local process configured exactly like the chart's pod (the Deployment's own env) and
authenticated with the chart's ServiceAccount token (TokenRequest), not admin: what it does is
what the chart's RBAC allows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cluster, wait_for
from moeplace_operator.build import placement_configmap_name
from test_operator import OperatorProcess, get, manifest, placement_of, put_load

pytestmark = [pytest.mark.e2e, pytest.mark.helm]

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm/moeplace"
CRD = "moedeployments.moeplace.io"
MIN_KUBE = "1.30.0"
DIGEST = "sha256:" + "ab" * 32
NEW_FIELD = "upgradeCanary"  # the optional field the v2 chart's CRD adds
# A small model (2 MoE layers x 8 experts) on 2 nodes x 2 GPUs: solved in well under a second.
SMALL = {"name": "small", "moeLayers": 2, "expertsPerLayer": 8, "topK": 2, "denseLayersBefore": 0}


def render(cluster: Cluster, chart: Path, namespace: str, *values: str) -> list[dict[str, Any]]:
    out = cluster.helm(
        "template", "moeplace", str(chart), "--namespace", namespace,
        f"--kube-version={MIN_KUBE}", *[f"--set={v}" for v in values],
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def test_kube_version_below_1_30_is_refused(cluster: Cluster) -> None:
    result = cluster.helm(
        "template", "x", str(CHART), "--kube-version=1.29.9", check=False
    )  # fmt: skip
    assert result.returncode != 0 and ">=1.30.0-0" in result.stderr


def test_operator_probes_digest_and_crd_upgrade_wiring(cluster: Cluster) -> None:
    docs = render(cluster, CHART, "ops", f"image.digest={DIGEST}")
    pod = one(docs, "Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == f"ghcr.io/moeplace/moeplace-operator@{DIGEST}"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOEPLACE_CRD_CONFIGMAP"] == "ops/moeplace-crd"
    configmap = one(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == "moeplace-crd"
    shipped = yaml.safe_load(configmap["data"]["moedeployment.yaml"])
    assert shipped == yaml.safe_load((CHART / "crds/moedeployment.yaml").read_text())
    assert len(pod["metadata"]["annotations"]["checksum/crd"]) == 64
    crd_rules = [
        r
        for d in docs
        if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"].endswith("-crd-upgrade")
        for r in d["rules"]
    ]
    assert {(r["resources"][0], tuple(r["resourceNames"]), *r["verbs"]) for r in crd_rules} == {
        ("customresourcedefinitions", (CRD,), "get", "patch"),
        ("configmaps", ("moeplace-crd",), "get"),
    }
    tagged = one(render(cluster, CHART, "ops", "image.tag=1.2.3"), "Deployment")
    assert tagged["spec"]["template"]["spec"]["containers"][0]["image"].endswith("operator:1.2.3")


def test_bad_digest_and_crd_upgrade_off(cluster: Cluster) -> None:
    bad = cluster.helm("template", "x", str(CHART), f"--kube-version={MIN_KUBE}",
                       "--set=image.digest=latest", check=False)  # fmt: skip
    assert bad.returncode != 0 and "digest" in bad.stderr
    docs = render(cluster, CHART, "ops", "crdUpgrade.enabled=false")
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-crd-upgrade")]
    env = {
        e["name"]: e.get("value")
        for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MOEPLACE_CRD_CONFIGMAP"] == ""


def test_profiler_daemonset_security_resources_probes(cluster: Cluster) -> None:
    docs = render(cluster, CHART, "ops", "profiler.enabled=true", "profiler.intervalSeconds=3600",
                  "profiler.budgetSeconds=120", f"profiler.image.digest={DIGEST}")  # fmt: skip
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == f"ghcr.io/moeplace/moeplace-profiler@{DIGEST}"
    assert container["resources"]["requests"]["memory"] == "2Gi"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "--out=/tmp/gpu-profile.json" in container["args"]
    liveness = container["livenessProbe"]["exec"]["command"]
    assert liveness[-1].endswith("> 4320)")  # interval 3600 + budget 120 + 600 s of slack
    assert container["startupProbe"]["failureThreshold"] * 10 >= 120


def test_profiler_probes_run_against_a_real_profile_file(tmp_path: Path, cluster: Cluster) -> None:
    """The probes' own commands (python -c), run here: fail without a profile, pass with a
    fresh one, liveness fails on a stale one."""
    import sys
    import time

    docs = render(cluster, CHART, "ops", "profiler.enabled=true", "profiler.intervalSeconds=60")
    (container,) = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    out = tmp_path / "gpu-profile.json"

    def passes(probe: str) -> bool:
        command = container[probe]["exec"]["command"]
        code = command[-1].replace("/tmp/gpu-profile.json", str(out))
        return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

    assert not passes("startupProbe")
    out.write_text("{}")
    assert passes("startupProbe") and passes("livenessProbe")
    stale = time.time() - (60 + 60 + 600 + 5)
    os.utime(out, (stale, stale))
    assert not passes("livenessProbe")


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"moed-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_rendered_chart_passes_server_side_dry_run(cluster: Cluster, namespace: str) -> None:
    out = cluster.helm(
        "template", "moeplace", str(CHART), "--namespace", namespace, "--include-crds",
        f"--kube-version={MIN_KUBE}", "--set=profiler.enabled=true", f"--set=image.digest={DIGEST}",
    ).stdout  # fmt: skip
    result = cluster.kubectl(
        "apply", "--dry-run=server", "--server-side", "--force-conflicts", "-f", "-", input=out
    )  # other tests may have replaced the CRD: field ownership is not what this checks
    kinds = {line.split("/")[0] for line in result.stdout.split()}
    assert "deployment.apps" in kinds and "daemonset.apps" in kinds and "configmap" in kinds


# ---- install -> upgrade -> uninstall ---------------------------------------------------------


def v2_chart(tmp_path: Path) -> Path:
    """A copy of the chart whose CRD adds the optional spec.upgradeCanary (integer 1..10)."""
    chart = tmp_path / "moeplace"
    shutil.copytree(CHART, chart)
    crd_file = chart / "crds/moedeployment.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"][NEW_FIELD] = {"type": "integer", "minimum": 1, "maximum": 10}
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = "0.2.0-upgrade-test"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return chart


def token_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (a TokenRequest token)."""
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def chart_pod_env(cluster: Cluster, namespace: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(ServiceAccount, env, pod annotations) of the chart's operator Deployment."""
    (deploy,) = json.loads(
        cluster.kubectl("get", "deployment", "-n", namespace, "-o", "json").stdout
    )["items"]
    pod = deploy["spec"]["template"]
    env = {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}
    return pod["spec"]["serviceAccountName"], env, pod["metadata"]["annotations"]


def reset_crd(cluster: Cluster) -> None:
    """Put the committed CRD back (an earlier run may have left the v2 one)."""
    if cluster.kubectl("get", "crd", CRD, check=False).returncode == 0:
        cluster.kubectl("replace", "-f", str(CHART / "crds/moedeployment.yaml"))


def small_load_csv() -> str:
    rows = [f"{layer},{e},{(e + 1) * (layer + 2) * 100}" for layer in range(2) for e in range(8)]
    return "moe_layer_index,expert_id,count\n" + "\n".join(rows) + "\n"


def canary(name: str, namespace: str, pool: str, value: int) -> str:
    obj = small_moed(name, namespace, pool)
    obj["spec"][NEW_FIELD] = value
    return json.dumps(obj)


def small_moed(name: str, namespace: str, pool: str) -> dict[str, Any]:
    obj = manifest(name, namespace, pool, model=SMALL, gpus={"nodeCount": 2, "gpusPerNode": 2})
    obj["spec"]["placement"] = {"strategy": "greedy"}
    return obj


def dry_run(cluster: Cluster, body: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=body, check=False)


class Lifecycle:
    def __init__(self, cluster: Cluster, ops: str, tmp: Path) -> None:
        self.cluster, self.ops, self.tmp = cluster, ops, tmp
        self.release = f"moeplace-{ops}"
        self.operator: OperatorProcess | None = None
        self.starts = 0

    def helm(self, verb: str, chart: Path) -> None:
        # the chart's default: cluster-wide (with watchNamespaces kopf first retries listing
        # Namespaces, which the chart does not grant, for about a minute)
        self.cluster.helm(verb, self.release, str(chart), "--namespace", self.ops)

    def start_operator(self) -> OperatorProcess:
        """As the chart's pod starts: its env, its ServiceAccount's token."""
        sa, env, _ = chart_pod_env(self.cluster, self.ops)
        self.starts += 1
        kubeconfig = token_kubeconfig(self.cluster, self.ops, sa, self.tmp / f"sa-{self.starts}")
        keep = ("MOEPLACE_NAMESPACES", "MOEPLACE_CRD_CONFIGMAP", "MOEPLACE_SOLVER_WORKERS")
        extra = {k: env[k] for k in keep} | {"KUBECONFIG": str(kubeconfig)}
        self.operator = OperatorProcess(self.cluster, self.tmp / "operator.log", extra)
        self.operator.start()  # returns once /healthz answers: the readiness probe's meaning
        return self.operator

    def stop_operator(self) -> None:
        if self.operator:
            self.operator.stop()
            self.operator = None

    def log(self) -> str:
        return (self.tmp / "operator.log").read_text(errors="replace")


def crd_fields(cluster: Cluster) -> tuple[dict[str, Any], str]:
    crd = json.loads(cluster.kubectl("get", "crd", CRD, "-o", "json").stdout)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"], crd["metadata"]["resourceVersion"]


def identity(obj: dict[str, Any] | None) -> tuple[Any, ...]:
    assert obj is not None
    meta = obj["metadata"]
    return meta["uid"], meta["generation"], json.dumps(obj["spec"], sort_keys=True)


def test_install_upgrade_with_crd_change_uninstall(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    users, ops = namespace, f"ops-{uuid.uuid4().hex[:6]}"
    pool = f"h{uuid.uuid4().hex[:6]}"
    cluster.make_nodes(2, 2, pool=pool, prefix=pool)
    reset_crd(cluster)
    life = Lifecycle(cluster, ops, tmp_path)
    cluster.kubectl("create", "namespace", ops)
    try:
        # v1: install, the operator finds the CRD current and writes nothing
        life.helm("install", CHART)
        _, rv_v1 = crd_fields(cluster)
        life.start_operator()
        assert f"CRD {CRD}: up to date" in life.log()
        put_load(cluster, users, small_load_csv())
        names = ["alpha", "beta"]
        for name in names:
            cluster.kubectl("apply", "-f", "-", input=json.dumps(small_moed(name, users, pool)))
        for name in names:
            wait_for(
                f"placement ConfigMap {name}",
                lambda n=name: placement_of(cluster, users, placement_configmap_name(n)),
            )
        before = {n: identity(get(cluster, "moed", n, users)) for n in names}
        refused = dry_run(cluster, canary("gamma", users, pool, 5))
        assert refused.returncode != 0 and f'unknown field "spec.{NEW_FIELD}"' in refused.stderr
        assert crd_fields(cluster)[1] == rv_v1

        # v2: helm upgrade rolls the operator (checksum/crd); its start applies the new CRD
        _, _, annotations_v1 = chart_pod_env(cluster, ops)
        life.helm("upgrade", v2_chart(tmp_path))
        _, _, annotations_v2 = chart_pod_env(cluster, ops)
        assert annotations_v2["checksum/crd"] != annotations_v1["checksum/crd"]
        life.stop_operator()
        life.start_operator()
        fields, rv_v2 = crd_fields(cluster)
        assert fields[NEW_FIELD] == {"type": "integer", "minimum": 1, "maximum": 10}
        assert f"CRD {CRD}: applied from {ops}/" in life.log()
        after = {n: identity(get(cluster, "moed", n, users)) for n in names}
        assert after == before
        accepted = dry_run(cluster, canary("gamma", users, pool, 5))
        assert accepted.returncode == 0, accepted.stderr
        invalid = dry_run(cluster, canary("gamma", users, pool, 50))
        assert invalid.returncode != 0
        assert (
            f"spec.{NEW_FIELD}" in invalid.stderr and "less than or equal to 10" in invalid.stderr
        )

        # a restart with nothing new writes nothing
        life.stop_operator()
        life.start_operator()
        assert crd_fields(cluster)[1] == rv_v2
        assert life.log().count(f"CRD {CRD}: up to date") == 2
        life.stop_operator()

        # uninstall: the chart's own objects go; the CRD, MoEDeployments, placement maps stay
        cluster.helm("uninstall", life.release, "--namespace", ops)
        assert NEW_FIELD in crd_fields(cluster)[0]
        assert {n: identity(get(cluster, "moed", n, users)) for n in names} == before
        assert all(placement_of(cluster, users, placement_configmap_name(n)) for n in names)
        assert get(cluster, "configmap", f"{life.release}-crd", ops) is None
        assert not json.loads(cluster.kubectl("get", "deployment", "-n", ops, "-o", "json").stdout)[
            "items"
        ]
    finally:
        life.stop_operator()
        print(
            "operator log (tail):\n" + "\n".join(life.log().splitlines()[-30:])
            if (tmp_path / "operator.log").exists()
            else ""
        )
        cluster.helm("uninstall", life.release, "--namespace", ops, check=False)
        for name in ("alpha", "beta"):  # the operator is gone: release its finalizer by hand
            cluster.kubectl("patch", "moed", name, "-n", users, "--type=merge",
                            "-p", '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip
        cluster.kubectl("delete", "namespace", ops, "--wait=false", check=False)
        cluster.delete_nodes(pool=pool)
        reset_crd(cluster)


# ---- examples/ -------------------------------------------------------------------------------


def test_examples_apply_with_kustomize(cluster: Cluster, tmp_path: Path) -> None:
    """`kubectl apply -k` of examples/ for real, through an overlay that only renames the
    namespace (the CRD validates every field; the API server fills the defaults)."""
    reset_crd(cluster)
    namespace = f"moed-ex-{uuid.uuid4().hex[:6]}"
    base = os.path.relpath(ROOT / "examples", tmp_path)
    overlay = {"namespace": namespace, "resources": [base]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    try:
        cluster.kubectl("apply", "-k", str(tmp_path))
        moeds = json.loads(cluster.kubectl("get", "moed", "-n", namespace, "-o", "json").stdout)
        specs = {m["metadata"]["name"]: m["spec"] for m in moeds["items"]}
        assert sorted(specs) == ["deepseek-v2-lite", "mixtral-static"]
        assert specs["mixtral-static"]["load"]["static"]["configMapName"] == "mixtral-load"
        assert specs["deepseek-v2-lite"]["load"]["prometheus"]["layerOffset"] == 1
        assert specs["deepseek-v2-lite"]["rollout"]["target"]["kind"] == "Deployment"
        assert specs["mixtral-static"]["reconcileIntervalSeconds"] > 0  # a CRD default
        load = get(cluster, "configmap", "mixtral-load", namespace)
        assert load is not None
        assert len(load["data"]["load.csv"].splitlines()) == 1 + 32 * 8
    finally:
        cluster.kubectl("delete", "-k", str(tmp_path), "--wait=false", check=False)


def test_a_missing_crd_configmap_stops_the_operator_with_its_name(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Bad input at start: the operator exits naming the ConfigMap, never serves /healthz
    (readiness stays false) and leaves the CRD as it was."""
    reset_crd(cluster)
    _, rv = crd_fields(cluster)
    log = tmp_path / "operator.log"
    operator = OperatorProcess(cluster, log, {"MOEPLACE_CRD_CONFIGMAP": "nowhere/no-such-crd"})
    with pytest.raises(AssertionError, match="operator liveness"):
        operator.start()  # waits 60 s for /healthz
    assert operator.proc is not None
    code = operator.proc.wait(timeout=30)
    operator.proc = None
    assert code != 0
    assert "CRD ConfigMap nowhere/no-such-crd not found" in log.read_text()
    assert crd_fields(cluster)[1] == rv
