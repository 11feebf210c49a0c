"""Leader election over one coordination.k8s.io Lease, so that two or more replicas can run
and exactly one reconciles. The rules are client-go's: the holder renews every ``retry_s``; a
follower takes the Lease over once its record (holder, renewTime) has not changed for
``lease_s`` by the follower's own clock (no clock comparison across machines), or at once
when it was released (holder empty); a leader that could not renew for ``renew_deadline_s``
(< ``lease_s``, so before anyone can take over) steps down: its pass in flight is cancelled
and it follows again (its caches kept, no restart), re-acquiring at once when the Lease
still names it after the outage. Writes go through the Lease's resourceVersion: of two
candidates one wins, the other gets a 409.

Why not kubernetes.leaderelection: it blocks threads, has no request timeouts and never
releases; why not kopf peering: it needs a cluster-wide peering CRD, pauses all replicas of
equal priority, and a paused kopf drops its watches (a cold takeover)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from moeplace_operator import metrics
from moeplace_operator.kube import ForbiddenError, MissingObjectError, TransientApiError, _call

logger = logging.getLogger(__name__)
# RBAC without the Lease (or create on a missing one) and API faults: tried again next round
LEASE_FAULTS = (TransientApiError, ForbiddenError, MissingObjectError, ApiException)


@dataclass(frozen=True)
class LeaseTiming:
    lease_s: float = 15.0  # a silent holder's Lease is taken over after this
    renew_deadline_s: float = 10.0  # a holder that could not renew this long stops leading
    retry_s: float = 2.0  # how often the holder renews and a follower tries

    @property
    def request_timeout_s(self) -> float:
        """One Lease call may not eat the renew deadline."""
        return self.renew_deadline_s / 4


class LeaderElection:
    """``leading`` is set while this replica holds the Lease ``namespace/name``, ``following``
    while it does not."""

    def __init__(
        self,
        api: client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.timing, self.clock = timing, clock
        self.leading, self.following = asyncio.Event(), asyncio.Event()
        self.following.set()
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._renewed_at = 0.0

    def try_acquire_or_renew(self) -> bool:
        """One round (blocking): True when this replica holds the Lease afterwards."""
        timeout = self.timing.request_timeout_s
        try:
            lease = _call(
                lambda: self.api.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=timeout
                )
            )
        except MissingObjectError:
            return self._create(timeout)
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        record = (holder, str(spec.renew_time))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.lease_duration_seconds or self.timing.lease_s)
        if holder not in ("", self.identity) and now - self._observed_at < duration:
            return False
        stamp = datetime.now(UTC)
        if holder != self.identity:
            spec.acquire_time = stamp
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = stamp
        spec.lease_duration_seconds = round(self.timing.lease_s)
        lease.spec = spec
        return self._write(
            lambda: self.api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=timeout
            ),
            now,
        )

    def _create(self, timeout: float) -> bool:
        """The Lease is missing (the chart creates it; a local run may not have)."""
        stamp = datetime.now(UTC)
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                acquire_time=stamp,
                renew_time=stamp,
                lease_duration_seconds=round(self.timing.lease_s),
                lease_transitions=0,
            ),
        )
        return self._write(
            lambda: self.api.create_namespaced_lease(
                self.namespace, lease, _request_timeout=timeout
            ),
            self.clock(),
        )

    def _write(self, write: Callable[[], object], now: float) -> bool:
        try:
            _call(write)
        except TransientApiError as error:  # a 409 included: another candidate won
            logger.info("Lease %s/%s not written: %s", self.namespace, self.name, error)
            return False
        self._observed, self._renewed_at = None, now
        return True

    def release(self) -> None:
        """Give the Lease up (blocking) so that a follower takes over at its next try: holder
        emptied, as client-go's ReleaseOnCancel does. Only when this replica holds it."""
        if not self.leading.is_set():
            return
        self._lead(False)
        timeout = self.timing.request_timeout_s
        try:
            lease = _call(
                lambda: self.api.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=timeout
                )
            )
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = ""
            _call(
                lambda: self.api.replace_namespaced_lease(
                    self.name, self.namespace, lease, _request_timeout=timeout
                )
            )
            logger.info("released Lease %s/%s", self.namespace, self.name)
        except LEASE_FAULTS as error:  # it expires on its own
            logger.warning("Lease %s/%s not released: %s", self.namespace, self.name, error)

    async def run(self) -> None:
        """Follow until the Lease is ours, then renew; step down when it could not be renewed
        within the renew deadline or another replica holds it. Runs until cancelled."""
        while True:
            try:
                held = await asyncio.to_thread(self.try_acquire_or_renew)
            except LEASE_FAULTS as error:  # a follower keeps trying; a leader, until its deadline
                logger.info("Lease %s/%s: %s", self.namespace, self.name, error)
                held = False
            except Exception:  # never end the loop: a leader must still step down in time
                logger.exception("Lease %s/%s: unexpected failure", self.namespace, self.name)
                held = False
            if held and not self.leading.is_set():
                logger.info("leading: Lease %s/%s acquired", self.namespace, self.name)
                self._lead(True)
            elif self.leading.is_set() and not held and self._deadline_passed():
                logger.warning("stepped down: Lease %s/%s not renewed", self.namespace, self.name)
                self._lead(False)
            await asyncio.sleep(self.timing.retry_s)

    def _lead(self, leading: bool) -> None:
        """Flip the flags, the one that stops work first (a pass in flight waits on
        ``following``, the next one on ``leading``)."""
        if leading:
            self.following.clear()
            self.leading.set()
        else:
            self.leading.clear()
            self.following.set()
        metrics.LEADER.set(int(leading))

    def _deadline_passed(self) -> bool:
        """Another holder (renewal refused) or no renewal within the deadline."""
        taken = self._observed is not None and self._observed[0] not in ("", self.identity)
        return taken or self.clock() - self._renewed_at > self.timing.renew_deadline_s


@dataclass
class Leadership:
    """What the daemons wait on: ``leading`` before each pass, ``following`` (leadership
    lost) cancels a pass in flight. Without an election ``leading`` is set for good."""

    leading: asyncio.Event
    following: asyncio.Event
    election: LeaderElection | None = None
    task: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, lease: str) -> Leadership:
        """Elect on Lease ``<namespace>/<name>`` (empty: no election, this replica leads)."""
        if not lease:
            leading = asyncio.Event()
            leading.set()
            metrics.LEADER.set(1)
            return cls(leading, asyncio.Event())
        namespace, name = lease.split("/", 1)
        identity = f"{socket.gethostname()}-{os.getpid()}"  # a pod's hostname is its name
        election = LeaderElection(client.CoordinationV1Api(), namespace, name, identity)
        logger.info("leader election on Lease %s as %s", lease, identity)
        task = asyncio.create_task(election.run())
        return cls(election.leading, election.following, election, task)

    async def stop(self) -> None:
        """After the daemons stopped (kopf's cleanup): no more renewals, Lease released."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.election is not None:
            await asyncio.to_thread(self.election.release)
