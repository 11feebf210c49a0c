"""vLLM plugin (``vllm.general_plugins`` entry point ``moeplace``): vLLM's EPLB serves the
operator's placement, and vLLM's own EPLB load counters become our routing metrics.

Selecting the policy: ``EPLBConfig.policy`` is ``Literal["default"]`` in vLLM 0.33.0, so
``--eplb-config '{"policy": "moeplace"}'`` is refused by vLLM's config validation, and adding a
key to ``EPLB_POLICIES`` cannot be selected. Replacing ``EPLB_POLICIES["default"]`` would change
what "default" means for every user of that table. Instead the plugin wraps
``EplbState.add_model``: after vLLM has built its state (and picked its policy), and only when
``MOEPLACE_PLACEMENT_DIR`` is set in the worker's environment, that state's ``policy`` is set to
a policy bound to this process's placement watcher. Without the variable the plugin does nothing.

What happens, per worker process (one per EP rank):

* ``add_model`` (model load): vLLM loads the weights in its trivial layout
  (``build_initial_global_physical_to_logical_map``: experts in order, then redundant copies
  ``i % E``; it has no per-layer form, so the loader cannot take our map). If the mounted
  directory holds a valid placement, every rank agrees on its version (one all-reduce on the EP
  CPU group, :class:`moeplace_serving.switch.LockStepSwitch`) and vLLM's
  ``rearrange_expert_weights_inplace`` moves the weights to it, then vLLM's ``_commit_eplb_maps``
  commits the maps: the first request is served on the placement.
* every rearrangement (``step_interval`` steps, see ``--eplb-config``): vLLM calls
  ``policy.rebalance_experts`` on every rank; ours agrees on the newest version all ranks have
  accepted and returns its ``phy2log`` (vLLM then moves the weights itself). Until a version is
  accepted, or when a file is refused, it returns the map in service (nothing moves).
* vLLM's map rows are MoE layers only (``num_moe_layers``, in model order; dense layers have no
  row), the same 0-based MoE layers as the placement's rows: row ``l`` is used as is.
* every forward step (``EplbState.step``): ``expert_load_pass`` (tokens per physical slot of this
  rank's batch) is folded into logical experts on the device with the map in use; every
  ``MOEPLACE_METRICS_FLUSH_STEPS`` steps (default 100, one device sync) the sums go to
  ``moe_expert_tokens_total{model, layer, expert}`` (L x E series per pod).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from moeplace_serving.engines.common import EngineShape
from moeplace_serving.metrics import ServingMetrics
from moeplace_serving.switch import LockStepSwitch
from moeplace_serving.watcher import PlacementWatcher
from placement import Placement

log = logging.getLogger(__name__)

PLACEMENT_DIR_ENV = "MOEPLACE_PLACEMENT_DIR"
METRICS_PORT_ENV = "MOEPLACE_METRICS_PORT"  # rank r serves /metrics on port + r
MODEL_ENV = "MOEPLACE_MODEL"  # the `model` label; default: vLLM's model name
FLUSH_ENV = "MOEPLACE_METRICS_FLUSH_STEPS"
_PATCHED = "_moeplace_patched"


class PlacementSource:
    """This rank's watcher, lock-step switch and metrics for one vLLM model."""

    def __init__(
        self,
        directory: Path,
        shape: EngineShape,
        collective: Any,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.shape, self.metrics = shape, metrics
        self.watcher = PlacementWatcher(directory, expect=shape, metrics=metrics)
        self.switch = LockStepSwitch(collective, self.watcher, metrics=metrics)

    def agreed(self) -> Placement | None:
        """Poll the directory, then agree with every rank (collective): the placement all
        ranks serve from now on, or None while none is agreed."""
        self.watcher.poll()
        active = self.switch.at_step(0)
        return active.placement if active is not None else None


def policy_for(source: PlacementSource) -> type[Any]:
    """A vLLM EPLB policy class (``AbstractEplbPolicy``) that returns ``source``'s placement."""
    abstract = importlib.import_module("vllm.distributed.eplb.policy.abstract")
    torch = importlib.import_module("torch")

    class MoeplaceEplbPolicy(abstract.AbstractEplbPolicy):  # type: ignore[misc,name-defined]
        bound: ClassVar[PlacementSource] = source

        @classmethod
        def rebalance_experts(
            cls,
            weight: Any,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: Any = None,
        ) -> Any:
            shape = cls.bound.shape
            if (weight.shape[0], weight.shape[1], num_replicas) != (
                len(shape.moe_layer_ids),
                shape.experts,
                shape.physical_slots,
            ):
                # another model of this engine (a speculative drafter): keep its map
                return old_global_expert_indices
            placement = cls.bound.agreed()
            if placement is None:
                return old_global_expert_indices
            return torch.tensor(placement.phy2log, dtype=torch.int64)

    return MoeplaceEplbPolicy


class ExpertTokenCounter:
    """Per-step logical expert counts from vLLM's ``expert_load_pass``, summed on the device
    and flushed into :class:`ServingMetrics` every ``flush_steps`` steps."""

    def __init__(self, metrics: ServingMetrics, flush_steps: int = 100) -> None:
        self.metrics, self.flush_steps = metrics, flush_steps
        self._sum: Any = None
        self._steps = 0

    def observe(self, load_pass: Any, physical_to_logical: Any) -> None:
        """Add one step: ``load_pass`` [L, P] tokens per physical slot, folded into logical
        experts by ``physical_to_logical`` [L, P] (the map that routed this step)."""
        torch = importlib.import_module("torch")
        if self._sum is None:
            self._sum = torch.zeros(
                (self.metrics.layers, self.metrics.experts),
                dtype=torch.int64,
                device=load_pass.device,
            )
        self._sum.scatter_add_(1, physical_to_logical.long(), load_pass.long())
        self._steps += 1
        if self._steps >= self.flush_steps:
            self.flush()

    def flush(self) -> None:
        if self._sum is None or not self._steps:
            return
        self.metrics.add_expert_tokens(self._sum.cpu().numpy())
        self._sum.zero_()
        self._steps = 0


def register() -> None:
    """Entry point: wrap vLLM's ``EplbState.add_model`` and ``step`` once per process."""
    eplb_state = importlib.import_module("vllm.distributed.eplb.eplb_state")
    cls = eplb_state.EplbState
    if getattr(cls, _PATCHED, False):
        return
    original_add, original_step = cls.add_model, cls.step

    def add_model(self: Any, model: Any, model_config: Any, model_name: Any = None) -> None:
        original_add(self, model, model_config, model_name)
        directory = os.environ.get(PLACEMENT_DIR_ENV)
        if directory and model_name is None:  # vLLM names drafter models only
            attach(self, model, model_config, Path(directory))

    def step(
        self: Any, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None:
        counter: ExpertTokenCounter | None = getattr(self, "_moeplace_counter", None)
        key = getattr(self, "_moeplace_model_key", None)
        if counter is not None and not (is_dummy or is_profile):
            state = self.model_states[key]
            counter.observe(state.expert_load_pass, state.physical_to_logical_map)
        original_step(self, is_dummy, is_profile, log_stats)

    cls.add_model, cls.step = add_model, step
    setattr(cls, _PATCHED, True)


def attach(state: Any, model: Any, model_config: Any, directory: Path) -> PlacementSource:
    """Bind ``state`` (a vLLM ``EplbState`` that just added ``model``) to the placement in
    ``directory``: our policy, routing metrics, and the mounted placement moved in now."""
    if state.is_async:
        # the async worker calls the policy off the main thread, where our version agreement
        # (a collective on the EP CPU group) could interleave with the main thread's
        raise ValueError(
            f"moeplace: {PLACEMENT_DIR_ENV} needs synchronous EPLB: "
            "--eplb-config '{\"use_async\": false, ...}'"
        )
    parallel_state = importlib.import_module("vllm.distributed.parallel_state")
    ep = parallel_state.get_ep_group()
    shape = EngineShape(
        engine="vLLM",
        hidden_layers=model_config.hf_text_config.num_hidden_layers,
        moe_layer_ids=hidden_layer_ids(model),
        experts=model.num_logical_experts,
        redundant_experts=model.num_redundant_experts,
        ep_size=ep.world_size,
        redundant_flag="num_redundant_experts",
    )
    metrics = ServingMetrics(
        os.environ.get(MODEL_ENV, str(model_config.model)),
        len(shape.moe_layer_ids),
        shape.experts,
        rank=ep.rank_in_group,
    )
    port = os.environ.get(METRICS_PORT_ENV)
    if port:
        metrics.serve(int(port) + ep.rank_in_group, addr="0.0.0.0")
    collective = importlib.import_module("moeplace_serving.torch_collective").TorchCollective(
        group=ep.cpu_group
    )
    source = PlacementSource(directory, shape, collective, metrics)
    state.policy = policy_for(source)
    state._moeplace_model_key = model_config.compute_hash()
    state._moeplace_counter = ExpertTokenCounter(metrics, int(os.environ.get(FLUSH_ENV, "100")))
    move_in(state, source, ep.device_group)
    return source


def hidden_layer_ids(model: Any) -> tuple[int, ...]:
    """The decoder-layer index of each of vLLM's MoE layers (``model.moe_layers``, in the
    order of vLLM's map rows), read from their ``layer_name`` (``model.layers.<i>.mlp.experts``)."""
    ids = []
    for layer in model.moe_layers:
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", str(layer.layer_name))
        if found is None:
            raise ValueError(
                f"moeplace: cannot read a decoder layer index from {layer.layer_name!r}"
            )
        ids.append(int(found.group(1)))
    return tuple(ids)


def move_in(state: Any, source: PlacementSource, ep_group: Any) -> bool:
    """If all ranks agree on a placement, move the weights to it with vLLM's own
    ``rearrange_expert_weights_inplace`` and commit vLLM's maps; False if none is agreed."""
    placement = source.agreed()
    if placement is None:
        log.info("moeplace: no placement agreed yet; serving vLLM's initial map")
        return False
    torch = importlib.import_module("torch")
    eplb_state = importlib.import_module("vllm.distributed.eplb.eplb_state")
    execute = importlib.import_module("vllm.distributed.eplb.rebalance_execute")
    model_state = state.model_states[state._moeplace_model_key]
    old = model_state.physical_to_logical_map
    new = torch.tensor(placement.phy2log, dtype=old.dtype, device=old.device)
    execute.rearrange_expert_weights_inplace(
        old,
        new,
        model_state.model.expert_weights,
        model_state.expert_buffer,
        ep_group,
        model_state.communicator,
    )
    eplb_state._commit_eplb_maps(model_state, new_physical_to_logical_map=new)
    log.info("moeplace: placement version %d moved in", source.switch.active_version)
    return True
