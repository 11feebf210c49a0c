"""What reconciles share (``Runtime``: the API wrapper, the worker pools, per-object caches)
and what one pass over one object carries (``Context``), plus ``DegradedError``, how any
step reports missing inputs. The observe, decide and act steps take a ``Context``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf

from moeplace_operator.events import EventDedup
from moeplace_operator.kube import Kube
from moeplace_operator.loadsource import LoadData
from moeplace_operator.nodes import NodeGPUs
from moeplace_operator.planning import Plan
from moeplace_operator.spec import ModelSpec
from moeplace_operator.status import ConditionUpdate
from placement.model import FloatArray

T = TypeVar("T")


@dataclass(frozen=True)
class CachedTransitions:
    """Raw layer-to-layer transitions [L-1, E, E] as read from ``source`` at ``read_at``."""

    source: str  # what they were read from: the query's spec, or the ConfigMap's version
    read_at: datetime
    raw: FloatArray


@dataclass(frozen=True)
class CachedPlan:
    """The last plan of an object: what it was solved for (``inputs_fingerprint`` and the
    load, which may drift within tolerance before the plan is solved again) and when."""

    fingerprint: str
    load: LoadData
    plan: Plan
    solved_at: datetime


@dataclass
class Runtime:
    """What all reconciles share: the API wrapper and the bounded solver pool."""

    kube: Kube
    solver_pool: ThreadPoolExecutor
    solver_threads: int
    prometheus_allowed: tuple[str, ...] = ()  # base URLs load.prometheus.url must match
    io_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(8, "moeplace-io")
    )
    # Prometheus queries apart from the Kubernetes calls: a slow Prometheus (each query may
    # wait QUERY_TIMEOUT_S) then stalls only the objects that read it, not every status write
    prometheus_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, "moeplace-prometheus")
    )
    plans: dict[str, CachedPlan] = field(default_factory=dict)  # "ns/name" -> the last plan
    # "ns/name" -> the transitions last read (megabytes of query answer: not every tick)
    transitions: dict[str, CachedTransitions] = field(default_factory=dict)
    # "ns/name" -> the last status patch written (the body's status lags behind it)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)

    def forget(self, key: str) -> None:
        """Drop what is kept for the object ``key`` ("ns/name"), when it goes away."""
        self.plans.pop(key, None)
        self.transitions.pop(key, None)
        self.statuses.pop(key, None)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def query(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` (a Prometheus query) in the Prometheus pool."""
        return await asyncio.get_running_loop().run_in_executor(self.prometheus_pool, fn, *args)

    async def solve(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.solver_pool, fn, *args)


class SupersededError(Exception):
    """A solve was stopped because its pass no longer matters: the daemon stops (the object
    is deleted, the operator exits), the spec or the EP group changed. The daemon runs the
    next pass at once (the change nudged it); nothing of this one is written."""


class DegradedError(Exception):
    """Inputs are missing: keep the placement in service, report why."""

    def __init__(self, reason: str, message: str, updates: list[ConditionUpdate]) -> None:
        super().__init__(message)
        self.reason = reason
        self.updates = updates


@dataclass(frozen=True)
class Live:
    """What a pass can look at while it waits for its solve, from the daemon: whether it is
    stopping, and a counter that moves when a GPU Node changes (only then is the group built
    again from ``Context.live_nodes``)."""

    stopping: Callable[[], bool] = lambda: False
    nodes_version: Callable[[], int] = lambda: 0


@dataclass
class Context:
    """One pass over one MoEDeployment: the shared runtime, the object as kopf gave it, the
    GPU nodes indexed, and the pass's clock (every step sees the same ``now``)."""

    runtime: Runtime
    body: kopf.Body
    nodes: list[NodeGPUs]
    logger: logging.Logger | logging.LoggerAdapter[Any]
    events: EventDedup  # shared by all objects, keyed by ``key``
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # the Nodes as they are now (the index), to see a group that changed while we solved
    live_nodes: Callable[[], list[NodeGPUs]] | None = None
    live: Live = field(default_factory=Live)
    started_generation: int = field(init=False, default=0)  # the body's may move on

    def __post_init__(self) -> None:
        self.started_generation = self.generation

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def key(self) -> str:
        """ "namespace/name": what the runtime keeps per object is filed under it."""
        return f"{self.namespace}/{self.name}"

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation", 0))

    @property
    def hidden_layers(self) -> int:
        """Rows of the engine's per-hidden-layer map, from the spec's model."""
        return ModelSpec.model_validate(self.body["spec"]["model"]).layout().hidden_layers
