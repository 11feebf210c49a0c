"""Leader election over a Lease, against a small fake of the Lease API that keeps
resourceVersions as the API server does (a stale replace is a 409)."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from moeplace_operator.leader import LeaderElection, Leadership, LeaseTiming

pytestmark = pytest.mark.faults

NAMESPACE, NAME = "ops", "moeplace-leader"


class FakeLeases:
    """One Lease, as CoordinationV1Api reads, creates and replaces it."""

    def __init__(self) -> None:
        self.lease: client.V1Lease | None = None
        self.version = 0
        self.down = False  # every call fails as while the apiserver restarts
        self.broken = False  # every call fails with what no one expected

    def _check(self) -> None:
        if self.down:
            raise ApiException(status=503, reason="Service Unavailable")
        if self.broken:
            raise ValueError("a reply the client cannot decode")

    def read_namespaced_lease(self, name: str, namespace: str, **_: object) -> client.V1Lease:
        self._check()
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(
        self, namespace: str, body: client.V1Lease, **_: object
    ) -> client.V1Lease:
        self._check()
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._store(body)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: client.V1Lease, **_: Any
    ) -> client.V1Lease:
        self._check()
        assert self.lease is not None
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        return self._store(body)

    def _store(self, body: client.V1Lease) -> client.V1Lease:
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease.metadata.resource_version = str(self.version)
        return copy.deepcopy(self.lease)

    @property
    def holder(self) -> str:
        assert self.lease is not None and self.lease.spec is not None
        return str(self.lease.spec.holder_identity or "")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def candidate(api: FakeLeases, identity: str, clock: Clock) -> LeaderElection:
    return LeaderElection(api, NAMESPACE, NAME, identity, LeaseTiming(), clock)  # type: ignore[arg-type]


def test_the_first_candidate_creates_the_lease_and_the_second_follows() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = candidate(api, "a", clock), candidate(api, "b", clock)
    assert a.try_acquire_or_renew() and api.holder == "a"
    assert not b.try_acquire_or_renew()
    clock.now += 14  # a renews within the lease: b keeps following
    assert a.try_acquire_or_renew()
    clock.now += 14
    assert not b.try_acquire_or_renew() and api.holder == "a"


def test_a_silent_holder_is_taken_over_after_the_lease_duration_by_the_followers_clock() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = candidate(api, "a", clock), candidate(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b first sees the record now
    clock.now += 14.9
    assert not b.try_acquire_or_renew()
    clock.now += 0.2
    assert b.try_acquire_or_renew() and api.holder == "b"
    assert api.lease is not None and api.lease.spec.lease_transitions == 1
    clock.now += 1
    assert not a.try_acquire_or_renew()  # the old holder sees b's fresh record


def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = candidate(api, "a", clock), candidate(api, "b", clock)
    assert a.try_acquire_or_renew()
    a.leading.set()
    assert not b.try_acquire_or_renew()
    a.release()
    assert api.holder == "" and not a.leading.is_set()
    assert b.try_acquire_or_renew() and api.holder == "b"


def test_release_leaves_someone_elses_lease_alone() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = candidate(api, "a", clock), candidate(api, "b", clock)
    assert b.try_acquire_or_renew()
    a.leading.set()  # a believes it leads (it lost the Lease meanwhile)
    a.release()
    assert api.holder == "b"


def test_of_two_racing_candidates_one_wins() -> None:
    api, clock = FakeLeases(), Clock()
    gone, a, b = (candidate(api, name, clock) for name in ("gone", "a", "b"))
    assert gone.try_acquire_or_renew()
    assert not a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    clock.now += 16  # both see the holder expired; a writes between b's read and write
    replace = api.replace_namespaced_lease

    def a_first(*args: object, **kwargs: object) -> client.V1Lease:
        api.replace_namespaced_lease = replace  # type: ignore[method-assign]
        assert a.try_acquire_or_renew()
        return replace(*args, **kwargs)  # type: ignore[arg-type]

    api.replace_namespaced_lease = a_first  # type: ignore[method-assign]
    assert not b.try_acquire_or_renew()  # b's write carried the stale resourceVersion: 409
    assert api.holder == "a"


@pytest.mark.parametrize("fault", ["down", "broken"])
def test_a_leader_that_cannot_renew_steps_down_within_the_deadline_and_comes_back(
    fault: str,
) -> None:
    timing = LeaseTiming(lease_s=1.5, renew_deadline_s=0.6, retry_s=0.05)
    api = FakeLeases()
    election = LeaderElection(api, NAMESPACE, NAME, "a", timing)  # type: ignore[arg-type]

    async def scenario() -> tuple[float, float]:
        task = asyncio.create_task(election.run())
        await asyncio.wait_for(election.leading.wait(), 2)
        assert not election.following.is_set()
        setattr(api, fault, True)  # an apiserver over a frozen etcd, or a surprise
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(election.following.wait(), 5)
        stepped_down = loop.time() - started
        assert not election.leading.is_set()
        setattr(api, fault, False)  # the Lease still names it: taken back at the next try
        started = loop.time()
        await asyncio.wait_for(election.leading.wait(), 5)
        back = loop.time() - started
        task.cancel()
        return stepped_down, back

    stepped_down, back = asyncio.run(scenario())
    assert 0.5 < stepped_down < 1.5  # the deadline (0.6 s), before the lease (1.5 s) expired
    assert back < 0.5 and api.holder == "a"


class StopFlag:
    """kopf's DaemonStopped as the daemon uses it: falsy until stopped, ``wait()`` awaitable."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()


async def half_a_second(leadership: Leadership, passes: list[str]) -> None:
    await asyncio.sleep(0.5)


def run_daemon(
    leading: bool,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: Callable[[Leadership, list[str]], Awaitable[None]] = half_a_second,
    pass_s: float = 0.0,
) -> tuple[list[str], float]:
    """One MoEDeployment's daemon (reconcile interval 60 s, passes of ``pass_s``) stopped after
    ``meanwhile``: what its passes did ("started", then "a" or "cancelled") and how long it
    took to end once stopped."""
    from concurrent.futures import ThreadPoolExecutor

    import kopf
    from moeplace_operator import handlers
    from moeplace_operator.events import EventDedup
    from moeplace_operator.runtime import Runtime

    passes: list[str] = []

    async def one_pass(self: handlers.Reconcile) -> None:
        passes.append("started")
        try:
            await asyncio.sleep(pass_s)
        except asyncio.CancelledError:
            passes.append("cancelled")
            raise
        passes.append(self.name)

    monkeypatch.setattr(handlers.Reconcile, "run", one_pass)

    async def scenario() -> float:
        leadership = Leadership(asyncio.Event(), asyncio.Event())
        (leadership.leading if leading else leadership.following).set()
        memo = kopf.Memo(
            runtime=Runtime(object(), ThreadPoolExecutor(1), solver_threads=1),  # type: ignore[arg-type]
            events=EventDedup(),
            nudges=handlers.Nudges(),
            leadership=leadership,
        )
        body = kopf.Body(
            {"metadata": {"namespace": "ns", "name": "a"}, "spec": {"reconcileIntervalSeconds": 60}}
        )
        stopped = StopFlag()
        daemon = asyncio.create_task(
            handlers.reconciler(
                body=body,
                namespace="ns",
                name="a",
                stopped=stopped,  # type: ignore[arg-type]
                memo=memo,
                logger=logging.getLogger("t"),
                gpu_node_index={},
            )
        )
        await meanwhile(leadership, passes)
        stopped.event.set()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(daemon, 5)
        return loop.time() - started

    took = asyncio.run(scenario())
    return passes, took


def test_a_followers_daemon_never_reconciles_and_ends_when_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passes, took = run_daemon(False, monkeypatch)
    assert passes == [] and took < 1.0


def test_a_leaders_daemon_ends_when_stopped_not_after_its_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passes, took = run_daemon(True, monkeypatch)
    assert passes == ["started", "a"] and took < 1.0  # the Lease is released only after this


def test_a_pass_in_flight_stops_when_leadership_is_lost_and_resumes_when_regained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def step_down(leadership: Leadership) -> None:
        leadership.leading.clear()
        leadership.following.set()

    async def lose_regain_lose(leadership: Leadership, passes: list[str]) -> None:
        await asyncio.sleep(0.3)  # the first pass (30 s) is under way
        step_down(leadership)
        await asyncio.sleep(0.3)
        assert passes == ["started", "cancelled"]  # no new pass while following
        leadership.following.clear()
        leadership.leading.set()
        await asyncio.sleep(0.3)
        assert passes == ["started", "cancelled", "started"]  # at once, no retry delay
        step_down(leadership)
        await asyncio.sleep(0.1)

    passes, took = run_daemon(True, monkeypatch, lose_regain_lose, pass_s=30.0)
    assert passes == ["started", "cancelled", "started", "cancelled"] and took < 1.0


def test_the_lease_setting_is_namespace_slash_name_or_empty() -> None:
    from moeplace_operator.config import OperatorConfig
    from pydantic import ValidationError

    env = {"MOEPLACE_LEADER_ELECTION_LEASE": "ops/moeplace-leader"}
    assert OperatorConfig.from_env(env).leader_election_lease == "ops/moeplace-leader"
    assert OperatorConfig.from_env({}).leader_election_lease == ""
    for bad in ("moeplace-leader", "ops/", "/x", "Ops/x", "a/b/c"):
        with pytest.raises(ValidationError):
            OperatorConfig.from_env({"MOEPLACE_LEADER_ELECTION_LEASE": bad})
