"""Closed loop, end to end: serving stand-in -> Prometheus -> operator -> ConfigMap -> ranks.

The real local cluster (kube-apiserver, kwok GPU nodes, real Prometheus), the real operator
(`python -m moeplace_operator`) and the serving stand-in (`python -m moeplace_serving.standin`,
one process per rank) replaying real DeepSeek-V2-Lite routing. No container runtime: the ranks
stand for the serving pods, and a small syncer copies the placement ConfigMap from the API server
into one directory per rank in the kubelet's layout (``..data`` swap), rank r a little later than
rank r-1, as kubelets on different nodes would. GPU speed is emulated in the ranks from the speed
labels of the kwok nodes.

Printed: per-layer straggler time (summed over layers, per step) before and after each rollout,
with even and speed-aware dispatch (the ranks alternate them step by step): measured by the ranks
(CPU-time emulation, noisy on a shared machine), realized (the pairs each rank computed, under
the time model), and predicted (``placement.evaluate`` on the replayed batches, and on their
aggregate as the operator scores a window); the load shift and the new placement it leads to;
switch times; lost / misrouted pairs; the corrupt ConfigMap refused by every rank. Asserted: no
lost, misrouted or mixed-version step; a rollout after the shift, served by all ranks; the corrupt
map refused everywhere while serving continues; the operator's placement beats the initial one
(realized, speed-aware, by more than 10%).

Run: ``pytest -m e2e e2e/test_closed_loop.py -s`` (about 2.5 minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Cluster, wait_for
from moeplace_serving.configdir import write_atomic
from moeplace_serving.standin import (
    DEFAULT_ROUTING,
    Trace,
    format_summary,
    initial_placement,
    summarize,
)

from placement import Cluster as GPUCluster
from placement import MoEModelShape, Placement
from placement.evaluate import Dispatch, evaluate

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not DEFAULT_ROUTING.exists(), reason="../shared/data is absent"),
]

ROOT = Path(__file__).resolve().parents[1]
NODES, GPUS = 2, 2
RANKS = NODES * GPUS
# A ±20% spread: the slowest of Longhorn's 392 V100s runs SGEMM 1.20x the median (PAL data).
SPEEDS = [[1.0, 0.8], [1.2, 0.9]]
REDUNDANT, SLOTS = 8, (64 + 8) // 4
BEFORE, AFTER = (1, 51), (700, 751)  # prompt slices replayed before / after the load shift
KUBELET_LAG_S = 0.5  # rank r gets each ConfigMap version r * lag after rank 0
WINDOW_S = 30  # operator's load window (3 sub-windows of 10 s)
TOKENS = 128  # per step


def free_ports(count: int) -> int:
    """First of ``count`` consecutive free ports, below Linux's ephemeral range (32768 up):
    ports are bound later by other processes, and an outgoing connection of the loaded machine
    (scrapes, watches) can take an ephemeral one in between (seen: rank metrics EADDRINUSE)."""
    while True:
        base = random.randint(20000, 32000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()


class Syncer(threading.Thread):
    """Copies ConfigMap ``name`` into each rank's directory the way the kubelet does."""

    def __init__(self, cluster: Cluster, namespace: str, name: str, dirs: list[Path]) -> None:
        super().__init__(daemon=True)
        self.cluster, self.namespace, self.name, self.dirs = cluster, namespace, name, dirs
        self.seen: dict[str, dict[str, str]] = {}  # resourceVersion -> data
        self.stop = threading.Event()

    def run(self) -> None:
        from kubernetes.client import CoreV1Api
        from kubernetes.client.exceptions import ApiException

        api = CoreV1Api(self.cluster.api_client())
        while not self.stop.wait(0.3):
            try:
                cm = api.read_namespaced_config_map(self.name, self.namespace)
            except ApiException:
                continue
            if cm.metadata.resource_version in self.seen:
                continue
            self.seen[cm.metadata.resource_version] = dict(cm.data)
            for rank, directory in enumerate(self.dirs):
                time.sleep(KUBELET_LAG_S if rank else 0.0)
                write_atomic(directory, cm.data)


class Process:
    """A subprocess with its output in a log file, stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def records(report: Path) -> list[dict[str, Any]]:
    lines = report.read_text().splitlines() if report.exists() else []
    return [json.loads(line) for line in lines]


def batch_counts(prompts: tuple[int, int], steps: list[int]) -> np.ndarray:
    """[K, 26, 64] token counts of the batches the stand-in replayed at ``steps``."""
    trace = Trace(DEFAULT_ROUTING, prompts)
    counts = np.zeros((len(steps), 26, 64))
    for k, step in enumerate(steps):
        ids = trace.batch(step, TOKENS)[1]  # [T, 26, 6]
        for layer in range(26):
            counts[k, layer] = np.bincount(ids[:, layer].ravel(), minlength=64)
    return counts


@dataclass(frozen=True)
class Scenario:
    """A namespace of its own with kwok GPU nodes (pool = namespace) and the operator watching
    it; ``ports`` is the first of RANKS + 3 free ports (ranks, collective, operator x2)."""

    namespace: str
    model: str
    ports: int
    env: dict[str, str]
    operator: Process


@contextlib.contextmanager
def operator_scenario(cluster: Cluster, tmp_path: Path, prefix: str) -> Iterator[Scenario]:
    """The CRD, a namespace, its nodes and the operator; removed again afterwards (the
    MoEDeployments first, while the operator runs, so their finalizer is released)."""
    namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds/moedeployment.yaml"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/moedeployments.moeplace.io", "--timeout=60s"
    )
    cluster.kubectl("create", "namespace", namespace)
    cluster.make_nodes(NODES, GPUS, speeds=SPEEDS, pool=namespace, prefix=namespace)
    ports = free_ports(RANKS + 3)
    paths = os.pathsep.join(str(ROOT / d) for d in ("", "operator", "serving"))
    env = {**cluster.env, "PYTHONPATH": paths}
    operator = Process(
        [sys.executable, "-m", "moeplace_operator"],
        env | {"MOEPLACE_METRICS_PORT": str(ports + RANKS + 1), "MOEPLACE_NAMESPACES": namespace,
               "MOEPLACE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{ports + RANKS + 2}/healthz"},
        tmp_path / "operator.log",
    )  # fmt: skip
    try:
        yield Scenario(namespace, f"lite-{namespace}", ports, env, operator)
    finally:
        cluster.kubectl("delete", "moed", "--all", "-n", namespace, "--timeout=60s", check=False)
        operator.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.delete_nodes(pool=namespace)


@pytest.fixture
def loop(cluster: Cluster, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Namespace, kwok nodes, operator, stand-in ranks scraped by Prometheus, syncer."""
    with operator_scenario(cluster, tmp_path, "loop") as scenario:
        namespace, model, ports = scenario.namespace, scenario.model, scenario.ports
        dirs = [tmp_path / f"rank-{rank}" for rank in range(RANKS)]
        speeds = ",".join(str(s) for row in SPEEDS for s in row)  # slot order: node, then GPU
        standin = Process(
            [sys.executable, "-m", "moeplace_serving.standin", "--ranks", str(RANKS),
             "--speeds", speeds, "--placement-dir", str(tmp_path / "rank-{rank}"),
             "--prompts", "{}:{}".format(*BEFORE), "--shift-prompts", "{}:{}".format(*AFTER),
             "--shift-file", str(tmp_path / "shift"), "--tokens", str(TOKENS),
             "--dispatch", "alternate", "--slots-per-rank", str(SLOTS), "--model", model,
             "--metrics-port", str(ports),
             "--collective-port", str(ports + RANKS), "--poll-interval", "0.2",
             "--step-interval", "0.1", "--report", str(tmp_path / "report.jsonl")],
            scenario.env | {"OMP_NUM_THREADS": "1"},
            tmp_path / "standin.log",
        )  # fmt: skip
        job = f"standin-{namespace}"
        cluster.add_scrape_target(job, [f"127.0.0.1:{ports + r}" for r in range(RANKS)])
        syncer = Syncer(cluster, namespace, "lite-placement", dirs)
        syncer.start()
        try:
            yield {
                "namespace": namespace, "model": model, "metrics": ports, "tmp": tmp_path,
                "syncer": syncer, "report": tmp_path / "report.jsonl",
            }  # fmt: skip
        finally:
            syncer.stop.set()
            standin.stop()
            cluster.remove_scrape_target(job)
    for log in (standin.log, scenario.operator.log):
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print(f"--- {log.name} (tail)\n" + "\n".join(tail))


def manifest(namespace: str, model: str, prometheus_url: str) -> dict[str, Any]:
    return {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "lite", "namespace": namespace},
        "spec": {
            "model": {
                "name": model,
                "preset": "deepseek-v2-lite",
                "moeLayers": 26,
                "expertsPerLayer": 64,
                "topK": 6,
            },
            "gpus": {
                "nodeSelector": {"gpu.moeplace.io/pool": namespace},
                "nodeCount": NODES,
                "gpusPerNode": GPUS,
            },
            "placement": {"strategy": "greedy", "redundantExperts": REDUNDANT},
            "load": {"prometheus": {"url": prometheus_url, "window": f"{WINDOW_S}s", "samples": 2}},
            "rollout": {"minImprovementPercent": 5, "cooldown": "0s"},
            "reconcileIntervalSeconds": 5,
        },
    }


def steps_where(report: Path, prompts: tuple[int, int], since_version: int) -> int:
    """Steps served on ``prompts`` with a placement version >= ``since_version``."""
    return sum(
        1
        for r in records(report)
        if r["version"] >= since_version and tuple(r["prompts"]) == prompts
    )


def placement_version(cluster: Cluster, namespace: str) -> tuple[int, str] | None:
    got = cluster.kubectl(
        "get", "configmap", "lite-placement", "-n", namespace, "-o", "json", check=False
    )
    if got.returncode != 0:
        return None
    data = json.loads(got.stdout)["data"]
    return int(data["version"]), data["placement.json"]


def predicted(placement: Placement, load: np.ndarray, dispatch: Dispatch) -> float:
    """Straggler time (token-times) of ``placement`` on ``load`` ([L, E] or [K, L, E])."""
    gpus = GPUCluster.uniform(RANKS, gpus_per_node=GPUS, speeds=[s for r in SPEEDS for s in r])
    return evaluate(placement, gpus, load, dispatch=dispatch).straggler


def before_after(
    recs: list[dict[str, Any]], old: tuple[int, Placement], new: tuple[int, Placement],
    prompts: tuple[int, int],
) -> tuple[list[str], list[tuple[float, float]]]:  # fmt: skip
    """Lines comparing ``old`` -> ``new`` on ``prompts``, per dispatch rule, as ratios new/old
    of the mean straggler per step: measured by the ranks (CPU-time emulation); realized (the
    pairs the ranks computed, under the time model) and ``placement.evaluate`` on exactly the
    batches each version served (they must agree: the ranks served what was rolled out); both
    versions on the same batches (all batches of the slice: the placement's own effect); and on
    the slice's aggregate load (how the operator scores a window). Also returns (realized,
    predicted on the served batches) per rule."""
    trace_steps = -(-Trace(DEFAULT_ROUTING, prompts).ids.shape[0] // TOKENS)
    every = batch_counts(prompts, list(range(trace_steps)))
    lines, checks = [], []
    rules: tuple[Dispatch, ...] = ("even", "speed-aware")  # the ranks report the same names
    for rule in rules:
        served = [
            [
                r for r in recs
                if r["version"] == version and tuple(r["prompts"]) == prompts
                and r["dispatch"] == rule
            ]
            for version in (old[0], new[0])
        ]  # fmt: skip
        if not all(served):
            lines.append(f"  {rule:<11} dispatch: not served by both versions")
            continue
        means = [{k: float(np.mean([r[k] for r in v])) for k in _MEASURED} for v in served]
        on_served = [
            predicted(p, batch_counts(prompts, [r["step"] for r in v]), rule)
            for p, v in zip((old[1], new[1]), served, strict=True)
        ]
        realized = means[1]["realized"] / means[0]["realized"]
        checks.append((realized, on_served[1] / on_served[0]))
        same = predicted(new[1], every, rule) / predicted(old[1], every, rule)
        whole = predicted(new[1], every.sum(0), rule) / predicted(old[1], every.sum(0), rule)
        lines.append(
            f"  {rule:<11} dispatch: measured "
            f"x{means[1]['straggler_us'] / means[0]['straggler_us']:.3f} | realized "
            f"x{realized:.3f} (predicted on the served "
            f"batches x{on_served[1] / on_served[0]:.3f}) | same batches x{same:.3f} | "
            f"aggregate load x{whole:.3f}"
        )
    return lines, checks


_MEASURED = ("straggler_us", "realized")


def test_closed_loop(cluster: Cluster, loop: dict[str, Any]) -> None:
    namespace, report, syncer = loop["namespace"], loop["report"], loop["syncer"]
    tmp: Path = loop["tmp"]
    # 1. serving on version 0 (round robin); Prometheus fills the operator's window
    wait_for("stand-in steps", lambda: len(records(report)) >= 5, timeout=90)
    cluster.wait_prom(f'sum(rate(moe_expert_tokens_total{{model="{loop["model"]}"}}[5s])) > 0')
    time.sleep(WINDOW_S)
    # 2. the operator solves on Prometheus' load and rolls out; the ranks switch together
    cluster.kubectl(
        "apply", "--server-side", "-f", "-",
        input=json.dumps(manifest(namespace, loop["model"], cluster.prometheus_url)),
    )  # fmt: skip
    wait_for("first placement", lambda: placement_version(cluster, namespace), 120)
    wait_for("40 steps on it", lambda: steps_where(report, BEFORE, 1) >= 40, timeout=180)
    got = cluster.kubectl("get", "moed", "lite", "-n", namespace, "-o", "json")
    summary = json.loads(got.stdout)["status"]["placement"]
    # 3. load shift: another slice of the trace -> a new placement after the window
    at_shift = _version(placement_version(cluster, namespace))
    shifted_at = time.monotonic()
    (tmp / "shift").touch()
    first_new = wait_for(
        "a placement for the shifted load",
        lambda: (got := placement_version(cluster, namespace)) and got[0] > at_shift and got[0],
        timeout=WINDOW_S * 6,
    )
    rolled_after = time.monotonic() - shifted_at
    got = cluster.kubectl("get", "moed", "lite", "-n", namespace, "-o", "json")
    summary_shift = json.loads(got.stdout)["status"]["placement"]
    time.sleep(WINDOW_S + 10)  # the window now holds only shifted traffic
    settled = _version(placement_version(cluster, namespace))
    wait_for("40 steps after it", lambda: steps_where(report, AFTER, settled) >= 40, timeout=180)
    # 4. a corrupt ConfigMap: every rank's watcher refuses it and keeps serving
    cluster.kubectl(
        "patch", "configmap", "lite-placement", "-n", namespace, "--type=merge",
        "-p", json.dumps({"data": {"placement.json": '{"phy2log": [[0, 1'}}),
    )  # fmt: skip
    refused = 'moe_placement_reloads_total{model="%s",rank="%d",result="invalid"}'

    def all_refused() -> bool:
        model, base = loop["model"], loop["metrics"]
        return all(refused % (model, r) in scrape(base + r) for r in range(RANKS))

    wait_for("every rank to refuse the corrupt placement", all_refused, timeout=30)
    corrupt_at = len(records(report))
    kept = records(report)[-1]["version"]
    repaired = wait_for(
        "the operator to replace the unreadable ConfigMap",
        lambda: (got := placement_version(cluster, namespace)) and _parses(got[1]) and got,
        timeout=60,
    )
    wait_for("10 more steps", lambda: len(records(report)) >= corrupt_at + 10, timeout=60)

    recs = records(report)
    rows = summarize(recs)
    placements = _placements(syncer, recs)
    print("\n" + format_summary(rows))
    before = _busiest(rows, BEFORE, lambda v: v >= 1)
    print(
        f"\nrollout v{before} (operator's prediction: straggler/fluid "
        f"{summary['stragglerOverBound']}, gain over EPLB {summary['gainOverEplbPercent']}), "
        f"replayed prompts {BEFORE}:"
    )
    lines, checks = before_after(recs, (0, placements[0]), (before, placements[before]), BEFORE)
    print("\n".join(lines))
    old = max(r["version"] for r in recs if tuple(r["prompts"]) == BEFORE)
    new = _busiest(rows, AFTER, lambda v: v > old)
    print(
        f"load shift to prompts {AFTER}: first new placement v{first_new} {rolled_after:.0f} s "
        f"later (window {WINDOW_S} s; operator's predicted gain on its window "
        f"{summary_shift['gainPercent']}); compared: v{old} (in service at the shift) -> v{new}"
    )
    lines, more = before_after(recs, (old, placements[old]), (new, placements[new]), AFTER)
    print("\n".join(lines))
    checks += more
    for rec in recs:
        if rec["switch"]:
            sw = rec["switch"]
            print(
                f"switch v{sw['old_version']} -> v{sw['new_version']} at step {sw['step']}: "
                f"{sw['total_s'] * 1e3:.0f} ms (agree {sw['agree_s'] * 1e3:.1f} ms, "
                f"load weights {sw['move_s'] * 1e3:.0f} ms)"
            )
    print(
        f"corrupt ConfigMap: refused by all {RANKS} ranks, which kept serving v{kept}; the "
        f"operator replaced it with a valid one (version key {repaired[0]}); ranks now on "
        f"v{recs[-1]['version']}"
    )
    lost = sum(r["expected_pairs"] - r["pairs"] for r in recs)
    misrouted = sum(r["misrouted"] for r in recs)
    mixed = sum(int(r["mixed_versions"]) for r in recs)
    print(f"{len(recs)} steps: lost pairs {lost}, misrouted pairs {misrouted}, mixed steps {mixed}")
    assert lost == misrouted == mixed == 0
    # the ranks served exactly what was rolled out: realized == predicted on the same batches
    assert all(abs(realized / served - 1) < 0.02 for realized, served in checks), checks
    assert all(r["version"] >= kept for r in recs[corrupt_at:])
    realized = {(r["version"], r["prompts"], r["dispatch"]): r["realized"] for r in rows}
    slice_before = "{}:{}".format(*BEFORE)
    aware = {key[:2]: value for key, value in realized.items() if key[2] == "speed-aware"}
    assert aware[(before, slice_before)] < 0.9 * aware[(0, slice_before)]


def _placements(syncer: Syncer, recs: list[dict[str, Any]]) -> dict[int, Placement]:
    """The placement each served version stood for, by the content hash the ranks reported
    (a version number alone is ambiguous: the operator reuses 1 after an unreadable map)."""
    by_hash = {}
    for data in syncer.seen.values():
        if _parses(data["placement.json"]):
            placement = Placement.model_validate_json(data["placement.json"])
            by_hash[placement.content_hash()] = placement
    out = {0: initial_placement(_shape(), RANKS, SLOTS)}
    for rec in recs:
        if rec["version"] not in out:
            out[rec["version"]] = by_hash[rec["hash"]]
    return out


def _busiest(
    rows: list[dict[str, Any]], prompts: tuple[int, int], keep: Callable[[int], bool]
) -> int:
    """The version served for the most steps on ``prompts`` among those ``keep`` accepts."""
    steps: dict[int, int] = {}
    for r in rows:
        if r["prompts"] == "{}:{}".format(*prompts) and keep(r["version"]):
            steps[r["version"]] = steps.get(r["version"], 0) + r["steps"]
    return max(steps, key=lambda v: steps[v])


def _parses(text: str) -> bool:
    try:
        Placement.model_validate_json(text)
    except ValueError:
        return False
    return True


def _version(got: tuple[int, str] | None) -> int:
    assert got is not None
    return got[0]


def _shape() -> MoEModelShape:
    return MoEModelShape(name="standin", moe_layers=26, experts=64, top_k=6)
