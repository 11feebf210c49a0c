"""What keeps many objects cheap (issue 13, scale): a plan stands while the load stays within
tolerance, a solve stops when its pass no longer matters, and API requests are counted."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
import numpy as np
import pytest
from moeplace_operator import decide
from moeplace_operator.events import EventDedup
from moeplace_operator.kube import CountingApiClient, request_resource
from moeplace_operator.loadsource import LoadData
from moeplace_operator.nodes import NodeGPUs, build_gpu_group, node_gpus
from moeplace_operator.planning import load_holds
from moeplace_operator.runtime import Context, Live, Runtime, SupersededError
from moeplace_operator.spec import MoEDeploymentSpec
from prometheus_client import REGISTRY

pytestmark = pytest.mark.scale

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def jittered(load: np.ndarray, relative: float, seed: int) -> np.ndarray:
    return load * (1 + np.random.default_rng(seed).uniform(-relative, relative, load.shape))


def test_load_holds_within_the_tolerances_only() -> None:
    load = np.random.default_rng(1).uniform(500, 1500, (4, 16))
    solved = LoadData(load, None, "w")
    # 0.5 % noise per expert moves a ~6 % share by ~0.03 percentage point: holds
    assert load_holds(solved, LoadData(jittered(load, 0.005, 2), None, "w"))
    assert load_holds(solved, LoadData(load * 1.04, None, "w"))  # same shares, 4 % more tokens
    assert not load_holds(solved, LoadData(load * 1.06, None, "w"))  # 6 % more tokens
    shifted = load.copy()
    shifted[2, 3] += 0.004 * load[2].sum()  # ~0.4 percentage point more for one expert
    assert not load_holds(solved, LoadData(shifted, None, "w"))
    assert not load_holds(solved, LoadData(load[:3], None, "w"))  # another shape
    samples = np.stack([load, load])
    assert not load_holds(solved, LoadData(load, samples, "w"))  # hedged now, not before
    transitions = np.stack([np.diag(row) for row in load[:3]])
    with_transitions = LoadData(load, None, "w", transitions)
    assert not load_holds(solved, with_transitions)
    moved = transitions.copy()
    moved[0, 0, 1] = 0.01 * transitions[0].sum()  # 1 % of layer 0's tokens change GPU
    assert not load_holds(with_transitions, LoadData(load, None, "w", moved))
    assert load_holds(with_transitions, LoadData(load * 1.01, None, "w", transitions * 1.01))


def moed_spec(time_limit: int = 60) -> dict[str, Any]:
    """4 layers x 64 experts on 16 GPUs, hedged over 8 samples: a 60 s limit is used in full."""
    return {
        "model": {
            "name": "m",
            "moeLayers": 4,
            "expertsPerLayer": 64,
            "topK": 2,
            "denseLayersBefore": 0,
            "hiddenLayers": 4,
        },
        "gpus": {"nodeSelector": {"pool": "a"}, "nodeCount": 4, "gpusPerNode": 4},
        "placement": {
            "strategy": "cpsat",
            "timeLimitSeconds": time_limit,
            "redundantExperts": 16,
        },
        "load": {"static": {"configMapName": "load"}},
    }


def pool_nodes(speed: str = "1.0") -> list[NodeGPUs]:
    return [
        node_gpus(
            f"n{n}", {"pool": "a", **{f"gpu.moeplace.io/speed-{i}": speed for i in range(4)}}, {}
        )
        for n in range(4)
    ]


def hard_load() -> LoadData:
    rng = np.random.default_rng(17)
    samples = np.floor(rng.pareto(1.3, (8, 4, 64)) * 60) + 1
    return LoadData(samples.mean(0), samples, "test")


class Pass:
    """A pass's context over a live body and node list the test changes meanwhile."""

    def __init__(self, stopping: Callable[[], bool] = lambda: False) -> None:
        self.body = kopf.Body(
            {"metadata": {"namespace": "ns", "name": "big", "generation": 1}, "spec": moed_spec()}
        )
        self.nodes = pool_nodes()
        self.nodes_version = 0
        self.pool = ThreadPoolExecutor(1)
        self.runtime = Runtime(object(), self.pool, solver_threads=1)  # type: ignore[arg-type]
        self.ctx = Context(
            self.runtime,
            self.body,
            self.nodes,
            logging.getLogger("t"),
            EventDedup(),
            NOW,
            live_nodes=lambda: self.nodes,
            live=Live(stopping, lambda: self.nodes_version),
        )
        self.spec = MoEDeploymentSpec.model_validate(self.body["spec"])
        self.group = build_gpu_group(self.nodes, self.spec.gpus)

    async def plan(self, load: LoadData) -> Any:
        return await decide.plan_for(self.ctx, self.spec, self.group, load, None)

    def pool_is_free(self) -> bool:
        return self.pool.submit(lambda: True).result(timeout=5.0)


def superseded_after(change: Callable[[Pass], None], stopping: bool = False) -> str:
    """Start a 60 s solve, apply ``change`` 0.5 s in; the reason it stopped (the solver
    thread is free again by then)."""
    flag = threading.Event()
    run = Pass(stopping=flag.is_set)

    async def scenario() -> str:
        task = asyncio.create_task(run.plan(hard_load()))
        await asyncio.sleep(0.5)
        if stopping:
            flag.set()
        change(run)
        with pytest.raises(SupersededError) as error:
            await task
        return str(error.value)

    reason = asyncio.run(scenario())
    assert run.pool_is_free()
    return reason


def test_a_new_generation_stops_the_solve_and_frees_its_thread() -> None:
    def bump(run: Pass) -> None:
        run.body["metadata"]["generation"] = 2

    started = time.monotonic()
    reason = superseded_after(bump)
    assert "spec changed" in reason and "generation 2" in reason
    assert time.monotonic() - started < 10.0  # not the 60 s time limit


def test_another_ep_group_stops_the_solve_a_heartbeat_does_not() -> None:
    def slower_node(run: Pass) -> None:
        run.nodes = [*pool_nodes("0.8")[:1], *run.nodes[1:]]
        run.nodes_version += 1

    started = time.monotonic()
    reason = superseded_after(slower_node)
    assert "EP group changed" in reason
    assert time.monotonic() - started < 10.0
    run = Pass()
    run.ctx.runtime.plans.clear()

    async def same_group() -> bool:
        run.spec = MoEDeploymentSpec.model_validate(moed_spec(time_limit=2))
        task = asyncio.create_task(run.plan(hard_load()))
        await asyncio.sleep(0.5)
        run.nodes = pool_nodes()  # the same facts again: no change of group
        run.nodes_version += 1
        await task
        return True

    assert asyncio.run(same_group())


def test_a_stopping_daemon_or_a_cancelled_pass_stops_the_solve() -> None:
    started = time.monotonic()
    reason = superseded_after(lambda run: None, stopping=True)
    assert "deleted or the operator stops" in reason
    assert time.monotonic() - started < 10.0
    run = Pass()

    async def cancelled() -> None:
        task = asyncio.create_task(run.plan(hard_load()))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(cancelled())
    assert run.pool_is_free()
    assert time.monotonic() - started < 10.0


def test_a_plan_stands_while_the_load_holds() -> None:
    run = Pass()
    run.spec = MoEDeploymentSpec.model_validate(moed_spec(time_limit=1))
    solves: list[int] = []
    solve = run.runtime.solve

    async def counted(*args: Any) -> Any:
        solves.append(1)
        return await solve(*args)

    run.runtime.solve = counted  # type: ignore[method-assign]
    load = hard_load()

    async def scenario() -> list[datetime]:
        first = await run.plan(load)
        run.ctx.now = NOW.replace(minute=5)
        noisy = LoadData(jittered(load.load, 0.002, 3), load.samples, "test")
        second = await run.plan(noisy)
        run.ctx.now = NOW.replace(minute=10)
        doubled = LoadData(load.load * 2, load.samples, "test")
        third = await run.plan(doubled)
        return [first[1], second[1], third[1]]

    solved_at = asyncio.run(scenario())
    assert len(solves) == 2
    assert solved_at == [NOW, NOW, NOW.replace(minute=10)]


def test_api_requests_are_counted_by_verb_and_resource() -> None:
    assert request_resource("https://h:6443/api/v1/namespaces/n/configmaps/c") == "configmaps"
    assert request_resource("https://h/api/v1/nodes/n1") == "nodes"
    assert (
        request_resource("https://h/apis/moeplace.io/v1alpha1/namespaces/n/moedeployments/x/status")
        == "moedeployments/status"
    )
    assert (
        request_resource("https://h/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x")
        == "customresourcedefinitions"
    )
    client = CountingApiClient()

    class Answer:
        def request(self, *args: Any, **kwargs: Any) -> str:
            return "ok"

    client.rest_client = Answer()
    labels = {"verb": "patch", "resource": "moedeployments/status"}
    before = REGISTRY.get_sample_value("moeplace_kube_requests_total", labels) or 0.0
    url = "https://h/apis/moeplace.io/v1alpha1/namespaces/n/moedeployments/x/status"
    assert client.call_api("PATCH", url) == "ok"
    assert client.call_api("PATCH", url) == "ok"
    after = REGISTRY.get_sample_value("moeplace_kube_requests_total", labels)
    assert after == before + 2


def test_status_is_not_rewritten_while_the_body_lags_behind_the_last_write() -> None:
    """Under load kopf's body shows a status write seconds late: passes in between must merge
    onto what was written (same lastTransitionTime) and send nothing."""
    from moeplace_operator import act
    from moeplace_operator.spec import ConditionType
    from moeplace_operator.status import true

    patches: list[dict[str, Any]] = []

    class Kube:
        def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
            patches.append(patch)

    runtime = Runtime(Kube(), ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    body = kopf.Body({"metadata": {"namespace": "ns", "name": "a", "generation": 1}, "spec": {}})
    ready = [true(ConditionType.READY, "PlacementInService", "placement h v1")]

    async def one_pass(minute: int) -> None:
        ctx = Context(
            runtime, body, [], logging.getLogger("t"), EventDedup(), NOW.replace(minute=minute)
        )
        await act.write_status(ctx, act.last_status(ctx), 1, ready, None)

    for minute in (0, 1, 2):  # the body never shows the first write
        asyncio.run(one_pass(minute))
    assert len(patches) == 1
    written = patches[0]["status"]["conditions"][0]
    assert written["lastTransitionTime"] == "2026-12-03T12:00:00Z"
    runtime.forget("ns/a")  # deleted, or another operator process: the body is the truth
    asyncio.run(one_pass(3))
    assert len(patches) == 2


def test_a_node_change_nudges_only_the_objects_it_can_affect() -> None:
    """1,000 new Nodes change two or three times each: only objects whose nodeSelector
    matches the Node's old or new labels wake up; one whose selector is unreadable does."""
    from moeplace_operator import handlers

    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    speed = {"gpu.moeplace.io/speed-0": "1.0"}

    async def scenario() -> list[set[str]]:
        nudges = handlers.Nudges()
        memo = kopf.Memo(nudges=nudges, known_nodes={})
        bodies = {
            name: {"spec": {"gpus": {"nodeSelector": {"pool": name[0]}}}}
            for name in ("a1", "a2", "b1", "c1")
        }
        bodies["broken"] = {"spec": {"gpus": "no selector"}}
        for name, body in bodies.items():
            nudges.event(("ns", name))
            nudges.watch(("ns", name), lambda body=body: handlers.node_selector(body))
        woken: list[set[str]] = []

        async def change(labels: dict[str, str], type: str = "MODIFIED", **node: Any) -> None:
            for name in bodies:
                nudges.event(("ns", name)).clear()
            await handlers.node_changed(
                name="n1",
                labels={**labels, **speed},
                annotations={},
                type=type,
                memo=memo,
                spec=node.get("spec", {}),
                status=node.get("status", ready),
            )
            woken.append({name for name in bodies if nudges.event(("ns", name)).is_set()})

        await change({"pool": "a"}, type="ADDED")  # joins pool a
        await change({"pool": "a", "beta.kubernetes.io/os": "linux"})  # no selector reads it
        await change({"pool": "a", "beta.kubernetes.io/os": "linux"}, status={})  # NotReady
        await change({"pool": "b"})  # relabelled a -> b
        await change({"pool": "b"}, type="DELETED")
        return woken

    woken = asyncio.run(scenario())
    assert woken == [
        {"a1", "a2", "broken"},
        {"broken"},  # a label no selector reads: only the unreadable one
        {"a1", "a2", "broken"},
        {"a1", "a2", "b1", "broken"},
        {"b1", "broken"},
    ]
