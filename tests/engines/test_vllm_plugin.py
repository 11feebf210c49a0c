"""The vLLM plugin against vLLM 0.33.0's own EPLB code on CPU torch (gloo).

(a) the policy's map through vLLM's ``compute_logical_maps`` for every EP rank, and the plugin
    loaded by vLLM's ``load_general_plugins``; (b) a placement change reaches every rank (gloo
    processes) and vLLM's ``rearrange_expert_weights_inplace`` with its torch_gloo communicator
    puts each expert's weights in the slot the placement names; (c) mismatched files refused,
    the map in service kept.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moeplace_serving.collective import LoopbackCollective
from moeplace_serving.configdir import write_atomic
from moeplace_serving.engines import vllm as plugin
from moeplace_serving.engines.common import EngineShape
from moeplace_serving.metrics import ServingMetrics

from placement import MoEModelShape, Placement

pytestmark = pytest.mark.engines

LAYERS, EXPERTS, RANKS, SLOTS_PER_RANK = 3, 8, 4, 3  # 12 slots: 4 redundant
SLOTS = RANKS * SLOTS_PER_RANK
MODEL = MoEModelShape(name="tiny", moe_layers=LAYERS, experts=EXPERTS, top_k=2)


def _placement(seed: int, layers: int = LAYERS) -> Placement:
    """A valid placement: each layer's experts shuffled over the ranks, hot ones copied."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(layers):
        while True:
            copies = rng.choice(EXPERTS, SLOTS - EXPERTS, replace=False)
            row = rng.permutation(np.concatenate([np.arange(EXPERTS), copies]))
            per_rank = row.reshape(RANKS, SLOTS_PER_RANK)
            if all(np.unique(r).size == SLOTS_PER_RANK for r in per_rank):
                rows.append(row)
                break
    model = MODEL if layers == LAYERS else MODEL.model_copy(update={"moe_layers": layers})
    return Placement.from_table(np.stack(rows), model, RANKS, "test")


def _publish(directory: Path, placement: Placement, version: int) -> None:
    write_atomic(directory, {"placement.json": placement.to_json(), "version": str(version)})


def _trivial_map() -> torch.Tensor:
    from vllm.distributed.eplb.eplb_state import EplbState

    row = EplbState.build_initial_global_physical_to_logical_map(EXPERTS, SLOTS - EXPERTS)
    return torch.tensor([list(row)] * LAYERS, dtype=torch.int64)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _engine_shape() -> EngineShape:
    return EngineShape(
        engine="vLLM",
        hidden_layers=LAYERS,
        moe_layer_ids=tuple(range(LAYERS)),
        experts=EXPERTS,
        redundant_experts=SLOTS - EXPERTS,
        ep_size=RANKS,
        redundant_flag="num_redundant_experts",
    )


def _single_rank_source(directory: Path, metrics: ServingMetrics) -> plugin.PlacementSource:
    collective = LoopbackCollective(0, 1, port=_free_port())
    shape = _engine_shape()
    return plugin.PlacementSource(directory, shape, collective, metrics)


def _rebalance(policy: type, old: torch.Tensor) -> torch.Tensor:
    weight = torch.ones((LAYERS, EXPERTS), dtype=torch.int64)
    result: torch.Tensor = policy.rebalance_experts(weight, SLOTS, 1, 1, RANKS, old)
    return result


def test_policy_map_passes_vllm_logical_maps_for_every_rank(tmp_path: Path) -> None:
    from vllm.distributed.eplb.eplb_state import compute_logical_maps

    placement = _placement(1)
    _publish(tmp_path, placement, 1)
    policy = plugin.policy_for(_single_rank_source(tmp_path, ServingMetrics("tiny", 3, 8)))
    new = _rebalance(policy, _trivial_map())
    log2phy, counts = compute_logical_maps(new, EXPERTS)
    assert counts.tolist() == placement.replica_counts().tolist()
    table = placement.table
    for rank in range(RANKS):
        mine = range(rank * SLOTS_PER_RANK, (rank + 1) * SLOTS_PER_RANK)
        for layer in range(LAYERS):
            for slot in mine:
                expert = int(table[layer, slot])
                # vLLM's dispatch table lists this rank's slot among the expert's replicas
                assert slot in log2phy[layer, expert, : counts[layer, expert]].tolist()


def test_plugin_loads_through_vllm_entry_points_once() -> None:
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert getattr(EplbState, "_moeplace_patched", False)
    wrapped = EplbState.add_model
    plugin.register()  # a second load in the same process
    assert EplbState.add_model is wrapped


def test_mismatched_files_are_refused_and_the_map_in_service_kept(tmp_path: Path) -> None:
    metrics = ServingMetrics("tiny", LAYERS, EXPERTS)
    policy = plugin.policy_for(_single_rank_source(tmp_path, metrics))
    good = _placement(2)
    _publish(tmp_path, good, 1)
    served = _rebalance(policy, _trivial_map())
    assert served.tolist() == good.phy2log
    refused = [
        _placement(3, layers=LAYERS + 1),  # a dense layer counted as MoE
        # no redundant slots where vLLM runs with SLOTS - EXPERTS of them
        Placement.from_table([list(range(EXPERTS))] * LAYERS, MODEL, RANKS, "no copies"),
        # the right slots over 2 ranks instead of the EP size 4
        Placement.from_table(_trivial_map(), MODEL, 2, "ep size 2"),
    ]
    for version, bad in enumerate(refused, start=2):
        _publish(tmp_path, bad, version)
        assert _rebalance(policy, served).tolist() == good.phy2log
    [invalid] = [
        s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "moe_placement_reloads_total" and s.labels["result"] == "invalid"
    ]
    assert invalid == pytest.approx(len(refused))


def test_counter_sums_replicas_into_logical_experts() -> None:
    metrics = ServingMetrics("tiny", LAYERS, EXPERTS)
    counter = plugin.ExpertTokenCounter(metrics, flush_steps=2)
    p2l = _trivial_map()  # slots 8..11 copy experts 0..3
    load = torch.arange(LAYERS * SLOTS, dtype=torch.int32).reshape(LAYERS, SLOTS)
    counter.observe(load, p2l)
    assert metrics.expert_tokens().sum() == 0  # not flushed yet
    counter.observe(load, p2l)
    expected = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    for layer in range(LAYERS):
        np.add.at(expected[layer], p2l[layer].numpy(), 2 * load[layer].numpy())
    assert metrics.expert_tokens().tolist() == expected.tolist()


def _cpu_gloo_communicator(group: object) -> object:
    """vLLM's EplbCommunicator interface over gloo P2P on CPU tensors.

    vLLM's own ``TorchDistGlooStagedEplbCommunicator`` stages GPU tensors through the CPU and
    stops without an accelerator: its ``execute`` calls ``torch.accelerator.current_stream()``
    (vllm/distributed/eplb/eplb_communicator.py:232 in 0.33.0), which raises "Found no NVIDIA
    driver". This transport sends the same (tensor, peer) lists with ``batch_isend_irecv``;
    the transfer plan and buffer moves around it are vLLM's (``move_to_buffer``,
    ``move_from_buffer``).
    """
    from vllm.distributed.eplb.eplb_communicator import EplbCommunicator

    class CpuGloo(EplbCommunicator):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ops: list[dist.P2POp] = []

        def add_send(self, tensors: list[torch.Tensor], dst_rank: int, expert_id: int) -> None:
            self.ops += [
                dist.P2POp(dist.isend, t, group=group, group_peer=dst_rank) for t in tensors
            ]

        def add_recv(self, tensors: list[torch.Tensor], src_rank: int, expert_id: int) -> None:
            self.ops += [
                dist.P2POp(dist.irecv, t, group=group, group_peer=src_rank) for t in tensors
            ]

        def execute(self) -> None:
            ops, self.ops = self.ops, []
            for request in dist.batch_isend_irecv(ops) if ops else []:
                request.wait()

    return CpuGloo()


def _rank_main(rank: int, port: int, directory: str, plans: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    from moeplace_serving.torch_collective import TorchCollective
    from vllm.distributed.eplb import eplb_state
    from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace

    # Without a GPU vLLM detects no platform, and the unspecified one reports pinned memory
    # (PIN_MEMORY, read at import); vLLM's CPU platform does not. _commit_eplb_maps reads it.
    eplb_state.PIN_MEMORY = False
    group = dist.group.WORLD
    shape = _engine_shape()
    source = plugin.PlacementSource(Path(directory), shape, TorchCollective(group=group))
    policy = plugin.policy_for(source)
    current = _trivial_map()
    mine = slice(rank * SLOTS_PER_RANK, (rank + 1) * SLOTS_PER_RANK)
    # each slot's weights: two tensors filled with the id of the expert it holds
    weights = [
        [current[layer, mine].double()[:, None].repeat(1, w).contiguous() for w in (5, 3)]
        for layer in range(LAYERS)
    ]
    buffer = [torch.empty_like(w) for w in weights[0]]
    communicator = _cpu_gloo_communicator(group)
    # the fields of vLLM's EplbModelState that move_in and vLLM's _commit_eplb_maps use
    model_state = SimpleNamespace(
        physical_to_logical_map=current.clone(),
        model=SimpleNamespace(expert_weights=weights),
        expert_buffer=buffer,
        communicator=communicator,
        logical_to_physical_map=torch.full((LAYERS, EXPERTS, SLOTS - EXPERTS + 1), -1),
        logical_replica_count=torch.zeros((LAYERS, EXPERTS), dtype=torch.int64),
    )
    state = SimpleNamespace(model_states={"m": model_state}, _moeplace_model_key="m")
    seen = []
    for version, plan in enumerate(plans, start=1):
        if rank == 0:
            _publish(Path(directory), Placement.model_validate_json(plan), version)
        dist.barrier()
        if version == 1:  # at model load: the plugin's move-in
            assert plugin.move_in(state, source, group)
            new = model_state.physical_to_logical_map
        else:  # at a rearrangement step: vLLM calls the policy, then moves
            new = _rebalance(policy, current)
            rearrange_expert_weights_inplace(current, new, weights, buffer, group, communicator)
        current = new.clone()
        held = [[w[:, 0].long().tolist() for w in layer] for layer in weights]
        counts = model_state.logical_replica_count.tolist()
        seen.append({"map": new[:, mine].tolist(), "held": held, "counts": counts})
    Path(out, f"rank{rank}.json").write_text(__import__("json").dumps(seen))
    dist.destroy_process_group()


def test_placement_change_moves_weights_on_every_rank_with_vllm_code(tmp_path: Path) -> None:
    import json

    plans = [_placement(10), _placement(11)]
    directory = tmp_path / "cm"
    mp.start_processes(
        _rank_main,
        args=(_free_port(), str(directory), [p.to_json() for p in plans], str(tmp_path)),
        nprocs=RANKS,
        start_method="spawn",
    )
    for rank in range(RANKS):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        mine = slice(rank * SLOTS_PER_RANK, (rank + 1) * SLOTS_PER_RANK)
        for plan, step in zip(plans, seen, strict=True):
            wanted = plan.table[:, mine].tolist()
            assert step["map"] == wanted
            for layer in range(LAYERS):
                assert step["held"][layer] == [wanted[layer], wanted[layer]]
        # vLLM's commit (at move-in) derived the replica counts of the first placement
        assert seen[0]["counts"] == plans[0].replica_counts().tolist()
