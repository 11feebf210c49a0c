"""One level-based reconcile of a MoEDeployment: observe (ConfigMaps, nodes, load), plan (in
the solver pool), decide (pure, ``build.decide_rollout``), act (one atomic ConfigMap write, the
target's pod-template annotation, Events), report (status). Every blocking call runs in a
worker thread; the event loop only awaits."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf
from pydantic import ValidationError

from moeplace_operator import metrics
from moeplace_operator.build import (
    ConditionUpdate,
    Decision,
    Published,
    already_applied,
    configmap_body,
    decide_rollout,
    degraded_updates,
    false,
    gain_percent,
    merge_conditions,
    percent_text,
    placement_configmap_name,
    proposal_configmap_name,
    published_version,
    ratio_text,
    read_published,
    rfc3339,
    status_patch,
    target_patch,
    true,
)
from moeplace_operator.kube import ForbiddenError, Kube, MissingObjectError
from moeplace_operator.loadsource import (
    LoadData,
    MetricsUnavailableError,
    PrometheusSource,
    fetch_prometheus,
    fetch_prometheus_transitions,
    fetch_rank_counters,
    parse_duration,
    parse_load_csv,
    parse_static_transitions,
    resolve_source,
    scale_transitions,
)
from moeplace_operator.nodes import (
    REPROFILE_ANNOTATION,
    GPUGroup,
    NodeGPUs,
    NodesUnavailableError,
    build_gpu_group,
)
from moeplace_operator.planning import Plan, fitting, inputs_fingerprint, plan, score_pinned
from moeplace_operator.spec import (
    ConditionType,
    ModelSpec,
    MoEDeploymentSpec,
    MoEDeploymentStatus,
    PlacementSummary,
    RolloutMode,
)
from placement.drift import SpeedDrift, speed_drift
from placement.evaluate import Evaluation
from placement.formats import parse_canonical
from placement.model import FloatArray, Placement
from placement.validate import InvalidPlacementError

T = TypeVar("T")
REFUSALS_WORTH_AN_EVENT = {"CooldownActive", "TooManyMoves", "GainBelowThreshold"}


@dataclass(frozen=True)
class CachedTransitions:
    """Raw layer-to-layer transitions [L-1, E, E] as read from ``source`` at ``read_at``."""

    source: str  # what they were read from: the query's spec, or the ConfigMap's version
    read_at: datetime
    raw: FloatArray


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
    # "ns/name" -> (inputs fingerprint, plan, solved at) of the last solve
    plans: dict[str, tuple[str, Plan, datetime]] = field(default_factory=dict)
    # "ns/name" -> the transitions last read (megabytes of query answer: not every tick)
    transitions: dict[str, CachedTransitions] = field(default_factory=dict)

    def forget(self, key: str) -> None:
        """Drop what is kept for the object ``key`` ("ns/name"), when it goes away."""
        self.plans.pop(key, None)
        self.transitions.pop(key, None)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def solve(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.solver_pool, fn, *args)


class DegradedError(Exception):
    """Inputs are missing: keep the placement in service, report why."""

    def __init__(self, reason: str, message: str, updates: list[ConditionUpdate]) -> None:
        super().__init__(message)
        self.reason = reason
        self.updates = updates


@dataclass
class Reconcile:
    """State of one reconcile pass; methods are the steps, ``run`` the order."""

    runtime: Runtime
    body: kopf.Body
    nodes: list[NodeGPUs]
    logger: logging.Logger | logging.LoggerAdapter[Any]
    last_refused: dict[str, str]  # shared by all objects: keyed by namespace/name/reason
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    solved_at: datetime | None = None  # set when the plan comes from the cache
    load_configmap: dict[str, Any] | None = None  # the static load's ConfigMap, as read
    prometheus: PrometheusSource | None = None  # load.prometheus resolved, by ``load``

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

    async def run(self) -> None:
        generation = self.generation  # the live body may move on while we work
        status = MoEDeploymentStatus.model_validate(self.body.get("status") or {})
        kube = self.runtime.kube
        in_service = read_published(
            await self.runtime.io(
                kube.read_configmap, self.namespace, placement_configmap_name(self.name)
            )
        )
        summary = status.placement  # kept as it was when degraded
        try:
            updates, summary = await self.converge(self.spec(), in_service)
        except DegradedError as degraded:
            metrics.ERRORS.labels(degraded.reason).inc()
            self.logger.info("degraded: %s", degraded)  # info: warnings become Events each tick
            self.announce_degradation(status, degraded)
            kept = in_service.hash if in_service else None
            updates = [*degraded.updates, *degraded_updates(degraded.reason, str(degraded), kept)]
        conditions = merge_conditions(status.conditions, updates, generation, self.now)
        patch = status_patch(generation=generation, conditions=conditions, summary=summary)
        if not already_applied(patch, {"status": dict(self.body.get("status") or {})}):
            await self.runtime.io(kube.patch_status, self.namespace, self.name, patch)

    def spec(self) -> MoEDeploymentSpec:
        """The spec, or DegradedError(InvalidSpec) naming what is wrong: an object stored
        before the CRD refused it (a URL with credentials, say). The models hide the input in
        their errors; the chain is dropped so no traceback prints it either."""
        try:
            return MoEDeploymentSpec.model_validate(self.body["spec"])
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
                for e in error.errors()[:3]
            )
            raise DegradedError("InvalidSpec", f"spec refused: {problems}", []) from None

    def announce_degradation(self, status: MoEDeploymentStatus, degraded: DegradedError) -> None:
        """A Warning Event when the object becomes degraded or the reason changes."""
        before = next((c for c in status.conditions if c.type == ConditionType.DEGRADED), None)
        if before and before.status == "True" and before.reason == degraded.reason:
            return
        kopf.event(self.body, type="Warning", reason=degraded.reason, message=str(degraded))

    async def converge(
        self, spec: MoEDeploymentSpec, in_service: Published | None
    ) -> tuple[list[ConditionUpdate], PlacementSummary]:
        group, gpu_update = self.gpu_group(spec)
        load, metrics_update = await self.load(spec)
        load, metrics_update, no_traffic = await self.transitions(spec, load, metrics_update)
        gpu_update = await self.speed_drift(spec, group, gpu_update)
        mode = spec.rollout.mode
        pinned = await self.pinned(spec, group, load) if mode is RolloutMode.PINNED else None
        current = in_service.placement if in_service else None
        result = await self.plan(spec, group, load, current)
        candidate, candidate_eval = pinned or (result.solution.placement, result.proposal)
        # Pinned: how much the best proposal would gain over what git holds
        gain = (
            gain_percent(result.cost(pinned[1]), result.cost(result.proposal))
            if pinned
            else result.gain_over_current
        )
        in_service_fits = in_service is not None and fitting(current, spec, group) is not None
        decision = decide_rollout(
            rollout=spec.rollout,
            cooldown=parse_duration(spec.rollout.cooldown),
            current_hash=in_service.hash if in_service and in_service_fits else None,
            proposed_hash=candidate.content_hash(),
            gain=gain,
            moved=result.proposal.moved,
            last_rollout=in_service.rolled_out_at if in_service else None,
            now=self.now,
        )
        if mode is not RolloutMode.AUTO:
            proposal = result.solution.placement
            await self.publish(proposal_configmap_name(self.name), "proposal", proposal)
        if decision.roll:
            in_service = await self.roll_out(candidate, decision)
        else:
            self.note_refusal(decision, candidate.content_hash())
        if spec.rollout.target and in_service:
            await self.sync_target(spec, in_service.hash)
        shown = candidate_eval if decision.roll or mode is RolloutMode.PROPOSE else result.current
        summary = self.summary(spec, group, result, in_service, shown, load, gain)
        updates = [
            gpu_update,
            metrics_update,
            self.solved_update(spec, result, no_traffic),
            self.rolled_out_update(in_service, decision),
            false(ConditionType.DEGRADED, "AsExpected"),
            self.ready_update(spec, in_service, decision),
        ]
        return updates, summary

    def gpu_group(self, spec: MoEDeploymentSpec) -> tuple[GPUGroup, ConditionUpdate]:
        try:
            group = build_gpu_group(self.nodes, spec.gpus)
        except NodesUnavailableError as error:
            update = false(ConditionType.GPUS_PROFILED, error.reason, str(error))
            raise DegradedError(error.reason, str(error), [update]) from error
        if group.profiled:
            source = "LatencyCurves" if group.cluster.has_curves else "SpeedLabels"
            return group, true(
                ConditionType.GPUS_PROFILED,
                source,
                f"{group.cluster.size} GPUs on {len(group.nodes)} nodes",
            )
        missing = ", ".join(group.unprofiled[:4]) + (" ..." if len(group.unprofiled) > 4 else "")
        return group, false(
            ConditionType.GPUS_PROFILED, "SpeedLabelsMissing", f"assuming speed 1.0 for {missing}"
        )

    async def load(self, spec: MoEDeploymentSpec) -> tuple[LoadData, ConditionUpdate]:
        try:
            if spec.load.prometheus is not None:
                self.prometheus = await self.runtime.io(
                    resolve_source,
                    spec.load.prometheus,
                    self.namespace,
                    self.runtime.kube,
                    self.runtime.prometheus_allowed,
                )
                data = await self.runtime.io(
                    fetch_prometheus,
                    self.prometheus,
                    spec.model,
                    self.now,
                    spec.placement.dispatch.rule,
                )
                return data, true(ConditionType.METRICS_AVAILABLE, "Prometheus", data.window)
            assert spec.load.static is not None  # the CRD's CEL rule: exactly one source
            ref = spec.load.static
            found = await self.runtime.io(
                self.runtime.kube.read_configmap, self.namespace, ref.config_map_name
            )
            self.load_configmap = found
            text = ((found or {}).get("data") or {}).get(ref.key)
            if text is None:
                raise MetricsUnavailableError(
                    "LoadConfigMapMissing",
                    f"ConfigMap {ref.config_map_name} key {ref.key} not found",
                )
            load = parse_load_csv(text, spec.model)
            window = f"static ConfigMap {ref.config_map_name}"
            return LoadData(load, None, window), true(
                ConditionType.METRICS_AVAILABLE, "StaticConfigMap", window
            )
        except MetricsUnavailableError as error:
            update = false(ConditionType.METRICS_AVAILABLE, error.reason, str(error))
            raise DegradedError(error.reason, str(error), [update]) from error

    async def transitions(
        self, spec: MoEDeploymentSpec, load: LoadData, update: ConditionUpdate
    ) -> tuple[LoadData, ConditionUpdate, MetricsUnavailableError | None]:
        """With ``trafficWeight > 0``: the load with its layer-to-layer transitions (scaled to
        it), or the load without them and why. Missing or bad transitions never degrade the
        object: the placement is solved without the traffic term, the MetricsAvailable and
        PlacementSolved messages say why, and a Warning Event (once per cause) too."""
        if spec.placement.traffic_weight <= 0:
            return load, update, None
        try:
            source, raw = await self.read_transitions(spec)
            transitions, factor = scale_transitions(raw, load.load, spec.model.top_k)
        except MetricsUnavailableError as missing:
            self.announce_missing_transitions(spec, missing)
            message = f"{update.message}; transitions unavailable ({missing.reason}): {missing}"
            return load, replace(update, message=message), missing
        self.last_refused.pop(self.transitions_event_key, None)
        message = f"{update.message}; transitions from {source} (x{factor:.3g} to the load)"
        return replace(load, transitions=transitions), replace(update, message=message), None

    async def read_transitions(self, spec: MoEDeploymentSpec) -> tuple[str, FloatArray]:
        """(where from, raw [L-1, E, E]). Read again only when their source changed: the
        static ConfigMap's version, or for Prometheus the query's spec or one sub-window
        (``window / samples``, the load's own granularity) since the last read."""
        cached = self.runtime.transitions.get(self.key)
        if spec.load.prometheus is not None:
            prometheus = spec.load.prometheus
            source = "Prometheus"
            version = prometheus.model_dump_json() + spec.model.model_dump_json()
            max_age = parse_duration(prometheus.window) / prometheus.samples
            fresh = cached is not None and self.now - cached.read_at < max_age
            if cached is not None and cached.source == version and fresh:
                return source, cached.raw
            assert self.prometheus is not None  # resolved by ``load``, which runs first
            raw = await self.runtime.io(
                fetch_prometheus_transitions, self.prometheus, spec.model, self.now
            )
        else:
            assert spec.load.static is not None
            item = spec.load.static.transitions_key
            source = f"ConfigMap {spec.load.static.config_map_name} key {item}"
            found = self.load_configmap or {}
            revision = str(found.get("metadata", {}).get("resourceVersion", ""))
            version = f"{revision}/{item}/{spec.model.model_dump_json()}"
            if cached is not None and cached.source == version and revision:
                return source, cached.raw
            raw = await self.runtime.io(parse_static_transitions, found, item, spec.model)
        self.runtime.transitions[self.key] = CachedTransitions(version, self.now, raw)
        return source, raw

    @property
    def transitions_event_key(self) -> str:
        return f"{self.key}/TransitionsUnavailable"

    def announce_missing_transitions(
        self, spec: MoEDeploymentSpec, missing: MetricsUnavailableError
    ) -> None:
        """A Warning Event when transitions go missing or the reason changes, not every tick
        (the condition messages carry the latest detail)."""
        if self.last_refused.get(self.transitions_event_key) == missing.reason:
            return
        self.last_refused[self.transitions_event_key] = missing.reason
        message = (
            f"trafficWeight {spec.placement.traffic_weight:g} is set but transitions are "
            f"unavailable ({missing.reason}: {missing}); solving without the traffic term"
        )
        kopf.event(self.body, type="Warning", reason="TransitionsUnavailable", message=message)

    async def speed_drift(
        self, spec: MoEDeploymentSpec, group: GPUGroup, update: ConditionUpdate
    ) -> ConditionUpdate:
        """With a Prometheus load and ``gpus.speedDriftThresholdPercent > 0``: GPUsProfiled
        False (``SpeedDrift``) while some GPU's measured relative speed departs from its label
        by more than the threshold; a Warning Event and a re-profile request on the affected
        Nodes once per change of the set of drifting GPUs. Too little data says nothing, and
        any failure here is logged, never raised: it must not stop the placement."""
        threshold = spec.gpus.speed_drift_threshold_percent / 100
        prometheus = self.prometheus  # resolved by ``load``, which runs first
        try:
            found: SpeedDrift | None = None
            if prometheus is not None and threshold > 0:
                seconds, tokens = await self.runtime.io(
                    fetch_rank_counters, prometheus, spec.model, self.now, group.cluster.size
                )
                labels = [gpu.speed for gpu in group.cluster.gpus]
                found = speed_drift(labels, seconds, tokens)
            if found is None:
                self.forget_drift()
                return update
            drifting = found.beyond(threshold)
            metrics.SPEED_DRIFT.labels(self.namespace, self.name).set(100 * found.largest)
            metrics.SPEED_DRIFT_GPUS.labels(self.namespace, self.name).set(len(drifting))
            if not drifting:
                self.last_refused.pop(f"{self.key}/SpeedDrift", None)
                self.last_refused.pop(f"{self.key}/ReprofileRequested", None)
                return update
            message = self.drift_message(spec, group, found, drifting)
            message = f"{message}; {await self.announce_drift(group, drifting, message)}"
        except asyncio.CancelledError:
            raise
        except Exception as error:  # MetricsUnavailableError included: no claim, no failure
            self.logger.info("speed drift not measured: %s", error)
            return update
        if group.profiled:
            return false(ConditionType.GPUS_PROFILED, "SpeedDrift", message)
        return replace(update, message=f"{update.message}; {message}")

    def forget_drift(self) -> None:
        metrics.forget_drift(self.namespace, self.name)

    def drift_message(
        self, spec: MoEDeploymentSpec, group: GPUGroup, found: SpeedDrift, drifting: list[int]
    ) -> str:
        shown = []
        for gpu in drifting[:4]:
            node, index = group.gpu_name(gpu)
            shown.append(
                f"{node}/{index} measured {found.measured[gpu]:.2f}x vs label "
                f"{found.labelled[gpu]:.2f}x ({100 * found.drift[gpu]:+.1f}%)"
            )
        more = f" and {len(drifting) - 4} more" if len(drifting) > 4 else ""
        window = spec.load.prometheus.window if spec.load.prometheus else "?"
        return (
            f"speed drift beyond {spec.gpus.speed_drift_threshold_percent:g}% on "
            f"{len(drifting)} GPU(s): {', '.join(shown)}{more} (relative tokens/s per rank over "
            f"{window})"
        )

    async def announce_drift(self, group: GPUGroup, drifting: list[int], message: str) -> str:
        """Once per change of the drifting set: a Warning Event, and the affected Nodes
        annotated (a failed annotation is retried on the next pass, the Event is not). Returns
        what became of the re-profile request, for the condition message."""
        signature = ",".join(f"{n}/{i}" for n, i in sorted(map(group.gpu_name, drifting)))
        if self.last_refused.get(f"{self.key}/SpeedDrift") != signature:
            self.last_refused[f"{self.key}/SpeedDrift"] = signature
            kopf.event(self.body, type="Warning", reason="SpeedDrift", message=message)
        if self.last_refused.get(f"{self.key}/ReprofileRequested") == signature:
            return "re-profile requested"
        stamp = {REPROFILE_ANNOTATION: rfc3339(self.now)}
        nodes = sorted({group.gpu_name(gpu)[0] for gpu in drifting})
        try:
            for node in nodes:
                await self.runtime.io(self.runtime.kube.annotate_node, node, stamp)
        except Exception as error:  # RBAC without patch on nodes, API trouble: report, go on
            # info, not warning: kopf turns warnings into Events, and this is retried every pass
            self.logger.info("re-profile request on %s failed: %s", ", ".join(nodes), error)
            return f"re-profile request failed (patch nodes allowed?): {error}"
        self.last_refused[f"{self.key}/ReprofileRequested"] = signature
        self.logger.info("re-profile requested on %s", ", ".join(nodes))
        return "re-profile requested"

    async def pinned(
        self, spec: MoEDeploymentSpec, group: GPUGroup, load: LoadData
    ) -> tuple[Placement, Evaluation]:
        assert spec.rollout.pinned is not None  # the CRD's CEL rule for Pinned mode
        ref = spec.rollout.pinned
        found = await self.runtime.io(
            self.runtime.kube.read_configmap, self.namespace, ref.config_map_name
        )
        text = ((found or {}).get("data") or {}).get(ref.key)
        try:
            if text is None:
                raise ValueError(f"ConfigMap {ref.config_map_name} key {ref.key} not found")
            placement = parse_canonical(text)
            return placement, score_pinned(placement, spec, group, load)
        except (ValueError, InvalidPlacementError) as error:
            message = f"pinned placement rejected: {error}"
            raise DegradedError("PinnedInvalid", message, []) from error

    async def plan(
        self, spec: MoEDeploymentSpec, group: GPUGroup, load: LoadData, current: Placement | None
    ) -> Plan:
        fingerprint = inputs_fingerprint(spec, group, load, current)
        cached = self.runtime.plans.get(self.key)
        if cached and cached[0] == fingerprint:
            self.solved_at = cached[2]
            return cached[1]
        strategy = spec.placement.strategy.value
        started = time.monotonic()
        try:
            result = await self.runtime.solve(
                plan, spec, group, load, current, self.runtime.solver_threads
            )
        except Exception as error:  # a solver bug must not take the operator down
            self.logger.exception("solve failed")
            metrics.SOLVES.labels(strategy, "ERROR").inc()
            update = false(ConditionType.PLACEMENT_SOLVED, "SolveFailed", str(error))
            raise DegradedError("SolveFailed", f"{strategy}: {error}", [update]) from error
        metrics.SOLVES.labels(strategy, result.solution.status).inc()
        metrics.SOLVE_SECONDS.labels(strategy).observe(time.monotonic() - started)
        metrics.PREDICTED_GAIN.labels(self.namespace, self.name).set(result.gain_over_current)
        metrics.GAIN_OVER_EPLB.labels(self.namespace, self.name).set(result.gain_over_eplb)
        self.runtime.plans[self.key] = (fingerprint, result, self.now)
        return result

    async def publish(self, name: str, role: str, placement: Placement) -> Published:
        """Write ``placement`` to ConfigMap ``name`` unless it already holds it; an unreadable
        map is replaced in the same single call (guarded by its resourceVersion)."""
        kube = self.runtime.kube
        raw = await self.runtime.io(kube.read_configmap, self.namespace, name)
        existing = read_published(raw)
        if existing and existing.hash == placement.content_hash():
            return existing
        version = published_version(raw) + 1
        body = configmap_body(
            name=name,
            namespace=self.namespace,
            role=role,
            owner=self.body,
            placement=placement,
            version=version,
            rolled_out_at=self.now,
            resource_version=raw["metadata"].get("resourceVersion") if raw else None,
            hidden_layers=self.hidden_layers,
        )
        try:
            await self.runtime.io(kube.write_configmap, body)
        except ForbiddenError as error:  # e.g. a ConfigMap of that name that we did not write
            message = f"ConfigMap {name} not written: {error}"
            update = false(ConditionType.ROLLED_OUT, "ConfigMapForbidden", message)
            raise DegradedError("ConfigMapForbidden", message, [update]) from error
        return Published(placement, placement.content_hash(), version, self.now, None)

    async def roll_out(self, placement: Placement, decision: Decision) -> Published:
        published = await self.publish(placement_configmap_name(self.name), "placement", placement)
        metrics.ROLLOUTS.labels(decision.reason).inc()
        message = f"v{published.version}: {decision.message}"
        kopf.event(self.body, type="Normal", reason="RolledOut", message=message)
        return published

    def note_refusal(self, decision: Decision, proposed_hash: str) -> None:
        """One Event per refused proposal, not one per tick."""
        if decision.reason not in REFUSALS_WORTH_AN_EVENT:
            return
        metrics.REFUSALS.labels(decision.reason).inc()
        key = f"{self.key}/{decision.reason}"
        if self.last_refused.get(key) == proposed_hash:
            return
        self.last_refused[key] = proposed_hash
        kopf.event(self.body, type="Normal", reason="RolloutRefused", message=decision.message)

    async def sync_target(self, spec: MoEDeploymentSpec, content_hash: str) -> None:
        """Level-based: the workload's pod template carries the hash in service, whatever
        happened before (a restart between ConfigMap write and this patch included)."""
        target = spec.rollout.target
        assert target is not None
        kube = self.runtime.kube
        try:
            current = await self.runtime.io(
                kube.read_target_hash, self.namespace, target.kind, target.name
            )
            if current != content_hash:
                patch = target_patch(["spec", "template"], content_hash)
                await self.runtime.io(
                    kube.patch_target, self.namespace, target.kind, target.name, patch
                )
                kopf.event(
                    self.body,
                    type="Normal",
                    reason="TargetRolled",
                    message=f"{target.kind}/{target.name} pods roll to placement {content_hash}",
                )
        except MissingObjectError as error:
            message = f"{target.kind}/{target.name} not found"
            raise DegradedError(
                "TargetMissing",
                message,
                [false(ConditionType.ROLLED_OUT, "TargetMissing", message)],
            ) from error
        except ForbiddenError as error:  # the chart's policy: label the target for us
            message = (
                f"{target.kind}/{target.name} not patched (label it "
                f"moeplace.io/deployment={self.name} to allow it): {error}"
            )
            raise DegradedError(
                "TargetForbidden",
                message,
                [false(ConditionType.ROLLED_OUT, "TargetForbidden", message)],
            ) from error

    def summary(
        self,
        spec: MoEDeploymentSpec,
        group: GPUGroup,
        result: Plan,
        in_service: Published | None,
        shown: Evaluation | None,
        load: LoadData,
        gain: float,
    ) -> PlacementSummary:
        """Figures of the placement in service (of the proposal in Propose mode, where
        nothing is in service) and of the last solve."""
        proposing = spec.rollout.mode is RolloutMode.PROPOSE
        config_map = proposal_configmap_name(self.name) if proposing else None
        if in_service and not proposing:
            config_map = placement_configmap_name(self.name)
        serving = in_service if not proposing else None
        solution = result.solution
        return PlacementSummary(
            config_map=config_map,
            hash=serving.hash if serving else None,
            version=serving.version if serving else None,
            strategy=serving.placement.strategy if serving else solution.placement.strategy,
            straggler=round(shown.straggler, 3) if shown else None,
            fluid_bound=round(shown.fluid_bound, 3) if shown else None,
            straggler_over_bound=ratio_text(shown.ratio) if shown else None,
            gain_percent=percent_text(gain),
            gain_over_eplb_percent=percent_text(result.gain_over_eplb),
            traffic_share_percent=share_text(shown.traffic_share) if shown else None,
            eplb_traffic_share_percent=share_text(result.eplb.traffic_share),
            moved_experts=result.proposal.moved,
            proposed_hash=solution.placement.content_hash(),
            solver_gap=percent_text(100 * solution.gap),
            solved_at=rfc3339(self.solved_at or self.now),
            rolled_out_at=rfc3339(serving.rolled_out_at)
            if serving and serving.rolled_out_at
            else None,
            load_window=load.window,
            gpus=group.cluster.size,
        )

    def solved_update(
        self, spec: MoEDeploymentSpec, result: Plan, no_traffic: MetricsUnavailableError | None
    ) -> ConditionUpdate:
        s = result.solution
        message = (
            f"{s.placement.strategy} {s.status} in {s.wall_s:.2f}s, gap {100 * s.gap:.2f}%, "
            f"straggler/bound {result.proposal.ratio:.3f}, {result.gain_over_eplb:.1f}% over EPLB"
        )
        share, eplb_share = (
            share_text(result.proposal.traffic_share),
            share_text(result.eplb.traffic_share),
        )
        if share is not None:
            message += f", tokens changing GPU between layers {share} (EPLB {eplb_share})"
        if no_traffic is not None:
            weight = spec.placement.traffic_weight
            message = (
                f"trafficWeight {weight:g} ignored, transitions unavailable "
                f"({no_traffic.reason}: {no_traffic}): {message}"
            )
            return true(ConditionType.PLACEMENT_SOLVED, "SolvedWithoutTraffic", message)
        return true(ConditionType.PLACEMENT_SOLVED, "Solved", message)

    def rolled_out_update(
        self, in_service: Published | None, decision: Decision
    ) -> ConditionUpdate:
        if in_service is None:
            return false(ConditionType.ROLLED_OUT, decision.reason, decision.message)
        return true(ConditionType.ROLLED_OUT, decision.reason, decision.message)

    def ready_update(
        self, spec: MoEDeploymentSpec, in_service: Published | None, decision: Decision
    ) -> ConditionUpdate:
        if spec.rollout.mode is RolloutMode.PROPOSE:
            return true(ConditionType.READY, "ProposalPublished", decision.message)
        if in_service is None:
            return false(ConditionType.READY, decision.reason, decision.message)
        return true(
            ConditionType.READY,
            "PlacementInService",
            f"placement {in_service.hash} v{in_service.version}",
        )


def share_text(share: float) -> str | None:
    """A traffic share (0..1, NaN without transitions) as a percentage, or None."""
    return percent_text(100 * share) if math.isfinite(share) else None


def gpu_nodes(index: Mapping[Any, Iterable[NodeGPUs]]) -> list[NodeGPUs]:
    return list(index.get(None, []))
