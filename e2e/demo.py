"""The README's demo: kwok GPU nodes with measured speed spreads, the CRD, the operator, one
MoEDeployment (DeepSeek-V2-Lite shape, real routing counts as a static load), its placement
summary against EPLB, then everything removed again. Needs `e2e/cluster up` first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import localcluster as lc

ROOT = Path(__file__).resolve().parents[1]
ROUTING_CSV = ROOT.parent / "shared/data/routing/deepseek-v2-lite-chat/expert_counts.csv"
NAMESPACE, NAME, POOL = "moeplace-demo", "deepseek-v2-lite", "demo"


def kubectl(*args: str, stdin: str | None = None) -> str:
    kubeconfig = lc.Paths(lc.default_state()).kubeconfig
    argv = [str(lc.bin_dir() / "kubectl"), f"--kubeconfig={kubeconfig}", *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def synthetic_load() -> str:
    """Zipf-like skew, for machines without ../shared/data."""
    rows = [
        f"{layer},{e},{int(10000 / (1 + (e * 7 + layer) % 64) ** 0.6)}"
        for layer in range(1, 27)
        for e in range(64)
    ]
    return "moe_layer_index,expert_id,count\n" + "\n".join(rows) + "\n"


def manifests() -> str:
    load = ROUTING_CSV.read_text() if ROUTING_CSV.exists() else synthetic_load()
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "routing", "namespace": NAMESPACE},
            "data": {"load.csv": load},
        },
        {
            "apiVersion": "moeplace.io/v1alpha1",
            "kind": "MoEDeployment",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": {
                "model": {
                    "name": NAME,
                    "moeLayers": 26,
                    "expertsPerLayer": 64,
                    "topK": 6,
                    "preset": "deepseek-v2-lite",
                },
                "gpus": {"nodeSelector": {lc.POOL_LABEL: POOL}, "nodeCount": 4, "gpusPerNode": 8},
                "placement": {"strategy": "cpsat", "timeLimitSeconds": 5},
                "load": {"static": {"configMapName": "routing"}},
            },
        },
    ]
    return "\n".join(json.dumps(o) for o in objects)


def wait_ready(timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = json.loads(kubectl("get", "moed", NAME, "-n", NAMESPACE, "-o", "json"))
        ready = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
        if ready and ready[0]["status"] == "True":
            return dict(obj)
        time.sleep(0.5)
    raise TimeoutError(f"{NAME} not Ready after {timeout} s")


def summary(obj: dict[str, object], seconds: float) -> str:
    s = obj["status"]["placement"]  # type: ignore[index]
    rows = [
        ("GPUs (4 kwok nodes, PAL-measured speeds)", str(s["gpus"])),
        ("placement ConfigMap", f"{s['configMap']} v{s['version']} hash {s['hash']}"),
        ("predicted straggler / fluid bound", s["stragglerOverBound"]),
        ("predicted gain over DeepSeek EPLB", s["gainOverEplbPercent"]),
        ("solver gap", s["solverGap"]),
        ("load", s["loadWindow"]),
        ("apply -> Ready", f"{seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    lc.make_nodes(4, 8, "pal", POOL, POOL)
    kubectl("apply", "--server-side", "-f", str(ROOT / "crds/moedeployment.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/moedeployments.moeplace.io")
    env = {
        **os.environ,
        "KUBECONFIG": str(lc.Paths(lc.default_state()).kubeconfig),
        "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT}",
        "MOEPLACE_METRICS_PORT": "0",  # off: the demo needs no ports
        "MOEPLACE_LIVENESS_ENDPOINT": "",
    }
    log = (lc.default_state() / "logs").resolve()
    log.mkdir(parents=True, exist_ok=True)
    with (log / "demo-operator.log").open("w") as out:
        operator = subprocess.Popen(
            [sys.executable, "-m", "moeplace_operator"], env=env, stdout=out, stderr=out
        )
    try:
        started = time.monotonic()
        kubectl("apply", "--server-side", "-f", "-", stdin=manifests())
        obj = wait_ready()
        print(kubectl("get", "moed", "-n", NAMESPACE))
        print(summary(obj, time.monotonic() - started))
        kubectl("delete", "moed", NAME, "-n", NAMESPACE, "--timeout=60s")
    finally:
        kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found")
        operator.terminate()
        operator.wait(timeout=30)
        lc.delete_nodes(f"{lc.POOL_LABEL}={POOL}")


if __name__ == "__main__":
    main()
