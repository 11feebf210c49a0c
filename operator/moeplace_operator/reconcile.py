"""One level-based reconcile of a MoEDeployment, in the order of its flow: observe
(``observe``: spec, placement in service, GPU group, load), decide (``decide``: the plan in the
solver pool, roll out or not), act (``act``: one atomic ConfigMap write, the target's
pod-template annotation, Events), report (``status``, the projection, and one patch). Every
blocking call runs in a worker thread; the event loop only awaits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from moeplace_operator import act, decide, metrics, observe
from moeplace_operator.build import Published, proposal_configmap_name
from moeplace_operator.loadsource import LoadData, MetricsUnavailableError, scale_transitions
from moeplace_operator.nodes import GPUGroup, NodeGPUs
from moeplace_operator.runtime import Context, DegradedError
from moeplace_operator.spec import (
    ConditionType,
    MoEDeploymentSpec,
    PlacementSummary,
)
from moeplace_operator.status import (
    ConditionUpdate,
    build_drift_message,
    build_ready,
    build_rolled_out,
    build_solved,
    build_summary,
    degraded_updates,
    false,
)
from placement.policy import RolloutMode

STALE_GROUP_ATTEMPTS = 3  # solves per pass while the EP group keeps changing under them


class Reconcile(Context):
    """One pass; ``run`` is the order of the steps."""

    async def run(self) -> None:
        generation = self.generation  # the live body may move on while we work
        status = act.last_status(self)
        in_service = await observe.read_in_service(self)
        summary = status.placement  # kept as it was when degraded
        try:
            updates, summary = await self.converge_on_stable_group(
                observe.read_spec(self), in_service
            )
        except DegradedError as degraded:
            metrics.ERRORS.labels(degraded.reason).inc()
            self.logger.info("degraded: %s", degraded)  # info: warnings become Events each tick
            act.announce_degradation(self, status, degraded)
            kept = in_service.hash if in_service else None
            updates = [*degraded.updates, *degraded_updates(degraded.reason, str(degraded), kept)]
        await act.write_status(self, status, generation, updates, summary)

    async def converge_on_stable_group(
        self, spec: MoEDeploymentSpec, in_service: Published | None
    ) -> tuple[list[ConditionUpdate], PlacementSummary]:
        """``converge``, again on the live Nodes when the EP group changed while it solved:
        the stale plan is dropped, never published."""
        for _ in range(STALE_GROUP_ATTEMPTS):
            try:
                return await self.converge(spec, in_service)
            except observe.StaleGroupError as stale:
                metrics.STALE_PLANS.inc()
                self.logger.info("plan dropped: %s; solving again", stale)
                self.runtime.plans.pop(self.key, None)
                self.nodes = stale.nodes
        message = f"the EP group changed during each of {STALE_GROUP_ATTEMPTS} solves"
        update = false(ConditionType.GPUS_PROFILED, "NodesChanging", message)
        raise DegradedError("NodesChanging", message, [update])

    async def converge(
        self, spec: MoEDeploymentSpec, in_service: Published | None
    ) -> tuple[list[ConditionUpdate], PlacementSummary]:
        group, gpu_update = observe.gpu_group(self, spec, in_service)
        observed = await observe.read_load(self, spec)
        load, metrics_update, no_traffic = await self.transitions(spec, observed)
        gpu_update = await self.speed_drift(spec, observed, group, gpu_update)
        mode = spec.rollout.mode
        pinned = (
            await observe.read_pinned(self, spec, group, load)
            if mode is RolloutMode.PINNED
            else None
        )
        current = in_service.placement if in_service else None
        result, solved_at = await decide.plan_for(self, spec, group, load, current)
        observe.check_group_unchanged(self, spec, group, in_service)
        choice = decide.choose(spec, group, result, pinned, in_service, self.now)
        decision = choice.decision
        if mode is not RolloutMode.AUTO:
            proposal = result.solution.placement
            name = proposal_configmap_name(self.name)
            await act.publish(self, name, "proposal", proposal, group)
        if decision.roll:
            in_service = await act.roll_out(self, choice.candidate, group, decision)
        else:
            act.note_refusal(self, decision, choice.candidate.content_hash())
            in_service = await act.record_group(self, in_service, group)
        if spec.rollout.target and in_service:
            await act.sync_target(self, spec, in_service.hash)
        shown = (
            choice.evaluation if decision.roll or mode is RolloutMode.PROPOSE else result.current
        )
        summary = build_summary(
            name=self.name,
            spec=spec,
            group=group,
            result=result,
            in_service=in_service,
            shown=shown,
            window=load.window,
            gain=choice.gain,
            solved_at=solved_at,
        )
        updates = [
            gpu_update,
            metrics_update,
            build_solved(spec, result, no_traffic),
            build_rolled_out(in_service, decision),
            false(ConditionType.DEGRADED, "AsExpected"),
            build_ready(spec, in_service, decision),
        ]
        return updates, summary

    async def transitions(
        self, spec: MoEDeploymentSpec, observed: observe.ObservedLoad
    ) -> tuple[LoadData, ConditionUpdate, MetricsUnavailableError | None]:
        """With ``trafficWeight > 0``: the load with its layer-to-layer transitions (scaled to
        it), or the load without them and why. Missing or bad transitions never degrade the
        object: the placement is solved without the traffic term, the MetricsAvailable and
        PlacementSolved messages say why, and a Warning Event (once per cause) too."""
        load, update = observed.data, observed.update
        if spec.placement.traffic_weight <= 0:
            return load, update, None
        try:
            source, raw = await observe.read_transitions(
                self, spec, observed.prometheus, observed.configmap
            )
            transitions, factor = scale_transitions(raw, load.load, spec.model.top_k)
        except MetricsUnavailableError as missing:
            act.announce_missing_transitions(self, spec, missing)
            message = f"{update.message}; transitions unavailable ({missing.reason}): {missing}"
            return load, replace(update, message=message), missing
        self.events.clear(self.key, act.TRANSITIONS_UNAVAILABLE)
        message = f"{update.message}; transitions from {source} (x{factor:.3g} to the load)"
        return replace(load, transitions=transitions), replace(update, message=message), None

    async def speed_drift(
        self,
        spec: MoEDeploymentSpec,
        observed: observe.ObservedLoad,
        group: GPUGroup,
        update: ConditionUpdate,
    ) -> ConditionUpdate:
        """With a Prometheus load and ``gpus.speedDriftThresholdPercent > 0``: GPUsProfiled
        False (``SpeedDrift``) while some GPU's measured relative speed departs from its label
        by more than the threshold; a Warning Event and a re-profile request on the affected
        Nodes once per change of the set of drifting GPUs. Too little data says nothing, and
        any failure here is logged, never raised: it must not stop the placement."""
        threshold = spec.gpus.speed_drift_threshold_percent / 100
        try:
            found = None
            if observed.prometheus is not None and threshold > 0:
                found = await observe.measure_drift(self, spec, observed.prometheus, group)
            if found is None:
                metrics.forget_drift(self.namespace, self.name)
                return update
            drifting = found.beyond(threshold)
            metrics.SPEED_DRIFT.labels(self.namespace, self.name).set(100 * found.largest)
            metrics.SPEED_DRIFT_GPUS.labels(self.namespace, self.name).set(len(drifting))
            if not drifting:
                act.drift_gone(self)
                return update
            message = build_drift_message(spec, group, found, drifting)
            message = f"{message}; {await act.announce_drift(self, group, drifting, message)}"
        except asyncio.CancelledError:
            raise
        except Exception as error:  # MetricsUnavailableError included: no claim, no failure
            self.logger.info("speed drift not measured: %s", error)
            return update
        if group.profiled:
            return false(ConditionType.GPUS_PROFILED, "SpeedDrift", message)
        return replace(update, message=f"{update.message}; {message}")


def gpu_nodes(index: Mapping[Any, Iterable[NodeGPUs]]) -> list[NodeGPUs]:
    return list(index.get(None, []))
