"""SGLang plugin: the operator's placement applied live, and SGLang's routing counts exported.

Loaded by SGLang's general-plugin loader (entry point ``sglang.srt.plugins: moeplace``) in every
process. :func:`register` hooks the end of ``ModelRunner.forward``, the forward-pass boundary
where SGLang's own EPLBManager rebalances. There, every ``MOEPLACE_CHECK_EVERY`` passes, each
rank polls the mounted ConfigMap (:class:`~moeplace_serving.watcher.PlacementWatcher`) and the
ranks agree on a version with :class:`~moeplace_serving.switch.LockStepSwitch` over
``torch.distributed``'s default group (the world SGLang's ExpertLocationUpdater moves weights
over): all ranks switch at the same pass or none does. A switch builds
``ExpertLocationMetadata.init_by_mapping`` from the placement's ``--init-expert-location`` rows
and runs ``ExpertLocationUpdater.update`` over the MoE layers in chunks of
``--eplb-rebalance-layers-per-chunk`` (back to back, within the one boundary).

Environment: ``MOEPLACE_PLACEMENT_DIR`` (the ConfigMap mount; the plugin stays inactive without
it), ``MOEPLACE_CHECK_EVERY`` (forward passes between agreements, default 16),
``MOEPLACE_METRICS_PORT`` (``/metrics`` of rank r on port + r; off when unset),
``MOEPLACE_MODEL`` (the ``model`` label, default ``model``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from moeplace_serving.engines.common import EngineShape
from moeplace_serving.metrics import ServingMetrics
from moeplace_serving.switch import LockStepSwitch
from moeplace_serving.torch_collective import TorchCollective
from moeplace_serving.watcher import PlacementWatcher
from placement import Placement
from placement.formats import to_sglang

log = logging.getLogger(__name__)

ENV_DIR = "MOEPLACE_PLACEMENT_DIR"
ENV_CHECK_EVERY = "MOEPLACE_CHECK_EVERY"
ENV_METRICS_PORT = "MOEPLACE_METRICS_PORT"
ENV_MODEL = "MOEPLACE_MODEL"
FORWARD_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.forward"

_live: dict[int, LivePlacement] = {}  # id(ModelRunner) -> its controller


def register() -> None:
    """SGLang general-plugin entry point: hook the end of every forward pass."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not os.environ.get(ENV_DIR):
        log.info("moeplace: %s not set, live placement off", ENV_DIR)
        return
    HookRegistry.register(FORWARD_TARGET, _after_forward, HookType.AFTER)


def _after_forward(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``ModelRunner.forward``: returns ``result`` unchanged."""
    if getattr(runner, "is_draft_worker", False):
        return result
    live = _live.get(id(runner))
    if live is None:
        live = _live[id(runner)] = LivePlacement.from_runner(runner)
    live.on_forward_pass_end()
    return result


def sglang_shape(model_config: Any, moe_layer_ids: list[int]) -> EngineShape:
    """The running SGLang's expert layout: its model's expert-location config, the MoE layers
    that hold routed-expert weights, ``--ep-num-redundant-experts``, EP size, a2a backend."""
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation
    from sglang.srt.runtime_context import get_exec, get_parallel

    config = ModelConfigForExpertLocation.from_model_config(model_config)
    if config is None:
        raise ValueError("moeplace: this SGLang model has no expert-location config (not MoE?)")
    moe = get_exec().moe
    return EngineShape(
        engine="sglang",
        hidden_layers=config.num_layers,
        moe_layer_ids=tuple(sorted(moe_layer_ids)),
        experts=config.num_logical_experts,
        redundant_experts=moe.ep_num_redundant_experts,
        ep_size=get_parallel().ep_size,
        redundant_flag="--ep-num-redundant-experts",
        # DeepEP loads only the first of two copies of an expert on one GPU
        same_gpu_copies_ok=moe.moe_a2a_backend != "deepep",
    )


class LivePlacement:
    """One rank's placement controller: watch, agree, move weights with SGLang's updater, count
    routing. ``get_model`` returns the module whose ``routed_experts_weights_of_layer``
    ({hidden layer: [tensor [local slots, ...]]}) SGLang's updater moves."""

    def __init__(
        self,
        model_config: Any,
        get_model: Callable[[], Any],
        directory: Path,
        check_every: int = 16,
        model_name: str = "model",
        metrics_port: int | None = None,
    ) -> None:
        from sglang.srt.eplb.expert_location_updater import ExpertLocationUpdater
        from sglang.srt.runtime_context import get_parallel

        self.model_config, self.get_model = model_config, get_model
        self.shape = sglang_shape(model_config, list(get_model().routed_experts_weights_of_layer))
        parallel = get_parallel()
        # as SGLang's EPLBManager: TP rank for the weight mover, MoE EP rank for the dispatch map
        self.rank, self.ep_rank, self.nnodes = (
            parallel.tp_rank,
            parallel.moe_ep_rank,
            parallel.nnodes,
        )
        # the ranks of one attention-TP group hold the same tokens: the first one counts them
        self.counts_tokens = parallel.attn_tp_rank == 0
        self.metrics = ServingMetrics(
            model_name, len(self.shape.moe_layer_ids), self.shape.experts, rank=self.rank
        )
        if metrics_port is not None:
            self.metrics.serve(metrics_port + self.rank, addr="0.0.0.0")
        self.watcher = PlacementWatcher(directory, expect=self.shape, metrics=self.metrics)
        self.switch = LockStepSwitch(
            TorchCollective(),
            self.watcher,
            mover=self.apply,
            check_every=check_every,
            metrics=self.metrics,
        )
        self.updater = ExpertLocationUpdater()
        self.passes = 0
        _start_recording()

    @classmethod
    def from_runner(cls, runner: Any) -> LivePlacement:
        port = os.environ.get(ENV_METRICS_PORT)
        return cls(
            runner.model_config,
            lambda: runner.model,
            Path(os.environ[ENV_DIR]),
            check_every=int(os.environ.get(ENV_CHECK_EVERY, "16")),
            model_name=os.environ.get(ENV_MODEL, "model"),
            metrics_port=int(port) if port else None,
        )

    def on_forward_pass_end(self) -> None:
        """Count this pass's routing; on check passes, poll and switch in lock-step."""
        if self.counts_tokens:
            self._count_routing()
        self.passes += 1
        if self.passes % self.switch.check_every == 0:
            self.watcher.poll()
        self.switch.at_step(self.passes)

    def apply(self, old: Placement | None, new: Placement) -> None:
        """Move this rank's expert weights to ``new`` with SGLang's own updater (every rank
        calls this at the same pass: the updater's point-to-point transfers pair up)."""
        from sglang.srt.eplb.expert_location import ExpertLocationMetadata
        from sglang.srt.runtime_context import get_exec

        rows = to_sglang(new, self.shape.hidden_layers)["physical_to_logical_map"]
        metadata = ExpertLocationMetadata.init_by_mapping(
            self.model_config, rows, moe_ep_rank=self.ep_rank
        )
        weights = self.get_model().routed_experts_weights_of_layer
        for chunk in _chunks(sorted(weights), get_exec().moe.eplb_rebalance_layers_per_chunk):
            self.updater.update(weights, metadata, chunk, nnodes=self.nnodes, rank=self.rank)
        log.info(
            "moeplace: rank %d moved to placement %s (%s)",
            self.rank,
            new.content_hash(),
            new.strategy,
        )

    def _count_routing(self) -> None:
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        counts = routing_counts(
            get_global_expert_distribution_recorder(),
            get_global_expert_location_metadata(),
            self.shape.moe_layer_ids,
        )
        if counts is not None:
            self.metrics.add_expert_tokens(counts)


def routing_counts(
    recorder: Any, metadata: Any, moe_layer_ids: tuple[int, ...]
) -> npt.NDArray[np.int64] | None:
    """[MoE layers, E] this rank's tokens per logical expert in the forward pass that just
    ended, from SGLang's expert distribution recorder (``get_current_pass_count_buffer``: its
    select-experts counts per physical slot, reset when the next pass starts) mapped through
    the serving physical-to-logical map; None when the recorder did not count this pass."""
    import torch

    buffers = [recorder.get_current_pass_count_buffer(h) for h in moe_layer_ids]
    if any(b is None for b in buffers):
        return None
    physical = torch.stack(buffers).cpu().numpy()  # one device-to-host copy per pass
    p2l = metadata.physical_to_logical_map_cpu.numpy()[list(moe_layer_ids)]
    return logical_counts(physical, p2l, metadata.num_logical_experts)


def logical_counts(
    physical: npt.NDArray[np.integer], physical_to_logical: npt.NDArray[np.integer], experts: int
) -> npt.NDArray[np.int64]:
    """[L, P] tokens per physical slot -> [L, E] tokens per logical expert (copies summed)."""
    layers, _ = physical.shape
    flat = physical_to_logical.astype(np.int64) + (np.arange(layers) * experts)[:, None]
    summed = np.bincount(flat.ravel(), weights=physical.ravel(), minlength=layers * experts)
    return summed.reshape(layers, experts).round().astype(np.int64)


def _start_recording() -> None:
    """Start SGLang's expert distribution recorder, as its EPLBManager does (a no-op recorder
    without ``--expert-distribution-recorder-mode`` refuses to start: routing counts stay 0)."""
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

    recorder = get_global_expert_distribution_recorder()
    if recorder.recording:
        return
    try:
        recorder.start_record()
    except Exception as err:  # the no-op recorder raises on every call
        log.warning("moeplace: SGLang's expert distribution recorder is off (%s)", err)


def _chunks(layer_ids: list[int], size: int | None) -> Iterator[list[int]]:
    step = size or len(layer_ids)
    for start in range(0, len(layer_ids), step):
        yield layer_ids[start : start + step]
