"""kopf handlers: thin glue. One daemon per MoEDeployment reconciles level-based (every
``reconcileIntervalSeconds`` or when nudged); create/update/resume and relevant Node changes
only nudge it; an index keeps the Nodes that carry GPU speed labels."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kopf

from moeplace_operator import metrics
from moeplace_operator.config import OperatorConfig, configure_kopf
from moeplace_operator.crdupgrade import CRD_NAME, BundledCRDError, ensure_crd
from moeplace_operator.events import EventDedup
from moeplace_operator.kube import Kube, TransientApiError, load_config
from moeplace_operator.leader import Leadership
from moeplace_operator.nodes import (
    NodeGPUs,
    can_change_group,
    gpu_capacity,
    has_gpu_labels,
    is_usable,
    node_gpus,
)
from moeplace_operator.reconcile import Reconcile, gpu_nodes
from moeplace_operator.runtime import Live, Runtime, SupersededError
from moeplace_operator.spec import GROUP, PLURAL, VERSION

RETRY_DELAY_S = 5.0
T = TypeVar("T")
Logger = logging.Logger | logging.LoggerAdapter[Any]
Key = tuple[str, str]


Selector = Callable[[], Mapping[str, str] | None]


class Nudges:
    """One wake-up event per MoEDeployment daemon, and each daemon's nodeSelector (read
    when a Node changes, so always the spec's current one)."""

    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}
        self._selectors: dict[Key, Selector] = {}

    def event(self, key: Key) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def watch(self, key: Key, selector: Selector) -> None:
        self._selectors[key] = selector

    def forget(self, key: Key) -> None:
        self._events.pop(key, None)
        self._selectors.pop(key, None)

    def nudge(self, key: Key) -> None:
        self.event(key).set()

    def nudge_all(self) -> None:
        for event in self._events.values():
            event.set()

    def nudge_affected(self, before: NodeGPUs | None, after: NodeGPUs | None) -> None:
        """Nudge the objects whose EP group the Node's change can affect (1,000 new Nodes
        changing two or three times each must not wake every object each time); an object
        whose selector is unknown or unreadable is nudged."""
        for key, event in self._events.items():
            selector = self._selectors.get(key, lambda: None)()
            if selector is None or can_change_group(selector, before, after):
                event.set()

    async def sleep(self, key: Key, seconds: float) -> None:
        """Sleep ``seconds`` or until nudged, whichever comes first."""
        event = self.event(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)
        event.clear()


def node_selector(body: Mapping[str, Any]) -> Mapping[str, str] | None:
    """spec.gpus.nodeSelector, or None where it is missing or malformed."""
    spec = body.get("spec")
    gpus = spec.get("gpus") if isinstance(spec, Mapping) else None
    selector = gpus.get("nodeSelector") if isinstance(gpus, Mapping) else None
    return selector if isinstance(selector, Mapping) and selector else None


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Logger, **_: Any
) -> None:
    configure_kopf(settings)
    config = OperatorConfig.from_env()
    load_config()
    kube = Kube()
    if config.crd_configmap:
        await upgrade_crd(kube, config.crd_configmap, logger)
    memo.leadership = Leadership.start(config.leader_election_lease)
    memo.runtime = Runtime(
        kube=kube,
        solver_pool=ThreadPoolExecutor(config.solver_workers, "moeplace-solver"),
        solver_threads=config.solver_threads,
        prometheus_allowed=tuple(config.prometheus_allowed_urls),
    )
    memo.nudges = Nudges()
    memo.known_nodes = {}
    memo.nodes_version = 0  # moves whenever what the operator keeps of a GPU node does
    memo.events = EventDedup()


async def upgrade_crd(kube: Kube, location: str, logger: Logger) -> None:
    """The chart's CRD before any watch starts (kopf runs startup handlers first); the
    readiness probe answers only once this is done."""
    try:
        applied = await asyncio.to_thread(ensure_crd, kube, location)
    except TransientApiError as error:
        raise kopf.TemporaryError(f"CRD upgrade: {error}", delay=RETRY_DELAY_S) from error
    except BundledCRDError as error:
        raise kopf.PermanentError(str(error)) from error
    logger.info(f"CRD {CRD_NAME}: {'applied from ' + location if applied else 'up to date'}")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """After the daemons stopped: the Lease released (a follower takes over at once)."""
    await memo.leadership.stop()
    runtime: Runtime = memo.runtime
    runtime.solver_pool.shutdown(wait=False, cancel_futures=True)
    runtime.io_pool.shutdown(wait=False, cancel_futures=True)
    runtime.prometheus_pool.shutdown(wait=False, cancel_futures=True)


def _gpu_labelled(labels: kopf.Labels, **_: Any) -> bool:
    return has_gpu_labels(labels)


@kopf.index("nodes", when=_gpu_labelled)
def gpu_node_index(
    name: str,
    labels: kopf.Labels,
    annotations: kopf.Annotations,
    spec: kopf.Spec,
    status: kopf.Status,
    **_: Any,
) -> NodeGPUs:
    return node_gpus(name, labels, annotations, is_usable(spec, status), gpu_capacity(status))


# The nudging handlers are async: kopf runs sync handlers in worker threads, and an
# asyncio.Event must be set from its own event loop.
@kopf.on.event("nodes")
async def node_changed(
    name: str,
    labels: kopf.Labels,
    annotations: kopf.Annotations,
    type: str | None,
    memo: kopf.Memo,
    spec: kopf.Spec,
    status: kopf.Status,
    **_: Any,
) -> None:
    """Nudge the MoEDeployments whose EP group a node's change can affect (not on
    heartbeats): those whose nodeSelector matches its old or new labels."""
    known: dict[str, NodeGPUs] = memo.known_nodes
    gone = type == "DELETED" or not has_gpu_labels(labels)
    usable, capacity = is_usable(spec, status), gpu_capacity(status)
    node = None if gone else node_gpus(name, labels, annotations, usable, capacity)
    before = known.pop(name, None)
    if node is not None:
        known[name] = node
    if before != node:
        memo.nodes_version = memo.get("nodes_version", 0) + 1
        memo.nudges.nudge_affected(before, node)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def nudge(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.nudges.nudge((namespace or "", name))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def reconciler(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: Logger,
    **kwargs: Any,
) -> None:
    index: Mapping[Any, Any] = kwargs["gpu_node_index"]  # kopf passes indices by name
    key = (namespace or "", name)
    nudges: Nudges = memo.nudges
    leadership: Leadership = memo.leadership
    nudges.event(key)
    nudges.watch(key, lambda: node_selector(body))  # kopf keeps the body current
    live = Live(
        stopping=lambda: bool(stopped),
        nodes_version=lambda: int(memo.get("nodes_version", 0)),
    )
    try:
        while not stopped:
            await first_of(leadership.leading.wait(), stopped.wait())  # followers wait here
            if stopped:
                break
            with metrics.RECONCILE_SECONDS.time():  # a pass stops when leadership is lost
                done = await first_of(
                    reconcile_once(memo, body, index, logger, live), leadership.following.wait()
                )
            if done is None:  # leadership lost mid-pass: wait until leading again
                continue
            interval = float(body["spec"].get("reconcileIntervalSeconds", 60))
            await first_of(nudges.sleep(key, interval if done else RETRY_DELAY_S), stopped.wait())
    finally:
        nudges.forget(key)
        forget_object(memo, namespace or "", name)


async def first_of(work: Awaitable[T], interrupt: Awaitable[object]) -> T | None:
    """``work``'s result, or None when ``interrupt`` comes first (``work`` then cancelled).
    A stopping operator must not sit out a daemon's sleep (the Lease is released only once
    the daemons ended), and a replica that lost leadership must not finish its pass."""
    task, interrupting = asyncio.ensure_future(work), asyncio.ensure_future(interrupt)
    try:
        await asyncio.wait([task, interrupting], return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the daemon itself is cancelled: nothing is left running
        for pending in (task, interrupting):
            pending.cancel()
        await asyncio.gather(task, interrupting, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def reconcile_once(
    memo: kopf.Memo,
    body: kopf.Body,
    index: Mapping[Any, Any],
    logger: Logger,
    live: Live | None = None,
) -> bool:
    """One pass; False after a transient API fault, retried soon by the same daemon: leaving
    the daemon (kopf's TemporaryError) would drop the object's cached plans with it. A pass
    whose solve was superseded counts as done: the change that superseded it nudged the
    daemon, whose next pass starts at once."""
    try:
        nodes = functools.partial(gpu_nodes, index)
        await Reconcile(
            memo.runtime,
            body,
            nodes(),
            logger,
            memo.events,
            live_nodes=nodes,
            live=live or Live(),
        ).run()
    except SupersededError as superseded:
        logger.info(f"solve stopped: {superseded}")
    except TransientApiError as error:
        metrics.ERRORS.labels("TransientApiError").inc()
        logger.warning(f"Kubernetes API: {error}; retrying in {RETRY_DELAY_S:g} s")
        return False
    return True


def forget_object(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Drop what the operator keeps for a MoEDeployment whose daemon ends (deleted, or the
    operator stops): cached plans, per-object gauges, Event de-duplication."""
    key = f"{namespace}/{name}"
    memo.runtime.forget(key)
    metrics.forget_object(namespace, name)
    events: EventDedup = memo.events
    events.forget(key)
