"""The daemon's nudgeable sleep."""

import asyncio
import time

import pytest
from moeplace_operator.events import EventDedup
from moeplace_operator.handlers import Nudges


def test_nudge_ends_the_sleep_early_and_is_consumed() -> None:
    async def scenario() -> tuple[float, float]:
        nudges = Nudges()
        key = ("ns", "a")
        nudges.event(key)
        asyncio.get_running_loop().call_later(0.05, nudges.nudge_all)
        start = time.monotonic()
        await nudges.sleep(key, 5.0)
        nudged = time.monotonic() - start
        start = time.monotonic()
        await nudges.sleep(key, 0.1)  # the nudge was consumed: a full (short) sleep
        return nudged, time.monotonic() - start

    nudged, full = asyncio.run(scenario())
    assert nudged < 1.0 and full >= 0.09


def test_forget_drops_the_event() -> None:
    nudges = Nudges()
    nudges.nudge(("ns", "a"))
    nudges.forget(("ns", "a"))
    nudges.nudge_all()  # nothing registered: no error


def test_nudging_handlers_run_on_the_event_loop() -> None:
    """kopf runs sync handlers in worker threads; an asyncio.Event is set only from its loop."""
    import kopf
    from moeplace_operator import handlers

    assert asyncio.iscoroutinefunction(handlers.nudge)
    assert asyncio.iscoroutinefunction(handlers.node_changed)

    async def scenario() -> float:
        memo = kopf.Memo(nudges=Nudges(), known_nodes={})
        memo.nudges.event(("ns", "a"))
        start = time.monotonic()
        sleeper = asyncio.create_task(memo.nudges.sleep(("ns", "a"), 5.0))
        await asyncio.sleep(0.01)
        await handlers.node_changed(
            name="n1", labels={}, annotations={}, type="ADDED", memo=memo, spec={}, status={}
        )  # no GPU labels, not known before: no nudge
        await handlers.nudge(namespace="ns", name="a", memo=memo)
        await sleeper
        return time.monotonic() - start

    assert asyncio.run(scenario()) < 1.0


def test_transient_api_fault_keeps_the_daemon_and_its_plans(monkeypatch: object) -> None:
    import logging

    import kopf
    from moeplace_operator import handlers
    from moeplace_operator.kube import TransientApiError, _call
    from urllib3.exceptions import MaxRetryError, ProtocolError

    for fault in (MaxRetryError(None, "/api", "connection refused"), ProtocolError("reset")):

        def fail(fault: Exception = fault) -> None:
            raise fault

        with pytest.raises(TransientApiError):
            _call(fail)

    async def run(self: object) -> None:
        raise TransientApiError("503 Service Unavailable")

    monkeypatch.setattr(handlers.Reconcile, "run", run)
    memo = kopf.Memo(runtime=object(), events=EventDedup())
    body = kopf.Body({"metadata": {"namespace": "ns", "name": "a"}, "spec": {}})
    done = asyncio.run(handlers.reconcile_once(memo, body, {}, logging.getLogger("t")))
    assert done is False  # retried by the same daemon after RETRY_DELAY_S, caches kept


def _samples(gauge: object) -> list[object]:
    return [s for family in gauge.collect() for s in family.samples]  # type: ignore[attr-defined]


def test_a_deleted_deployment_leaves_no_gauge_cache_or_event_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon ends when its MoEDeployment is deleted; its ``finally`` must drop every
    per-object gauge (all of them: a gauge added later without being forgotten fails here),
    the cached plan and transitions, the Event memory and the nudge event of that object, and
    nothing of another object."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import kopf
    from moeplace_operator import handlers, metrics
    from moeplace_operator.leader import Leadership
    from moeplace_operator.runtime import CachedTransitions, Runtime
    from prometheus_client import Gauge

    per_object = [
        g
        for g in vars(metrics).values()
        if isinstance(g, Gauge) and g._labelnames == ("namespace", "name")
    ]
    assert len(per_object) >= 4
    passes: list[str] = []

    async def one_pass(self: handlers.Reconcile) -> None:  # what a real pass leaves behind
        for owner in (self.name, "other"):
            for gauge in per_object:
                gauge.labels(self.namespace, owner).set(1.0)
            self.events.remember(f"{self.namespace}/{owner}", "CooldownActive", "h")
            self.runtime.plans[f"{self.namespace}/{owner}"] = ("f", None, self.now)  # type: ignore[assignment]
            self.runtime.transitions[f"{self.namespace}/{owner}"] = CachedTransitions(
                "s",
                self.now,
                None,  # type: ignore[arg-type]
            )
        passes.append(self.name)

    class StoppedAfterOnePass:
        def __bool__(self) -> bool:  # the object was deleted during the first pass
            return bool(passes)

        async def wait(self) -> None:  # never wakes the daemon: its loop ends by the bool
            await asyncio.Event().wait()

    monkeypatch.setattr(handlers.Reconcile, "run", one_pass)
    runtime = Runtime(object(), ThreadPoolExecutor(1), solver_threads=1)  # type: ignore[arg-type]
    events = EventDedup()
    nudges = handlers.Nudges()
    leadership = Leadership.start("")  # no election: this one leads
    memo = kopf.Memo(runtime=runtime, events=events, nudges=nudges, leadership=leadership)
    body = kopf.Body(
        {"metadata": {"namespace": "ns", "name": "gone"}, "spec": {"reconcileIntervalSeconds": 0}}
    )
    asyncio.run(
        handlers.reconciler(
            body=body,
            namespace="ns",
            name="gone",
            stopped=StoppedAfterOnePass(),  # type: ignore[arg-type]
            memo=memo,
            logger=logging.getLogger("t"),
            gpu_node_index={},
        )
    )

    assert passes == ["gone"]
    for gauge in per_object:
        owners = {s.labels["name"] for s in _samples(gauge) if s.labels.get("namespace") == "ns"}
        assert "gone" not in owners and "other" in owners, gauge
    assert not events.seen("ns/gone", "CooldownActive", "h")
    assert events.seen("ns/other", "CooldownActive", "h")
    assert set(runtime.plans) == set(runtime.transitions) == {"ns/other"}
    assert ("ns", "gone") not in nudges._events
    for gauge in per_object:
        gauge.remove("ns", "other")  # other tests read these gauges
