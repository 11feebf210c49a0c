"""End to end: the operator (a real `python -m moeplace_operator` process) against the real
local cluster and a real Prometheus fed by a small exporter of the DeepSeek-V2-Lite routing
counts. Each test uses its own namespace and node pool."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Cluster, wait_for
from prometheus_client import CollectorRegistry, Counter, start_http_server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ROUTING_CSV = ROOT.parent / "shared/data/routing/deepseek-v2-lite-chat/expert_counts.csv"
needs_data = pytest.mark.skipif(not ROUTING_CSV.exists(), reason="../shared/data is absent")

# DeepSeek-V2-Lite: 26 MoE layers x 64 experts (top-6), one dense layer first; 4 nodes x 8 GPUs.
LAYERS, EXPERTS, NODES, GPUS = 26, 64, 4, 8
NAMESPACE_PREFIX = "moed-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dying_with_this_process(command: list[str]) -> list[str]:
    """``command`` under util-linux's ``setpriv --pdeathsig TERM`` where it is installed: a
    killed pytest then leaves no operator running that would reconcile the next run's
    objects."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


class OperatorProcess:
    """The operator as users run it, in a subprocess, with free ports for /metrics and
    liveness. Logs go to a file shown when a test fails."""

    def __init__(self, cluster: Cluster, log: Path, env: dict[str, str] | None = None) -> None:
        self.cluster, self.log = cluster, log
        self.extra_env = env or {}  # e.g. another KUBECONFIG and MOEPLACE_NAMESPACES
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.liveness_port = free_port()

    def start(self) -> None:
        env = {
            **self.cluster.env,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
            "MOEPLACE_METRICS_PORT": str(self.metrics_port),
            "MOEPLACE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.liveness_port}/healthz",
            "MOEPLACE_SOLVER_WORKERS": "2",
            # only this module's namespaces: other suites may run their own operator
            "MOEPLACE_NAMESPACES": f"{NAMESPACE_PREFIX}*",
            **self.extra_env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                dying_with_this_process([sys.executable, "-m", "moeplace_operator"]),
                env=env,
                stdout=out,
                stderr=out,
            )
        wait_for("operator liveness", self.alive, timeout=60, every=0.5)

    def alive(self) -> bool:
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return str(r.read().decode())


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds/moedeployment.yaml"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/moedeployments.moeplace.io", "--timeout=60s"
    )


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(cluster, log)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print("operator log (tail):\n" + "\n".join(tail))


def fresh_namespace(
    cluster: Cluster, prefix: str = NAMESPACE_PREFIX, delete_timeout_s: int = 60
) -> Iterator[str]:
    """A new namespace named ``<prefix><random>``, for a fixture to ``yield from``."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    # MoEDeployments first, while the operator still runs to release its finalizer
    cluster.kubectl(
        "delete", "moed", "--all", "-n", name, f"--timeout={delete_timeout_s}s", check=False
    )
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def fresh_pool(
    cluster: Cluster, nodes: int = NODES, gpus: int = GPUS, prefix: str = "p"
) -> Iterator[str]:
    """A new pool of kwok nodes with the PAL-measured speeds, for a fixture to ``yield from``."""
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    cluster.make_nodes(nodes, gpus, speeds="pal", pool=name, prefix=name)
    yield name
    cluster.delete_nodes(pool=name)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    yield from fresh_namespace(cluster)


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[str]:
    """4 kwok nodes x 8 GPUs."""
    yield from fresh_pool(cluster)


def routing_csv(scale: float = 1.0, noise: float = 0.0, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    out = io.StringIO()
    out.write("moe_layer_index,expert_id,count\n")
    for row in csv.DictReader(ROUTING_CSV.read_text().splitlines()):
        count = float(row["count"]) * scale * (1 + noise * rng.uniform(-1, 1))
        out.write(f"{row['moe_layer_index']},{row['expert_id']},{count:.0f}\n")
    return out.getvalue()


def manifest(name: str, namespace: str, pool: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {
            "name": "deepseek-v2-lite",
            "moeLayers": LAYERS,
            "expertsPerLayer": EXPERTS,
            "topK": 6,
            "denseLayersBefore": 1,
            "hiddenLayers": LAYERS + 1,
        },
        "gpus": {
            "nodeSelector": {"gpu.moeplace.io/pool": pool},
            "nodeCount": NODES,
            "gpusPerNode": GPUS,
        },
        "placement": {"strategy": "cpsat", "timeLimitSeconds": 2},
        "load": {"static": {"configMapName": "routing"}},
        "rollout": {"minImprovementPercent": 5, "cooldown": "0s"},
        "reconcileIntervalSeconds": 5,
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply(
    cluster: Cluster, obj: dict[str, Any], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        "-",
        input=json.dumps(obj),
        check=check,
    )


def put_load(cluster: Cluster, namespace: str, text: str) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "routing", "namespace": namespace},
        "data": {"load.csv": text},
    }
    apply(cluster, cm)


def get(cluster: Cluster, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    found = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c["type"] == kind:
            return dict(c)
    return {}


def wait_condition(
    cluster: Cluster,
    name: str,
    namespace: str,
    kind: str,
    status: str = "True",
    timeout: float = 90,
    reason: str | None = None,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get(cluster, "moed", name, namespace)
        c = condition(obj, kind)
        ok = c.get("status") == status and (reason is None or c.get("reason") == reason)
        return obj if ok else None

    return wait_for(f"{name} {kind}={status} {reason or ''}", check, timeout=timeout, every=0.5)


def placement_of(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    return get(cluster, "configmap", name, namespace)


def evaluate_against_eplb(cluster: Cluster, pool: str, cm: dict[str, Any]) -> tuple[float, float]:
    """(ratio of the ConfigMap's placement, ratio of EPLB) on the real routing counts and the
    speeds read back from the nodes: the independent check of what the operator wrote."""
    from moeplace_operator.loadsource import parse_load_csv
    from moeplace_operator.nodes import build_gpu_group, node_gpus
    from moeplace_operator.spec import GPUSpec, ModelSpec

    import placement.solvers  # noqa: F401
    from placement.evaluate import evaluate
    from placement.formats import parse_canonical
    from placement.problem import Problem
    from placement.solvers.base import solve
    from placement.validate import validate

    nodes = json.loads(
        cluster.kubectl("get", "nodes", "-l", f"gpu.moeplace.io/pool={pool}", "-o", "json").stdout
    )
    infos = [
        node_gpus(
            n["metadata"]["name"], n["metadata"]["labels"], n["metadata"].get("annotations") or {}
        )
        for n in nodes["items"]
    ]
    group = build_gpu_group(
        infos,
        GPUSpec(node_selector={"gpu.moeplace.io/pool": pool}, node_count=NODES, gpus_per_node=GPUS),
    )
    plan = parse_canonical(cm["data"]["placement.json"])
    validate(plan)
    load = parse_load_csv(
        ROUTING_CSV.read_text(),
        ModelSpec(
            name="x", preset="deepseek-v2-lite", moe_layers=LAYERS, experts_per_layer=EXPERTS
        ),
    )
    sglang = json.loads(cm["data"]["sglang.json"])["physical_to_logical_map"]
    assert len(sglang) == LAYERS + 1 and sglang[1:] == plan.phy2log
    flags = json.loads(cm["data"]["engine-flags.json"])
    assert flags["hiddenLayers"] == len(sglang) and flags["physicalSlots"] == len(sglang[0])
    assert flags["epSize"] == NODES * GPUS == plan.num_gpus
    eplb = solve(Problem.build(plan.model, group.cluster, load), "eplb").placement
    return evaluate(plan, group.cluster, load).ratio, evaluate(eplb, group.cluster, load).ratio


@needs_data
def test_apply_ready_valid_and_better_than_eplb(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, routing_csv())
    started = time.monotonic()
    apply(cluster, manifest("lite", namespace, pool))
    cm = wait_for(
        "placement ConfigMap",
        lambda: placement_of(cluster, namespace, "lite-placement"),
        timeout=60,
        every=0.1,
    )
    latency = time.monotonic() - started
    obj = wait_condition(cluster, "lite", namespace, "Ready")
    print(
        f"reconcile latency apply -> ConfigMap at {LAYERS}x{EXPERTS}, {NODES * GPUS} GPUs: "
        f"{latency:.2f} s"
    )
    assert latency < 30
    assert cm["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert (
        cm["data"]["hash"]
        == obj["status"]["placement"]["hash"]
        == cm["metadata"]["annotations"]["moeplace.io/placement-hash"]
    )
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    ours, eplb = evaluate_against_eplb(cluster, pool, cm)
    print(f"straggler/fluid bound: moeplace {ours:.3f}, EPLB {eplb:.3f}")
    assert ours < eplb
    table = cluster.kubectl("get", "moed", "lite", "-n", namespace).stdout
    assert "STRAGGLER/BOUND" in table and "True" in table and "Auto" in table
    assert "moeplace_solves_total" in operator.metrics()


@needs_data
def test_gitops_reapply_is_a_no_op_and_diff_is_empty(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, routing_csv())
    obj = manifest("gitops", namespace, pool)
    apply(cluster, obj)
    ready = wait_condition(cluster, "gitops", namespace, "Ready")
    assert "kopf.zalando.org" not in json.dumps(ready["metadata"])  # our own prefix only
    before = ready["metadata"]["resourceVersion"]
    generation = ready["metadata"]["generation"]
    apply(cluster, obj)
    after = get(cluster, "moed", "gitops", namespace)
    assert after is not None and after["metadata"]["generation"] == generation
    # a status write may land in between; the spec and its generation must not move
    assert after["spec"] == ready["spec"] or after["metadata"]["resourceVersion"] == before
    diff = cluster.kubectl(
        "diff",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        "-",
        input=json.dumps(obj),
        check=False,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr


@needs_data
def reconcile_passes(operator: OperatorProcess) -> float:
    """Reconciles the operator has finished (all objects: the module's objects are few)."""
    for line in operator.metrics().splitlines():
        if line.startswith("moeplace_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_speed_change_rolls_out_and_small_load_change_does_not(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, routing_csv())
    apply(cluster, manifest("drift", namespace, pool))
    wait_condition(cluster, "drift", namespace, "Ready")
    first = placement_of(cluster, namespace, "drift-placement")
    assert first is not None
    # hysteresis: a 1% load change must not churn the placement (within the load tolerance the
    # plan stands without a solve; beyond it a solve finds the gain below the threshold)
    passes_before = reconcile_passes(operator)
    put_load(cluster, namespace, routing_csv(noise=0.01, seed=1))
    wait_for(
        "3 passes on the new load",
        lambda: reconcile_passes(operator) >= passes_before + 3,
        timeout=60,
    )
    obj = get(cluster, "moed", "drift", namespace)
    same = placement_of(cluster, namespace, "drift-placement")
    assert same is not None and same["data"]["version"] == first["data"]["version"]
    assert obj is not None and condition(obj, "Ready")["status"] == "True"
    assert condition(obj, "RolledOut")["reason"] in (
        "GainBelowThreshold",
        "UpToDate",
        "InitialPlacement",
    )
    # a node's GPUs slow down (thermal throttling) -> a new placement rolls out
    throttle_first_node(cluster, pool)

    def new_version() -> dict[str, Any] | None:
        cm = placement_of(cluster, namespace, "drift-placement")
        return cm if cm and cm["data"]["hash"] != first["data"]["hash"] else None

    rolled = wait_for("a new placement after the speed change", new_version, timeout=120)
    assert int(rolled["data"]["version"]) == int(first["data"]["version"]) + 1
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=RolledOut", "-o", "json"
    ).stdout
    assert len(json.loads(events)["items"]) >= 1


def transitions_csv_gz() -> str:
    """The real layer-to-layer transitions as a gzipped CSV, base64 for binaryData (102,400
    pairs: 1.3 MB as plain CSV, over a ConfigMap's 1 MiB; 0.4 MB gzipped)."""
    import base64
    import gzip

    counts = np.load(ROUTING_CSV.parent / "layer_transition_counts.npy")
    layer, src, dst = np.nonzero(counts)
    values = counts[layer, src, dst].tolist()
    rows = zip(layer.tolist(), src.tolist(), dst.tolist(), values, strict=True)
    # layers numbered like load.csv (from 1)
    text = "moe_layer_index,src_expert,dst_expert,count\n" + "".join(
        f"{a + 1},{b},{c},{d}\n" for a, b, c, d in rows
    )
    return base64.b64encode(gzip.compress(text.encode())).decode()


@needs_data
def test_traffic_weight_reports_missing_transitions_then_the_traffic_share(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, routing_csv())
    traffic = {"strategy": "cpsat", "timeLimitSeconds": 2, "trafficWeight": 0.001}
    static = {"configMapName": "routing", "transitionsKey": "transitions.csv.gz"}
    apply(cluster, manifest("traffic", namespace, pool, placement=traffic, load={"static": static}))
    obj = wait_condition(
        cluster, "traffic", namespace, "PlacementSolved", reason="SolvedWithoutTraffic"
    )
    assert "TransitionsMissing" in condition(obj, "PlacementSolved")["message"]
    assert condition(obj, "Ready")["status"] == "True"  # solved without the term, not degraded

    def warnings() -> list[str] | None:
        events = cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector",
            "reason=TransitionsUnavailable", "-o", "json",
        ).stdout  # fmt: skip
        return [e["type"] for e in json.loads(events)["items"]] or None

    assert wait_for("a TransitionsUnavailable Event", warnings, timeout=30) == ["Warning"]
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "routing", "namespace": namespace},
        "data": {"load.csv": routing_csv()},
        "binaryData": {"transitions.csv.gz": transitions_csv_gz()},
    }
    apply(cluster, cm)
    obj = wait_condition(
        cluster, "traffic", namespace, "PlacementSolved", reason="Solved", timeout=120
    )
    summary = obj["status"]["placement"]
    ours = float(summary["trafficSharePercent"].rstrip("%"))
    eplb = float(summary["eplbTrafficSharePercent"].rstrip("%"))
    print(f"tokens changing GPU between layers: moeplace {ours}%, EPLB {eplb}%")
    assert 0 < ours <= 100 and 0 < eplb <= 100
    assert "transitions from ConfigMap routing" in condition(obj, "MetricsAvailable")["message"]
    assert "tokens changing GPU between layers" in condition(obj, "PlacementSolved")["message"]


def throttle_first_node(cluster: Cluster, pool: str) -> None:
    speeds = [[float(s) for s in row] for row in node_speeds(cluster, pool)]
    speeds[0] = [round(s * 0.6, 4) for s in speeds[0]]
    cluster.make_nodes(NODES, GPUS, speeds=speeds, pool=pool, prefix=pool)


def node_speeds(cluster: Cluster, pool: str) -> list[list[str]]:
    nodes = json.loads(
        cluster.kubectl("get", "nodes", "-l", f"gpu.moeplace.io/pool={pool}", "-o", "json").stdout
    )
    by_name = sorted(nodes["items"], key=lambda n: n["metadata"]["name"])
    return [
        [n["metadata"]["labels"][f"gpu.moeplace.io/speed-{i}"] for i in range(GPUS)]
        for n in by_name
    ]


@needs_data
def test_propose_then_pinned_via_export(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    from moeplace_operator.cli_commands import export, status

    put_load(cluster, namespace, routing_csv())
    apply(cluster, manifest("prop", namespace, pool, rollout={"mode": "Propose"}))
    obj = wait_condition(cluster, "prop", namespace, "Ready", reason="ProposalPublished")
    assert placement_of(cluster, namespace, "prop-placement") is None  # Propose changes nothing
    proposal = placement_of(cluster, namespace, "prop-proposal")
    assert proposal is not None and obj["status"]["placement"]["gainOverEplbPercent"]
    pinned = export("prop", namespace, api_client=cluster.api_client())
    cluster.kubectl("apply", "-f", "-", input=pinned)
    assert "mode=Propose" in status("prop", namespace, api_client=cluster.api_client())
    apply(
        cluster,
        manifest(
            "pin",
            namespace,
            pool,
            rollout={"mode": "Pinned", "pinned": {"configMapName": "prop-pinned"}},
        ),
    )
    obj = wait_condition(cluster, "pin", namespace, "Ready")
    cm = placement_of(cluster, namespace, "pin-placement")
    assert cm is not None and cm["data"]["hash"] == proposal["data"]["hash"]
    assert obj["status"]["placement"]["gainPercent"]  # distance from the best proposal
    # a broken pinned placement is refused and the last good one kept
    cluster.kubectl(
        "patch",
        "configmap",
        "prop-pinned",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"data": {"placement.json": "{}"}}),
    )
    wait_condition(cluster, "pin", namespace, "Degraded", reason="PinnedInvalid")
    kept = placement_of(cluster, namespace, "pin-placement")
    assert kept is not None and kept["data"]["hash"] == cm["data"]["hash"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"placement": {"redundantExperts": 3}},
            "must be divisible by gpus.nodeCount * gpus.gpusPerNode",
        ),
        ({"rollout": {"mode": "Pinned"}}, "rollout.pinned is required when rollout.mode is Pinned"),
        (
            {"load": {"prometheus": {"url": "http://p:9090"}}},
            "set exactly one of load.prometheus and load.static",
        ),
        ({"model": {"topK": 65}}, "spec.model.topK"),
        ({"model": {"preset": "deepseek-v3"}}, "moeLayers must match model.preset's"),
        ({"model": {"hiddenLayers": 26}}, "denseLayersBefore + moeLayers must not exceed"),
        ({"rollout": {"cooldown": "ten minutes"}}, "spec.rollout.cooldown"),
        ({"placement": {"strategy": "magic"}}, 'Unsupported value: "magic"'),
    ],
)
def test_invalid_specs_are_rejected_readably(
    cluster: Cluster, crd: None, namespace: str, change: dict[str, Any], message: str
) -> None:
    result = apply(cluster, manifest("bad", namespace, "none", **change), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_minimal_manifest_is_defaulted(cluster: Cluster, crd: None, namespace: str) -> None:
    obj = manifest("minimal", namespace, "none")
    for optional in ("placement", "rollout", "reconcileIntervalSeconds"):
        del obj["spec"][optional]
    apply(cluster, obj)
    spec = (get(cluster, "moed", "minimal", namespace) or {})["spec"]
    assert spec["placement"]["strategy"] == "cpsat" and spec["rollout"]["mode"] == "Auto"
    assert spec["rollout"]["minImprovementPercent"] == 5 and spec["reconcileIntervalSeconds"] == 60


def test_model_shape_is_immutable(cluster: Cluster, crd: None, namespace: str) -> None:
    apply(cluster, manifest("shape", namespace, "none"))
    result = apply(
        cluster,
        manifest("shape", namespace, "none", model={"moeLayers": 27, "hiddenLayers": 28}),
        check=False,
    )
    assert result.returncode != 0 and "model shape is immutable" in result.stderr, result.stderr


class GrowingCounters:
    """Prometheus counters on their own port, each child growing at its own rate per second
    (``rates``), in steps of 0.25 s: what a serving pod's counters look like to a scrape."""

    TICK_S = 0.25

    def __init__(self) -> None:
        self.port = free_port()
        self.registry = CollectorRegistry()
        self.rates: list[tuple[Any, float]] = []

    def counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def start(self) -> None:
        self.stop = threading.Event()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.stop.wait(self.TICK_S):
            for child, rate in self.rates:
                child.inc(rate * self.TICK_S)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()


class RoutingExporter(GrowingCounters):
    """Serves moe_expert_tokens_total{model, layer, expert} growing at the real routing
    counts' proportions (scaled to tokens per second)."""

    def __init__(self, model: str, tokens_per_s: float = 50_000) -> None:
        super().__init__()
        counter = self.counter(
            "moe_expert_tokens", "Tokens routed to an expert", ["model", "layer", "expert"]
        )
        rows = list(csv.DictReader(ROUTING_CSV.read_text().splitlines()))
        total = sum(float(r["count"]) for r in rows)
        self.rates = [
            (
                counter.labels(model, r["moe_layer_index"], r["expert_id"]),
                float(r["count"]) / total * tokens_per_s,
            )
            for r in rows
        ]
        self.start()


class TcpProxy:
    """A port in front of Prometheus that the test can take down: "Prometheus is down" from
    the operator's point of view, without stopping the shared Prometheus."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.open = False
        self.listener.close()


@needs_data
def test_prometheus_load_then_prometheus_down_keeps_placement(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    model = f"lite-{namespace}"
    exporter = RoutingExporter(model)
    job = f"routing-{namespace}"
    cluster.add_scrape_target(job, f"127.0.0.1:{exporter.port}")
    proxy = TcpProxy(int(cluster.prometheus_url.rsplit(":", 1)[1]))
    try:
        cluster.wait_prom(
            f'sum(rate(moe_expert_tokens_total{{model="{model}"}}[5s])) > 0', timeout=60
        )
        prometheus = {
            "url": f"http://127.0.0.1:{proxy.port}",
            "window": "30s",
            "samples": 3,
            "layerOffset": 1,
        }
        obj = manifest("prom", namespace, pool, model={"name": model})
        obj["spec"]["load"] = {"prometheus": prometheus}
        apply(cluster, obj)
        obj = wait_condition(cluster, "prom", namespace, "Ready")
        assert condition(obj, "MetricsAvailable")["reason"] == "Prometheus"
        cm = placement_of(cluster, namespace, "prom-placement")
        assert cm is not None
        proxy.close()
        obj = wait_condition(
            cluster, "prom", namespace, "Degraded", reason="PrometheusUnreachable", timeout=60
        )
        assert condition(obj, "Ready")["status"] == "False"
        assert condition(obj, "MetricsAvailable")["status"] == "False"
        kept = placement_of(cluster, namespace, "prom-placement")
        assert kept is not None and kept["data"]["hash"] == cm["data"]["hash"]
        assert cm["data"]["hash"] in condition(obj, "Degraded")["message"]
    finally:
        proxy.close()
        cluster.remove_scrape_target(job)
        exporter.close()


class ServingExporter:
    """One serving rank's real ``ServingMetrics`` with transitions on (3 MoE layers x 32
    experts, top-2, 256 tokens every 0.25 s): each token's first expert in layer l+1 is its
    first in layer l plus one (a chain that placement can keep on one GPU), the second random."""

    LAYERS, EXPERTS = 3, 32

    def __init__(self, model: str) -> None:
        from moeplace_serving.metrics import ServingMetrics

        self.metrics = ServingMetrics(model, self.LAYERS, self.EXPERTS, transitions=True)
        self.port = free_port()
        self.metrics.serve(self.port)
        self.stop = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        rng = np.random.default_rng(0)
        steps = np.arange(self.LAYERS)[None, :]
        while not self.stop.wait(0.25):
            first = (rng.integers(0, self.EXPERTS, size=(256, 1)) + steps) % self.EXPERTS
            second = (first + rng.integers(1, self.EXPERTS, size=first.shape)) % self.EXPERTS
            self.metrics.observe_routing(np.stack([first, second], axis=-1))

    def close(self) -> None:
        self.stop.set()


def test_prometheus_transitions_from_serving_metrics_shape_the_placement(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    """Serving's opt-in moe_expert_transitions_total, scraped by the real Prometheus, read by
    the operator's default transitions query: the placement keeps the chained experts together
    (fewer tokens change GPU than with EPLB)."""
    model = f"chain-{namespace}"
    exporter = ServingExporter(model)
    job = f"serving-{namespace}"
    cluster.add_scrape_target(job, f"127.0.0.1:{exporter.port}")
    try:
        cluster.wait_prom(
            f'sum(rate(moe_expert_transitions_total{{model="{model}"}}[5s])) > 0', timeout=60
        )
        obj = manifest(
            "chain",
            namespace,
            pool,
            model={"name": model, "moeLayers": 3, "expertsPerLayer": 32, "topK": 2},
            placement={"strategy": "cpsat", "timeLimitSeconds": 2, "trafficWeight": 1.0},
        )
        prometheus = {"url": cluster.prometheus_url, "window": "30s", "samples": 3}
        obj["spec"]["load"] = {"prometheus": prometheus}
        apply(cluster, obj)
        obj = wait_condition(cluster, "chain", namespace, "PlacementSolved", reason="Solved")
        assert "transitions from Prometheus" in condition(obj, "MetricsAvailable")["message"]
        summary = obj["status"]["placement"]
        ours = float(summary["trafficSharePercent"].rstrip("%"))
        eplb = float(summary["eplbTrafficSharePercent"].rstrip("%"))
        print(
            f"chained routing, tokens changing GPU between layers: moeplace {ours}%, EPLB "
            f"{eplb}%; {condition(obj, 'MetricsAvailable')['message']}"
        )
        assert ours < eplb - 10
    finally:
        cluster.remove_scrape_target(job)
        exporter.close()


class RankExporter(GrowingCounters):
    """Serving counters of an EP group of 4 ranks: routing per expert (the load) and, per rank,
    ``moe_layer_tokens_total`` and ``moe_layer_compute_seconds_total`` growing as GPUs of the
    given true speeds would compute the same token rate."""

    LAYERS, EXPERTS = 2, 8

    def __init__(self, model: str, true_speeds: list[float], pairs_per_s: float = 10_000) -> None:
        super().__init__()
        routed = self.counter("moe_expert_tokens", "Tokens routed", ["model", "layer", "expert"])
        tokens = self.counter("moe_layer_tokens", "Pairs computed", ["model", "layer", "rank"])
        seconds = self.counter(
            "moe_layer_compute_seconds", "Expert compute seconds", ["model", "layer", "rank"]
        )
        for layer in range(self.LAYERS):
            for expert in range(self.EXPERTS):
                rate = 1000.0 * (1 + expert % 3)
                self.rates.append((routed.labels(model, str(layer), str(expert)), rate))
            for rank, speed in enumerate(true_speeds):
                pairs = pairs_per_s / self.LAYERS
                self.rates.append((tokens.labels(model, str(layer), str(rank)), pairs))
                busy = pairs * 1e-6 / speed  # 1 µs per pair at speed 1.0
                self.rates.append((seconds.labels(model, str(layer), str(rank)), busy))
        self.start()


def test_speed_drift_from_serving_times_requests_a_reprofile(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Issue 6: per-rank compute times scraped by the real Prometheus say that GPU 1 of the
    first node runs at 0.8x while its label says 1.0: GPUsProfiled turns False (SpeedDrift),
    the node is annotated for a re-profile, a Warning Event is sent; once the profiler's new
    label agrees, the condition clears. The placement stays Ready throughout."""
    pool = f"d{uuid.uuid4().hex[:6]}"
    speeds = [[1.0, 1.0], [1.2, 0.8]]
    first, second = cluster.make_nodes(2, 2, speeds=speeds, pool=pool, prefix=pool)
    model = f"drift-{namespace}"
    exporter = RankExporter(model, true_speeds=[1.0, 0.8, 1.2, 0.8])
    job = f"ranks-{namespace}"
    cluster.add_scrape_target(job, f"127.0.0.1:{exporter.port}")
    try:
        cluster.wait_prom(
            f'count(increase(moe_layer_tokens_total{{model="{model}"}}[10s]) > 0) >= 8', timeout=60
        )
        obj = manifest(
            "drift",
            namespace,
            pool,
            model={"name": model, "moeLayers": 2, "expertsPerLayer": 8, "topK": 2},
            gpus={"nodeCount": 2, "gpusPerNode": 2},
            placement={"strategy": "greedy"},
        )
        prometheus = {"url": cluster.prometheus_url, "window": "30s", "samples": 3}
        obj["spec"]["load"] = {"prometheus": prometheus}
        apply(cluster, obj)
        obj = wait_condition(
            cluster, "drift", namespace, "GPUsProfiled", status="False", reason="SpeedDrift"
        )
        message = condition(obj, "GPUsProfiled")["message"]
        print(f"GPUsProfiled: {message}")
        assert f"{first}/1 measured" in message and "1 GPU(s)" in message
        assert condition(obj, "Ready")["status"] == "True"
        node = json.loads(cluster.kubectl("get", "node", first, "-o", "json").stdout)
        stamp = node["metadata"]["annotations"]["gpu.moeplace.io/reprofile-requested-at"]
        assert stamp.endswith("Z")
        other = json.loads(cluster.kubectl("get", "node", second, "-o", "json").stdout)
        assert "gpu.moeplace.io/reprofile-requested-at" not in (
            other["metadata"].get("annotations") or {}
        )
        events = json.loads(
            cluster.kubectl(
                "get", "events", "-n", namespace, "--field-selector", "reason=SpeedDrift",
                "-o", "json",
            ).stdout
        )["items"]  # fmt: skip
        assert events and events[0]["type"] == "Warning"
        assert 'moeplace_gpu_speed_drift_gpus{name="drift"' in operator.metrics()
        # what the node's profiler would publish after re-profiling
        cluster.kubectl("label", "node", first, "gpu.moeplace.io/speed-1=0.8", "--overwrite")
        obj = wait_condition(cluster, "drift", namespace, "GPUsProfiled", reason="SpeedLabels")
        assert condition(obj, "Ready")["status"] == "True"
    finally:
        cluster.remove_scrape_target(job)
        exporter.close()
        cluster.delete_nodes(pool=pool)


def deployment(name: str, namespace: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "engine", "image": "sglang:fake"}]},
            },
        },
    }


@needs_data
def test_restart_mid_rollout_converges_and_deletion_collects(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, routing_csv())
    apply(cluster, deployment("engine", namespace))
    apply(
        cluster,
        manifest(
            "restart", namespace, pool, rollout={"target": {"kind": "Deployment", "name": "engine"}}
        ),
    )
    wait_condition(cluster, "restart", namespace, "Ready")
    first = placement_of(cluster, namespace, "restart-placement")
    assert first is not None
    throttle_first_node(cluster, pool)
    time.sleep(1.0)  # the node change has nudged the reconcile; kill it while it solves
    operator.stop(signal.SIGKILL)
    operator.start()

    def converged() -> str | None:
        cm = placement_of(cluster, namespace, "restart-placement")
        engine = get(cluster, "deployment", "engine", namespace) or {}
        annotations = (
            engine.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
        )
        new = cm and cm["data"]["hash"] != first["data"]["hash"]
        return (
            cm["data"]["hash"]
            if new and annotations.get("moeplace.io/placement-hash") == cm["data"]["hash"]
            else None
        )

    rolled = wait_for("rollout after restart, target rolled", converged, timeout=90)

    def restart_configmaps(output: str) -> str:
        selector = ("-l", "moeplace.io/deployment=restart", "-o", output)
        return cluster.kubectl("get", "configmaps", "-n", namespace, *selector).stdout

    maps = json.loads(restart_configmaps("json"))["items"]
    assert [m["metadata"]["name"] for m in maps] == ["restart-placement"]
    assert (
        maps[0]["data"]["version"] == str(int(first["data"]["version"]) + 1)
        and maps[0]["data"]["hash"] == rolled
    )
    cluster.kubectl("delete", "moed", "restart", "-n", namespace, "--wait=true", "--timeout=60s")

    def collected() -> bool:
        return not restart_configmaps("name").strip()

    wait_for("garbage collection of the placement ConfigMap", collected, timeout=90, every=1)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(
    os.environ.get("MOEPLACE_SCALE_TEST") != "1",
    reason="a 4-minute measurement: MOEPLACE_SCALE_TEST=1",
)
@needs_data
def test_latency_with_100_deployments(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, routing_csv())
    count = 100
    started = time.monotonic()
    body = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            manifest(f"m{i:03d}", namespace, pool, placement={"timeLimitSeconds": 1})
            for i in range(count)
        ],
    }
    apply(cluster, body)
    seen: dict[str, float] = {}
    api_client = cluster.api_client()
    from kubernetes import client

    core = client.CoreV1Api(api_client)

    def all_written() -> bool:
        for cm in core.list_namespaced_config_map(
            namespace, label_selector="moeplace.io/role=placement"
        ).items:
            seen.setdefault(cm.metadata.name, time.monotonic() - started)
        return len(seen) >= count

    wait_for(f"{count} placement ConfigMaps", all_written, timeout=1200, every=0.5)
    latencies = sorted(seen.values())
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95) - 1]
    print(
        f"{count} MoEDeployments at {LAYERS}x{EXPERTS}, {NODES * GPUS} GPUs: "
        f"first {latencies[0]:.1f} s, p50 {p50:.1f} s, p95 {p95:.1f} s, last {latencies[-1]:.1f} s"
    )
    cluster.kubectl("delete", "moed", "--all", "-n", namespace, "--wait=true", "--timeout=300s")
