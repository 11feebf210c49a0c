"""kopf handlers: thin glue. One daemon per MoEDeployment reconciles level-based (every
``reconcileIntervalSeconds`` or when nudged); create/update/resume and relevant Node changes
only nudge it; an index keeps the Nodes that carry GPU speed labels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from moeplace_operator import metrics
from moeplace_operator.config import OperatorConfig, configure_kopf
from moeplace_operator.kube import Kube, TransientApiError, load_config
from moeplace_operator.nodes import NodeGPUs, has_gpu_labels, node_gpus
from moeplace_operator.reconcile import Reconcile, Runtime, gpu_nodes
from moeplace_operator.spec import GROUP, PLURAL, VERSION

RETRY_DELAY_S = 5.0
Logger = logging.Logger | logging.LoggerAdapter[Any]
Key = tuple[str, str]


class Nudges:
    """One wake-up event per MoEDeployment daemon."""

    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}

    def event(self, key: Key) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def forget(self, key: Key) -> None:
        self._events.pop(key, None)

    def nudge(self, key: Key) -> None:
        self.event(key).set()

    def nudge_all(self) -> None:
        for event in self._events.values():
            event.set()

    async def sleep(self, key: Key, seconds: float) -> None:
        """Sleep ``seconds`` or until nudged, whichever comes first."""
        event = self.event(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)
        event.clear()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings)
    config = OperatorConfig.from_env()
    load_config()
    memo.runtime = Runtime(
        kube=Kube(),
        solver_pool=ThreadPoolExecutor(config.solver_workers, "moeplace-solver"),
        solver_threads=config.solver_threads,
        prometheus_allowed=tuple(config.prometheus_allowed_urls),
    )
    memo.nudges = Nudges()
    memo.node_fingerprints = {}
    memo.last_refused = {}


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    runtime.solver_pool.shutdown(wait=False, cancel_futures=True)
    runtime.io_pool.shutdown(wait=False, cancel_futures=True)


def _gpu_labelled(labels: kopf.Labels, **_: Any) -> bool:
    return has_gpu_labels(labels)


@kopf.index("nodes", when=_gpu_labelled)
def gpu_node_index(
    name: str, labels: kopf.Labels, annotations: kopf.Annotations, **_: Any
) -> NodeGPUs:
    return node_gpus(name, labels, annotations)


@kopf.on.event("nodes")
def node_changed(
    name: str,
    labels: kopf.Labels,
    annotations: kopf.Annotations,
    type: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Nudge every MoEDeployment when a node's GPU facts change (not on heartbeats)."""
    fingerprints: dict[str, str] = memo.node_fingerprints
    gone = type == "DELETED" or not has_gpu_labels(labels)
    fingerprint = "" if gone else node_gpus(name, labels, annotations).fingerprint()
    if fingerprints.get(name, "") != fingerprint:
        fingerprints[name] = fingerprint
        memo.nudges.nudge_all()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
def nudge(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
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
    nudges.event(key)
    try:
        while not stopped:
            with metrics.RECONCILE_SECONDS.time():
                await reconcile_once(memo, body, index, logger)
            await nudges.sleep(key, float(body["spec"].get("reconcileIntervalSeconds", 60)))
    finally:
        nudges.forget(key)
        memo.runtime.forget(f"{namespace}/{name}")


async def reconcile_once(
    memo: kopf.Memo,
    body: kopf.Body,
    index: Mapping[Any, Any],
    logger: Logger,
) -> None:
    """One pass; transient API faults become kopf's retry with a delay."""
    try:
        await Reconcile(memo.runtime, body, gpu_nodes(index), logger, memo.last_refused).run()
    except TransientApiError as error:
        metrics.ERRORS.labels("TransientApiError").inc()
        raise kopf.TemporaryError(f"Kubernetes API: {error}", delay=RETRY_DELAY_S) from error
