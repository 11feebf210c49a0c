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
        memo = kopf.Memo(nudges=Nudges(), node_fingerprints={})
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


def test_forget_object_drops_its_gauges_and_event_memory_only() -> None:
    from types import SimpleNamespace

    import kopf
    from moeplace_operator import handlers, metrics

    forgotten: list[str] = []
    events = EventDedup()
    for key, topic, signature in [
        ("ns/a", "SpeedDrift", "x"),
        ("ns/ab", "SpeedDrift", "y"),
        ("ns/a", "CooldownActive", "z"),
    ]:
        events.remember(key, topic, signature)
    memo = kopf.Memo(runtime=SimpleNamespace(forget=forgotten.append), events=events)
    metrics.PREDICTED_GAIN.labels("ns", "a").set(4.0)
    metrics.PREDICTED_GAIN.labels("ns", "ab").set(2.0)
    metrics.SPEED_DRIFT.labels("ns", "a").set(-12.0)
    handlers.forget_object(memo, "ns", "a")
    assert forgotten == ["ns/a"]
    assert not events.seen("ns/a", "SpeedDrift", "x")
    assert not events.seen("ns/a", "CooldownActive", "z")
    assert events.seen("ns/ab", "SpeedDrift", "y")  # a name sharing the prefix stays
    names = {(s.labels["namespace"], s.labels["name"]) for s in _samples(metrics.PREDICTED_GAIN)}
    assert ("ns", "a") not in names and ("ns", "ab") in names
    assert ("ns", "a") not in {
        (s.labels["namespace"], s.labels["name"]) for s in _samples(metrics.SPEED_DRIFT)
    }


def _samples(gauge: object) -> list[object]:
    return [s for family in gauge.collect() for s in family.samples]  # type: ignore[attr-defined]
