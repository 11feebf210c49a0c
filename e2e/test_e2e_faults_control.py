"""Control-plane faults on the real local cluster: kube-apiserver restarted and etcd frozen
during a rollout, the operator SIGKILLed at each step of a rollout (``MOEPLACE_CRASH_AT``,
the code's own injection points, not sleeps) and restarted, and two replicas electing a
leader on a Lease (leader SIGKILLed: the other takes over after the lease; SIGTERM: at once).

After each: exactly one placement ConfigMap, valid (parsed and checked by placement's
validator, its hash its content's), status telling the truth (Ready, observedGeneration, the
ConfigMap's hash and version), the version counter moved by exactly the rollouts the scenario
asked for (no flapping, also in a quiet period after), and the converge time printed
(``FAULT <name> converged_s=... rollouts=...``) and held under CloudNativePG's 60 s.

A small model (8 MoE layers x 32 experts on 2 kwok nodes x 4 GPUs with the PAL speeds) keeps
solves short on a loaded machine; a rollout is triggered by rotating the static load's hot
experts, which makes the placement in service far off the best one."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localcluster as lc
import numpy as np
import pytest
from conftest import Cluster, wait_for
from test_operator import (  # crd: the module fixture that installs the CRD
    OperatorProcess,
    apply,
    condition,
    crd,  # noqa: F401
    fresh_namespace,
    fresh_pool,
    get,
    manifest,
    put_load,
)

from placement.formats import parse_canonical
from placement.names import HASH_KEY, PLACEMENT_KEY, VERSION_KEY
from placement.validate import validate

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.usefixtures("crd")]

NAMESPACE_PREFIX = "faultc-"
LAYERS, EXPERTS, NODES, GPUS = 8, 32, 2, 4
NAME = "small"
CONVERGE_BOUND_S = 60.0  # CloudNativePG: recovery from a degraded state within 60 s
QUIET_S = 11.0  # after converging: no further rollout in two reconcile intervals (5 s)


def small_load(shift: int = 0) -> str:
    """Zipf-like counts per layer; ``shift`` rotates which experts are hot."""
    rng = np.random.default_rng(7)
    lines = ["moe_layer_index,expert_id,count"]
    for layer in range(LAYERS):
        counts = 100_000 / np.arange(1, EXPERTS + 1) ** 0.6 * rng.uniform(0.8, 1.2, EXPERTS)
        hot = np.roll(rng.permutation(EXPERTS), shift)
        lines += [f"{layer},{int(e)},{c:.0f}" for e, c in zip(hot, counts, strict=True)]
    return "\n".join(lines) + "\n"


def small_manifest(namespace: str, pool: str) -> dict[str, Any]:
    return manifest(
        NAME,
        namespace,
        pool,
        model={
            "name": "fault-small",
            "moeLayers": LAYERS,
            "expertsPerLayer": EXPERTS,
            "topK": 4,
            "denseLayersBefore": 0,
            "hiddenLayers": LAYERS,
        },
        gpus={"nodeCount": NODES, "gpusPerNode": GPUS},
        placement={"strategy": "cpsat", "timeLimitSeconds": 1},
        reconcileIntervalSeconds=5,
    )


def operator_env(**extra: str) -> dict[str, str]:
    return {"MOEPLACE_NAMESPACES": f"{NAMESPACE_PREFIX}*", **extra}


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    # the MoEDeployment's finalizer needs an operator: every test leaves one running till here
    yield from fresh_namespace(cluster, NAMESPACE_PREFIX)


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[str]:
    yield from fresh_pool(cluster, NODES, GPUS, "f")


@pytest.fixture
def operators(cluster: Cluster, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """Operators a test starts (appended here); stopped and their log tails printed after."""
    started: list[OperatorProcess] = []
    yield started
    for process in started:
        process.stop()
        tail = process.log.read_text(errors="replace").splitlines()[-25:]
        print(f"--- {process.log.name} (tail):\n" + "\n".join(tail))


def start_operator(
    cluster: Cluster, operators: list[OperatorProcess], tmp_path: Path, **env: str
) -> OperatorProcess:
    process = OperatorProcess(
        cluster, tmp_path / f"operator-{len(operators)}.log", env=operator_env(**env)
    )
    operators.append(process)
    process.start()
    return process


def placement_configmaps(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    found = cluster.kubectl(
        "get", "configmaps", "-n", namespace, "-l", "moeplace.io/role=placement", "-o", "json"
    )
    return list(json.loads(found.stdout)["items"])


def converged(cluster: Cluster, namespace: str, version: int) -> dict[str, Any] | None:
    """The MoEDeployment when it tells the truth about placement ``version``: Ready, its spec
    observed, the one placement ConfigMap at that version, valid, with the hash status shows."""
    obj = get(cluster, "moed", NAME, namespace)
    if obj is None or condition(obj, "Ready").get("status") != "True":
        return None
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    maps = placement_configmaps(cluster, namespace)
    if len(maps) != 1 or int(maps[0]["data"][VERSION_KEY]) != version:
        return None
    return obj if (status.get("placement") or {}).get("hash") == maps[0]["data"][HASH_KEY] else None


def assert_one_valid_placement(cluster: Cluster, namespace: str, version: int) -> None:
    """After converging, and again after a quiet period (no flapping): one ConfigMap, a valid
    placement whose content hash is the one recorded, status agreeing."""
    for wait in (0.0, QUIET_S):
        time.sleep(wait)
        obj = converged(cluster, namespace, version)
        assert obj is not None, (
            f"not converged at v{version}: {get(cluster, 'moed', NAME, namespace)}"
        )
        (cm,) = placement_configmaps(cluster, namespace)
        placement = parse_canonical(cm["data"][PLACEMENT_KEY])
        validate(placement)
        assert placement.content_hash() == cm["data"][HASH_KEY]
        assert placement.num_gpus == NODES * GPUS and placement.model.moe_layers == LAYERS
        assert obj["status"]["placement"]["version"] == version
        assert cm["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]


def wait_converged(cluster: Cluster, namespace: str, version: int, since: float) -> float:
    wait_for(
        f"converged at v{version}",
        lambda: converged(cluster, namespace, version),
        timeout=CONVERGE_BOUND_S + 30,
        every=0.2,
    )
    return time.monotonic() - since


def report(fault: str, converged_s: float, rollouts: int, **more: float) -> None:
    extra = "".join(f" {k}={v:.1f}" for k, v in more.items())  # e.g. how long the fault lasted
    print(f"FAULT {fault} converged_s={converged_s:.1f} rollouts={rollouts}{extra}")


def first_rollout(cluster: Cluster, namespace: str, pool: str) -> None:
    put_load(cluster, namespace, small_load())
    apply(cluster, small_manifest(namespace, pool))
    wait_converged(cluster, namespace, 1, time.monotonic())


# ---- the control plane --------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [1, 2], ids=["single", "two-leader-elected"])
def test_apiserver_restarted_during_a_rollout(
    cluster: Cluster,
    operators: list[OperatorProcess],
    tmp_path: Path,
    namespace: str,
    pool: str,
    replicas: int,
) -> None:
    """With two replicas the Lease cannot be renewed while the API server is away (15-23 s,
    past the 10 s renew deadline): the leader steps down, and once the server answers again
    one of the two leads and rolls v2 out once."""
    env = {"MOEPLACE_LEADER_ELECTION_LEASE": f"{namespace}/leader"} if replicas > 1 else {}
    running = [start_operator(cluster, operators, tmp_path, **env) for _ in range(replicas)]
    first_rollout(cluster, namespace, pool)
    put_load(cluster, namespace, small_load(shift=11))  # the next pass rolls out v2 ...
    started = time.monotonic()
    outage = lc.restart("kube-apiserver", cluster.state, down_s=3.0)  # ... or would
    took = wait_converged(cluster, namespace, 2, started)
    more = {"apiserver_down_s": outage, "after_back_s": took - outage}
    if replicas > 1:
        leaders = [p for p in running if leads(p)]
        assert len(leaders) == 1, f"{len(leaders)} replicas lead"
        assert lease_holder(cluster, namespace) == identity(leaders[0])
        more["stepped_down"] = sum(p.log.read_text().count("stepped down") for p in running)
    report("apiserver-restart" + ("-two-replicas" if replicas > 1 else ""), took, 1, **more)
    assert took < CONVERGE_BOUND_S
    assert_one_valid_placement(cluster, namespace, 2)
    for process in running:  # they rode it out
        assert process.proc is not None and process.proc.poll() is None


@pytest.mark.parametrize("elected", [False, True], ids=["single", "leader-elected"])
def test_etcd_paused_during_a_rollout(
    cluster: Cluster,
    operators: list[OperatorProcess],
    tmp_path: Path,
    namespace: str,
    pool: str,
    elected: bool,
) -> None:
    """Elected, the Lease cannot be renewed either: past its 10 s renew deadline the leader
    steps down (its pass cancelled), and takes its Lease back once etcd answers, no restart."""
    env = {"MOEPLACE_LEADER_ELECTION_LEASE": f"{namespace}/leader"} if elected else {}
    process = start_operator(cluster, operators, tmp_path, **env)
    first_rollout(cluster, namespace, pool)
    put_load(cluster, namespace, small_load(shift=11))
    started = time.monotonic()
    with lc.paused("etcd", cluster.state):
        time.sleep(12.0)
    frozen = time.monotonic() - started
    took = wait_converged(cluster, namespace, 2, started)
    stepped_down = process.log.read_text().count("stepped down")
    report(
        "etcd-paused" + ("-elected" if elected else ""),
        took,
        1,
        etcd_frozen_s=frozen,
        after_back_s=took - frozen,
        stepped_down=stepped_down,
    )
    assert took < CONVERGE_BOUND_S
    assert_one_valid_placement(cluster, namespace, 2)
    assert process.proc is not None and process.proc.poll() is None  # rode it out
    assert leads(process)
    lc.up(cluster.state)  # whatever a frozen etcd made exit, for the tests after


# ---- the operator killed at each step of a rollout ----------------------------------------

# what the crash leaves behind: (a placement ConfigMap written, the status telling of it)
LEFT_BEHIND = {
    "after-solve": False,
    "after-configmap-write": True,
    "before-status": True,
}


@pytest.mark.parametrize("point", list(LEFT_BEHIND))
def test_operator_sigkilled_mid_rollout_then_restarted(
    cluster: Cluster,
    operators: list[OperatorProcess],
    tmp_path: Path,
    namespace: str,
    pool: str,
    point: str,
) -> None:
    crashing = start_operator(cluster, operators, tmp_path, MOEPLACE_CRASH_AT=point)
    put_load(cluster, namespace, small_load())
    apply(cluster, small_manifest(namespace, pool))
    assert crashing.proc is not None
    code = wait_for("the crash", crashing.proc.poll, timeout=60, every=0.1)
    assert code == -signal.SIGKILL
    assert len(placement_configmaps(cluster, namespace)) == int(LEFT_BEHIND[point])
    obj = get(cluster, "moed", NAME, namespace)
    assert not ((obj or {}).get("status") or {}).get("placement", {}).get("hash")  # not told
    started = time.monotonic()
    start_operator(cluster, operators, tmp_path)
    live = time.monotonic() - started  # Python and kopf starting: the machine's share
    took = wait_converged(cluster, namespace, 1, started)
    report(f"sigkill-{point}", took, 1, start_s=live, after_start_s=took - live)
    assert took < CONVERGE_BOUND_S
    assert_one_valid_placement(cluster, namespace, 1)  # the restart re-used, not re-rolled


# ---- two replicas, one leader ---------------------------------------------------------------


def identity(process: OperatorProcess) -> str:
    assert process.proc is not None
    return f"{socket.gethostname()}-{process.proc.pid}"


def lease_holder(cluster: Cluster, namespace: str) -> str:
    lease = get(cluster, "lease", "leader", namespace) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def reconciles(process: OperatorProcess) -> float:
    """Passes this replica ran (its reconcile histogram's count) and whether it leads."""
    for line in process.metrics().splitlines():
        if line.startswith("moeplace_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def leads(process: OperatorProcess) -> bool:
    return "moeplace_leader 1.0" in process.metrics().splitlines()


def bump_generation(cluster: Cluster, namespace: str) -> None:
    """A spec change only the leader can observe (observedGeneration); no new placement."""
    obj = get(cluster, "moed", NAME, namespace)
    assert obj is not None
    interval = int(obj["spec"]["reconcileIntervalSeconds"]) + 1
    patch = json.dumps({"spec": {"reconcileIntervalSeconds": interval}})
    cluster.kubectl("patch", "moed", NAME, "-n", namespace, "--type=merge", "-p", patch)


def take_over(
    cluster: Cluster,
    namespace: str,
    leader: OperatorProcess,
    follower: OperatorProcess,
    sig: signal.Signals,
) -> float:
    """Signal the leader, change the spec at once; the seconds until the follower, holding
    the Lease now, has observed the change."""
    assert leader.proc is not None
    leader.proc.send_signal(sig)
    started = time.monotonic()
    bump_generation(cluster, namespace)
    took = wait_converged(cluster, namespace, 1, started)
    assert lease_holder(cluster, namespace) == identity(follower) and leads(follower)
    return took


def test_two_replicas_one_leader_takes_over(
    cluster: Cluster, operators: list[OperatorProcess], tmp_path: Path, namespace: str, pool: str
) -> None:
    lease = f"{namespace}/leader"
    first = start_operator(cluster, operators, tmp_path, MOEPLACE_LEADER_ELECTION_LEASE=lease)
    wait_for("the first replica leads", lambda: lease_holder(cluster, namespace) == identity(first))
    second = start_operator(cluster, operators, tmp_path, MOEPLACE_LEADER_ELECTION_LEASE=lease)
    first_rollout(cluster, namespace, pool)
    time.sleep(4.0)  # two renewals: the follower stays one
    assert lease_holder(cluster, namespace) == identity(first)
    assert leads(first) and not leads(second)
    assert reconciles(first) >= 1 and reconciles(second) == 0  # only the leader reconciles

    # the leader dies without a word: the follower takes over once the lease (15 s) ran out
    took = take_over(cluster, namespace, first, second, signal.SIGKILL)
    report("leader-sigkill", took, 1)
    assert 10.0 < took < CONVERGE_BOUND_S  # not before the lease could have expired
    assert_one_valid_placement(cluster, namespace, 1)

    # the leader stops (SIGTERM): it releases the Lease, the new follower takes over at once
    third = start_operator(cluster, operators, tmp_path, MOEPLACE_LEADER_ELECTION_LEASE=lease)
    time.sleep(2.0)
    assert not leads(third) and reconciles(third) == 0
    took = take_over(cluster, namespace, second, third, signal.SIGTERM)
    report("leader-sigterm", took, 1)
    assert took < 10.0  # the released Lease, not its 15 s expiry
    assert second.proc is not None and second.proc.wait(timeout=30) == 0  # a clean stop
    assert_one_valid_placement(cluster, namespace, 1)
