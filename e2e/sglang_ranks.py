"""The SGLang rank processes of e2e/test_closed_loop_engines.py: each runs the SGLang plugin's
real code path per forward pass on routing replayed through SGLang's own recorder.

A module of its own so that the spawned processes import only this (not the test module and
the e2e conftest it imports).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moeplace_serving.engines import sglang as plugin
from moeplace_serving.standin import DEFAULT_ROUTING, Trace

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "engines"))
from sglang_runtime import TinySGLang


@dataclass(frozen=True)
class RankRun:
    """What every rank process runs: the model and EP layout, the replayed prompt slice and
    tokens per pass (all ranks together), passes between version agreements, pause per pass,
    the ports (gloo; /metrics of rank r on ``metrics_port + r``), the ``model`` label, and the
    folder with the placement copies (``rank-<r>/``), the stop file and the results."""

    shape: TinySGLang
    prompts: tuple[int, int]
    tokens: int
    check_every: int
    step_s: float
    gloo_port: int
    metrics_port: int
    model_name: str
    tmp: str


def main(rank: int, run: RankRun) -> None:
    """One SGLang rank (``torch.multiprocessing.spawn``'s entry): replay routing through SGLang's
    recorder, run the plugin each pass until the test asks all ranks to stop; then write what it
    served to ``<run.tmp>/result-<rank>.json``."""
    import torch.distributed as dist
    from sglang.srt.eplb import expert_distribution
    from sglang.srt.eplb.expert_location import (
        ExpertLocationMetadata,
        get_global_expert_location_metadata,
        set_global_expert_location_metadata,
    )

    run.shape.install(
        rank,
        dp_attention=True,
        expert_distribution_recorder_mode="stat",
        expert_distribution_recorder_buffer_size=8,
    )
    # its per-pass gatherer allocates on get_device(), which raises without an accelerator
    expert_distribution.get_device = lambda: "cpu"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{run.gloo_port}",
        rank=rank,
        world_size=run.shape.ep_size,
    )
    trivial = ExpertLocationMetadata.init_by_mapping(
        None, run.shape.trivial_rows(), moe_ep_rank=rank
    )
    set_global_expert_location_metadata(trivial)
    expert_distribution.set_global_expert_distribution_recorder(
        expert_distribution.ExpertDistributionRecorder.init_new(trivial, rank=rank)
    )
    model = run.shape.model(rank)
    live = plugin.LivePlacement(
        None,
        lambda: model,
        Path(run.tmp, f"rank-{rank}"),
        check_every=run.check_every,
        model_name=run.model_name,
        metrics_port=run.metrics_port,
    )
    versions, switched_at = _serve(rank, live, run)
    meta = get_global_expert_location_metadata()
    active = live.switch.active
    out = {
        "versions": versions,
        "switched_at": switched_at,
        "events": [vars(e) for e in live.switch.events],
        "hash": active.placement.content_hash() if active else None,
        "weights": model.snapshot(),
        "p2l": meta.physical_to_logical_map_cpu.tolist(),
        "dispatch": meta.logical_to_rank_dispatch_physical_map.tolist(),
        "counted": int(live.metrics.expert_tokens().sum()),
        "invalid": live.metrics.reloads_invalid._value.get(),
    }
    Path(run.tmp, f"result-{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _serve(
    rank: int, live: plugin.LivePlacement, run: RankRun
) -> tuple[list[int], dict[int, float]]:
    """Forward passes until rank 0 sees ``<run.tmp>/stop``: returns the version in service
    after each pass and the wall time each version was switched to."""
    import torch.distributed as dist
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location_dispatch import (
        ExpertLocationDispatchInfo,
        topk_ids_logical_to_physical,
    )

    trace, recorder = Trace(DEFAULT_ROUTING, run.prompts), get_global_expert_distribution_recorder()
    versions: list[int] = []
    switched_at: dict[int, float] = {}
    while True:
        mine = slice(rank, None, run.shape.ep_size)  # this rank's tokens
        ids = trace.batch(len(versions), run.tokens)[1][mine]
        with recorder.with_forward_pass(len(versions), None):
            for row, hidden in enumerate(run.shape.moe_layers):
                with recorder.with_current_layer(hidden):
                    logical = torch.from_numpy(ids[:, row].astype(np.int64))
                    info = ExpertLocationDispatchInfo.init_new(hidden)
                    recorder.on_select_experts(topk_ids=topk_ids_logical_to_physical(logical, info))
        live.on_forward_pass_end()
        version = live.switch.active_version
        if not versions or version != versions[-1]:
            switched_at[version] = time.time()
        versions.append(version)
        done = torch.tensor([int(rank == 0 and Path(run.tmp, "stop").exists())])
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
        if done.item():
            return versions, switched_at
        time.sleep(run.step_s)
