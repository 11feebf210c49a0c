"""Bad input against the real API server and a real operator process (issue 13): specs drawn
from the CRD's own schema and mutated (hypothesis, derandomized), garbage node labels and
annotations, broken load CSVs and Pinned files, placement ConfigMaps the API server would
refuse. Each is refused by validation with a readable message, or reconciled to Ready or to a
Degraded condition with reason and message, the last good placement kept; never a crash,
never a hot loop. Figures are printed (`pytest -s`)."""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import test_operator
import yaml
from conftest import Cluster, wait_for
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from test_operator import OperatorProcess, condition, fresh_namespace, get, put_load

from placement.formats import parse_canonical
from placement.names import OWNER_LABEL

pytestmark = [pytest.mark.e2e, pytest.mark.badinput]

# test_operator's fixtures, by name: the CRD applied, one operator process for this module
crd = test_operator.crd
operator = test_operator.operator

ROOT = Path(__file__).resolve().parents[1]
LAYERS, EXPERTS, NODES, GPUS = 2, 8, 2, 4  # small: accepted examples solve in well under 1 s
SPEEDS = [[1.0, 0.9, 1.1, 1.0], [0.95, 1.05, 1.0, 0.8]]
DELETE = object()  # a mutation that removes the field
QUIET_S = 15  # the steady-state window in which nothing may be written or solved
READABLE = re.compile(r"spec(\.[A-Za-z]+)*: (Invalid|Unsupported|Required|Too long|Too many)")


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    yield from fresh_namespace(cluster, "moed-bi-", delete_timeout_s=90)


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[str]:
    name = f"bi{uuid.uuid4().hex[:6]}"
    cluster.make_nodes(NODES, GPUS, speeds=SPEEDS, pool=name, prefix=name)
    yield name
    cluster.delete_nodes(pool=name)


def load_csv(layers: int = LAYERS, experts: int = EXPERTS) -> str:
    rows = "".join(
        f"{layer},{e},{100 + 37 * ((layer * 7 + e * 3) % 11)}\n"
        for layer in range(1, layers + 1)
        for e in range(experts)
    )
    return "moe_layer_index,expert_id,count\n" + rows


def manifest(name: str, namespace: str, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "moeplace.io/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {
                "name": "tiny",
                "moeLayers": LAYERS,
                "expertsPerLayer": EXPERTS,
                "topK": 2,
                "denseLayersBefore": 0,
                "hiddenLayers": LAYERS,
            },
            "gpus": {"nodeSelector": {"gpu.moeplace.io/pool": pool}, "nodeCount": NODES,
                     "gpusPerNode": GPUS},
            "placement": {"strategy": "greedy", "timeLimitSeconds": 2},
            "load": {"static": {"configMapName": "routing"}},
            "rollout": {"minImprovementPercent": 5, "cooldown": "0s"},
            "reconcileIntervalSeconds": 5,
        },
    }  # fmt: skip


def create(cluster: Cluster, obj: dict[str, Any]) -> tuple[bool, str]:
    done = cluster.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)
    return done.returncode == 0, done.stderr.strip()


def settled(cluster: Cluster, name: str, namespace: str, timeout: float = 120) -> dict[str, Any]:
    """The object once the operator has reported on its current generation."""

    def check() -> dict[str, Any] | None:
        obj = get(cluster, "moed", name, namespace)
        status = (obj or {}).get("status") or {}
        current = obj and status.get("observedGeneration") == obj["metadata"]["generation"]
        return obj if current and condition(obj, "Ready") else None

    return wait_for(f"{name} reconciled", check, timeout=timeout, every=0.3)


def wait_reason(
    cluster: Cluster, name: str, namespace: str, kind: str, reason: str, timeout: float = 120
) -> tuple[dict[str, Any], float]:
    """(the object, seconds) once condition ``kind`` is True with ``reason``."""
    started = time.monotonic()

    def check() -> dict[str, Any] | None:
        obj = get(cluster, "moed", name, namespace)
        c = condition(obj, kind)
        return obj if c.get("status") == "True" and c.get("reason") == reason else None

    obj = wait_for(f"{name} {kind} {reason}", check, timeout=timeout, every=0.3)
    return obj, time.monotonic() - started


def placement_version(cluster: Cluster, namespace: str, name: str) -> tuple[str, str] | None:
    cm = get(cluster, "configmap", f"{name}-placement", namespace)
    if cm is None:
        return None
    parse_canonical(cm["data"]["placement.json"])  # never half-written
    return cm["data"]["hash"], cm["data"]["version"]


# --- strategies from the CRD's openAPIV3Schema --------------------------------------------


def spec_schema() -> dict[str, Any]:
    crd_doc = yaml.safe_load((ROOT / "crds/moedeployment.yaml").read_text())
    root = crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return dict(root["properties"]["spec"])


def leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the fields that hold values (maps such as nodeSelector count as one)."""
    found: list[tuple[str, ...]] = []
    for key, sub in (schema.get("properties") or {}).items():
        found += leaves(sub, (*path, key)) if "properties" in sub else [(*path, key)]
    return found


def at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        schema = schema["properties"][key]
    return schema


def numbers(schema: dict[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    """Inside the bounds, on them, just past them, and a number sent as a string."""
    low, high = schema.get("minimum"), schema.get("maximum")
    step = 1 if integer else 0.5
    edges = [v for v in (low, high) if v is not None]
    edges += [low - step] if low is not None else [-(2**63)]
    edges += [high + step] if high is not None else [2**63, 1e300]
    inside = (
        st.integers(low if low is not None else -(2**40), high if high is not None else 2**40)
        if integer
        else st.floats(low if low is not None else -1e12, high if high is not None else 1e12)
    )
    return st.sampled_from(edges) | inside | st.just("7")


def strings(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    longest = schema.get("maxLength", 64)
    options: list[st.SearchStrategy[Any]] = [st.text(max_size=8), st.just(""), st.just(3)]
    if "pattern" in schema:
        matching = st.from_regex(schema["pattern"], fullmatch=True)
        options += [matching.filter(lambda s: len(s) <= longest)] * 3
    if "maxLength" in schema:
        options.append(st.just("a" * (longest + 1)))
    return st.one_of(options)


def values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values for one field, valid and not, derived from its schema."""
    if "enum" in schema:
        return st.sampled_from([*schema["enum"], "Bogus"])
    kind = schema.get("type")
    if kind in ("integer", "number"):
        return numbers(schema, kind == "integer")
    if kind == "string":
        return strings(schema)
    if kind == "object":  # a map: nodeSelector
        return st.dictionaries(
            st.sampled_from(["gpu.moeplace.io/pool", "x", ""]), st.text(max_size=6)
        )
    return st.none()


def mutated(base: dict[str, Any], changes: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    obj = json.loads(json.dumps(base))
    for path, value in changes:
        node = obj["spec"]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return obj


def changes(schema: dict[str, Any]) -> st.SearchStrategy[list[tuple[tuple[str, ...], Any]]]:
    """One or two fields of the valid manifest replaced by schema-derived values (or removed)."""
    paths = leaves(schema)

    @st.composite
    def draw(data: st.DrawFn) -> list[tuple[tuple[str, ...], Any]]:
        chosen = data(st.lists(st.sampled_from(paths), min_size=1, max_size=2, unique=True))
        return [(p, data(values(at(schema, p)) | st.just(DELETE))) for p in chosen]

    return draw()


# --- 1. property-based specs ---------------------------------------------------------------


def test_schema_derived_specs_are_refused_readably_or_reconciled_without_a_hot_loop(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, load_csv())
    schema = spec_schema()
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    unreadable: list[str] = []
    accepted: list[str] = []
    numbers_ = itertools.count()
    started = time.monotonic()

    @settings(
        max_examples=56,  # + 4 explicit: 60
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example costs seconds
        suppress_health_check=list(HealthCheck),
    )
    @given(changes(schema))
    # explicit: one of each outcome whatever the draws (they change with the schema)
    @example([(("load", "static", "configMapName"), "absent")])  # LoadConfigMapMissing
    @example([(("gpus", "gpusPerNode"), 2)])  # GPUCountMismatch: the nodes have 4
    @example([(("placement", "strategy"), "cpsat")])
    @example([(("model", "topK"), 0)])
    def one(change: list[tuple[tuple[str, ...], Any]]) -> None:
        name = f"bi-{next(numbers_)}"
        ok, refusal = create(cluster, mutated(manifest(name, namespace, pool), change))
        if not ok:
            outcomes["refused_by_schema"] += 1
            if not READABLE.search(refusal) and "must" not in refusal:
                unreadable.append(refusal)
            return
        accepted.append(name)
        obj = settled(cluster, name, namespace)
        ready, degraded = condition(obj, "Ready"), condition(obj, "Degraded")
        if ready["status"] == "True":
            outcomes["reconciled_ok"] += 1
            assert placement_version(cluster, namespace, name) or ready["reason"] == (
                "ProposalPublished"
            )
            return
        assert degraded.get("status") == "True", (change, obj["status"])
        assert degraded["reason"] and degraded["message"], degraded
        outcomes["degraded"] += 1
        reasons[degraded["reason"]] += 1

    one()
    generated_s = time.monotonic() - started
    # steady state: over QUIET_S seconds (3 reconcile intervals) nothing is written or solved
    before = versions(cluster, namespace)
    solves_before = solves(operator)
    time.sleep(QUIET_S)
    writes = sum(before[n] != v for n, v in versions(cluster, namespace).items())
    solved = solves(operator) - solves_before
    total = sum(outcomes.values())
    print(
        f"BADINPUT examples={total} refused_by_schema={outcomes['refused_by_schema']} "
        f"reconciled_ok={outcomes['reconciled_ok']} degraded={outcomes['degraded']} "
        f"({dict(reasons)}) in {generated_s:.0f} s; steady {QUIET_S} s: status writes={writes} "
        f"solves={solved:g}"
    )
    assert total >= 50 and not unreadable, unreadable[:3]
    assert outcomes["refused_by_schema"] and outcomes["reconciled_ok"] and outcomes["degraded"]
    assert "InvalidSpec" not in reasons  # what the API server admits, the operator reads
    assert writes == 0 and solved == 0
    assert operator.proc is not None and operator.proc.poll() is None  # never crashed
    assert "Traceback" not in operator.log.read_text(errors="replace")


def versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    listed = json.loads(cluster.kubectl("get", "moed", "-n", namespace, "-o", "json").stdout)
    return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in listed["items"]}


def solves(process: OperatorProcess) -> float:
    found = re.findall(r"^moeplace_solves_total\{[^}]*\} (\S+)$", process.metrics(), re.M)
    return sum(float(v) for v in found)


# --- 2. garbage node labels and annotations -------------------------------------------------


def patch(cluster: Cluster, name: str, namespace: str, change: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch", "moed", name, "-n", namespace, "--type=merge", "-p", json.dumps(change)
    )


def label(cluster: Cluster, node: str, key: str, value: str | None) -> None:
    change = f"{key}-" if value is None else f"{key}={value}"
    cluster.kubectl("label", "node", node, change, "--overwrite")


def test_garbage_node_facts_degrade_and_keep_the_last_placement(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    put_load(cluster, namespace, load_csv())
    create(cluster, manifest("nodes", namespace, pool))
    settled(cluster, "nodes", namespace)
    good = placement_version(cluster, namespace, "nodes")
    assert good is not None
    node, speed = f"{pool}-1", "gpu.moeplace.io/speed-1"
    times: dict[str, float] = {}
    for value in ["inf", "1e300", "NaN", "0", "fast", ""]:
        label(cluster, node, speed, value)
        obj, times[value or "''"] = wait_reason(
            cluster, "nodes", namespace, "Degraded", "BadSpeedLabels"
        )
        message = condition(obj, "Degraded")["message"]
        assert f"{node} {speed}={value!r}" in message and f"keeping placement {good[0]}" in message
        assert condition(obj, "GPUsProfiled")["reason"] == "BadSpeedLabels"
        assert placement_version(cluster, namespace, "nodes") == good
        label(cluster, node, speed, str(SPEEDS[1][1]))
        wait_reason(cluster, "nodes", namespace, "Ready", "PlacementInService")
    curves = "gpu.moeplace.io/latency-curves"
    for broken in ["{not json", '{"0": {"tokens": [0, 64], "micros": [0, -5]}}']:
        cluster.kubectl("annotate", "node", node, f"{curves}={broken}", "--overwrite")
        obj, times[f"curves {broken[:9]}"] = wait_reason(
            cluster, "nodes", namespace, "Degraded", "BadLatencyCurves"
        )
        assert f"{node}: " in condition(obj, "Degraded")["message"]
        assert placement_version(cluster, namespace, "nodes") == good
    cluster.kubectl("annotate", "node", node, f"{curves}-")
    wait_reason(cluster, "nodes", namespace, "Ready", "PlacementInService")
    # the spec says 2 GPUs a node, the nodes' nvidia.com/gpu capacity says 4
    fewer = {"spec": {"gpus": {"gpusPerNode": 2}}}
    patch(cluster, "nodes", namespace, fewer)
    obj, times["gpusPerNode 2 on 4-GPU nodes"] = wait_reason(
        cluster, "nodes", namespace, "Degraded", "GPUCountMismatch"
    )
    assert "gpusPerNode is 2 but" in condition(obj, "Degraded")["message"]
    assert placement_version(cluster, namespace, "nodes") == good
    print(
        "BADINPUT nodes: seconds to the Degraded condition "
        + ", ".join(f"{k}={v:.1f}" for k, v in times.items())
    )
    assert max(times.values()) < 30


# --- 3. broken load CSVs and Pinned files ---------------------------------------------------


def test_broken_load_csv_and_pinned_file_degrade_and_keep_the_last_placement(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    good_csv = load_csv()
    put_load(cluster, namespace, good_csv)
    create(cluster, manifest("csv", namespace, pool))
    settled(cluster, "csv", namespace)
    good = placement_version(cluster, namespace, "csv")
    assert good is not None
    header, *rows = good_csv.splitlines()
    broken = {
        "NaN count": "\n".join([header, *rows[:-1], rows[-1].rsplit(",", 1)[0] + ",nan"]),
        "negative count": "\n".join([header, *rows[:-1], rows[-1].rsplit(",", 1)[0] + ",-4"]),
        "ragged row": "\n".join([header, *rows, "1,3"]),
        "wrong shape": "\n".join([header, *rows, f"{LAYERS + 1},0,5"]),
        "layer missing": "\n".join([header, *rows[:EXPERTS]]),
        "duplicate row": "\n".join([header, *rows, rows[0]]),
        "empty": "",
    }
    times: dict[str, float] = {}
    for what, text in broken.items():
        put_load(cluster, namespace, text)
        obj, times[what] = wait_reason(cluster, "csv", namespace, "Degraded", "BadLoadCSV")
        assert condition(obj, "MetricsAvailable")["reason"] == "BadLoadCSV"
        assert placement_version(cluster, namespace, "csv") == good
        put_load(cluster, namespace, good_csv)
        wait_reason(cluster, "csv", namespace, "Ready", "PlacementInService")
    # a Pinned file from git with an id beyond int32: refused, not an out-of-memory kill
    pinned = get(cluster, "configmap", "csv-placement", namespace)
    assert pinned is not None
    text = re.sub(r'"phy2log":\[\[\d+', f'"phy2log":[[{10**30}', pinned["data"]["placement.json"])
    meta = {"name": "git", "namespace": namespace}
    git = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"placement.json": text},
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(git))
    to_pinned = {"spec": {"rollout": {"mode": "Pinned", "pinned": {"configMapName": "git"}}}}
    patch(cluster, "csv", namespace, to_pinned)
    obj, times["pinned phy2log 1e30"] = wait_reason(
        cluster, "csv", namespace, "Degraded", "PinnedInvalid"
    )
    assert "phy2log entries must be expert ids" in condition(obj, "Degraded")["message"]
    assert placement_version(cluster, namespace, "csv") == good
    print(
        "BADINPUT files: seconds to the Degraded condition "
        + ", ".join(f"{k}={v:.1f}" for k, v in times.items())
    )
    assert max(times.values()) < 30
    assert operator.proc is not None and operator.proc.poll() is None


# --- 4. placement ConfigMaps the API server would refuse ------------------------------------


def test_placement_configmap_too_large_or_invalid_is_reported(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pool: str
) -> None:
    # 2 MoE layers x 512 experts in a 1024-layer model: SGLang's map alone is ~2 MB
    put_load(cluster, namespace, load_csv(experts=512))
    big = manifest("big", namespace, pool)
    big["spec"]["model"] |= {"expertsPerLayer": 512, "hiddenLayers": 1024}
    assert create(cluster, big)[0]
    obj, too_large_s = wait_reason(cluster, "big", namespace, "Degraded", "PlacementTooLarge")
    assert "over the 1048576-byte limit" in condition(obj, "Degraded")["message"]
    assert condition(obj, "RolledOut")["reason"] == "PlacementTooLarge"
    assert get(cluster, "configmap", "big-placement", namespace) is None
    # a name too long for the ConfigMaps' owner label: refused at admission, not reconciled
    refused, why = create(cluster, manifest("n" * 70, namespace, pool))
    assert not refused
    assert "metadata.name must be at most 63 characters" in why, why
    # a ConfigMap the API server refuses as invalid: a cluster admission policy says no
    put_load(cluster, namespace, load_csv())
    with placements_refused_by_policy(cluster, namespace, owner="frozen"):
        assert create(cluster, manifest("frozen", namespace, pool))[0]
        obj, invalid_s = wait_reason(cluster, "frozen", namespace, "Degraded", "ConfigMapInvalid")
    message = condition(obj, "Degraded")["message"]
    assert "frozen by cluster policy" in message, message
    assert get(cluster, "configmap", "frozen-placement", namespace) is None
    print(
        f"BADINPUT configmaps: PlacementTooLarge in {too_large_s:.1f} s, ConfigMapInvalid "
        f"(422 from an admission policy) in {invalid_s:.1f} s; a 70-character name refused "
        "at admission"
    )
    assert operator.proc is not None and operator.proc.poll() is None


@contextmanager
def placements_refused_by_policy(cluster: Cluster, namespace: str, owner: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy (reason Invalid: HTTP 422) refusing the placement ConfigMaps
    of MoEDeployment ``owner`` in ``namespace``; in force when this enters, removed on exit."""
    name = f"refuse-{namespace}"
    label = f"object.metadata.labels[{OWNER_LABEL!r}]"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["configmaps"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": f"!has(object.metadata.labels) || "
                    f"!({OWNER_LABEL!r} in object.metadata.labels) || {label} != {owner!r}",
                    "message": f"placements of {owner} are frozen by cluster policy",
                    "reason": "Invalid",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    probe = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "generateName": "probe-",
            "namespace": namespace,
            "labels": {OWNER_LABEL: owner},
        },
    }
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy, binding]}),
    )
    try:
        # the API server loads a new policy within seconds: wait until it refuses a probe
        wait_for(
            "the admission policy in force",
            lambda: not create(cluster, probe)[0] or None,
            timeout=60,
            every=0.5,
        )
        yield
    finally:
        cluster.kubectl(
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            name,
            "--ignore-not-found",
            "--wait=false",
        )
