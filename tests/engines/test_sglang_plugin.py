"""The SGLang plugin against SGLang 0.5.23's own code: its --init-expert-location loader,
ExpertLocationMetadata and static dispatch table, and ExpertLocationUpdater moving expert weights
between 4 rank processes over gloo on CPU.

SGLang's runtime context and the one stand-in, the model (a 4-layer model: 1 dense + 3 MoE,
8 experts, each expert's weights a tensor filled with its expert id), are set up by
``sglang_runtime.TinySGLang`` (shared with e2e/test_closed_loop_engines.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from moeplace_serving.configdir import write_atomic
from moeplace_serving.engines import sglang as plugin
from sglang_runtime import TinySGLang

from placement import InvalidPlacementError, MoEModelShape, Placement
from placement.formats import to_sglang

pytestmark = pytest.mark.engines

E, REDUNDANT, G, HIDDEN, DENSE = 8, 4, 4, 4, 1
P = E + REDUNDANT
S = P // G
MOE_LAYERS = list(range(DENSE, HIDDEN))
MODEL = MoEModelShape(moe_layers=len(MOE_LAYERS), experts=E, dense_layers_before=DENSE)
SGLANG = TinySGLang(
    hidden_layers=HIDDEN, dense_layers=DENSE, experts=E, redundant=REDUNDANT, ep_size=G
)


def moved_placement() -> Placement:
    """Every layer differs from the trivial start (slot s holds s % E) on every GPU."""
    rows = [[(s * 5 + layer) % E for s in range(P)] for layer in range(len(MOE_LAYERS))]
    return Placement.from_table(rows, MODEL, G, "test")


def test_init_expert_location_file_loads_for_every_rank(tmp_path: Path) -> None:
    """(a) the plugin's rows through SGLang's --init-expert-location JSON loader: every rank's
    metadata holds the placement, and its static dispatch sends each expert to a slot of it."""
    from sglang.srt.eplb.expert_location import compute_initial_expert_location_metadata
    from sglang.srt.runtime_context import get_context

    placement = moved_placement()
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps(to_sglang(placement, HIDDEN)))
    SGLANG.install()
    for rank in range(G):
        get_context().override("test", init_expert_location=str(path))
        meta = compute_initial_expert_location_metadata(None, moe_ep_rank=rank)
        table = meta.physical_to_logical_map_cpu.numpy()
        assert table.shape == (HIDDEN, P)
        assert np.array_equal(table[DENSE:], placement.table)
        dispatch = meta.logical_to_rank_dispatch_physical_map.numpy()  # [H, E] slots
        for row, hidden in enumerate(MOE_LAYERS):
            assert np.array_equal(placement.table[row, dispatch[hidden]], np.arange(E))


def test_shape_refuses_what_sglang_would_misread() -> None:
    """(c) the 26-rows-for-27-layers case, slots != experts + redundant, EP size; and DeepEP."""
    SGLANG.install()
    shape = plugin.sglang_shape(None, MOE_LAYERS)
    no_dense = MoEModelShape(moe_layers=HIDDEN - DENSE, experts=E)
    cases = {
        "0 dense + 3 MoE": Placement.from_table(moved_placement().table, no_dense, G, "x"),
        "--ep-num-redundant-experts=8": Placement.from_table(
            [[s % E for s in range(16)]] * 3, MODEL, G, "x"
        ),
        "EP size is 4": Placement.from_table(moved_placement().table, MODEL, 2, "x"),
    }
    for words, bad in cases.items():
        with pytest.raises(InvalidPlacementError, match=re.escape(words)):
            shape.check(bad)
    assert shape.same_gpu_copies_ok
    SGLANG.install(a2a="deepep")
    assert not plugin.sglang_shape(None, MOE_LAYERS).same_gpu_copies_ok


def test_logical_counts_match_sglangs_conversion() -> None:
    """Routing metrics: our physical -> logical sum agrees with SGLang's own."""
    from sglang.srt.eplb.expert_distribution import (
        _convert_global_physical_count_to_logical_count,
    )

    rng = np.random.default_rng(0)
    physical = rng.integers(0, 50, size=(3, P))
    p2l = moved_placement().table
    theirs = _convert_global_physical_count_to_logical_count(
        torch.tensor(physical)[None], 3, E, torch.tensor(p2l)
    )[0].numpy()
    assert np.array_equal(plugin.logical_counts(physical, p2l, E), theirs)
    assert plugin.logical_counts(physical, p2l, E).sum() == physical.sum()


def test_routing_counts_from_sglangs_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing metrics from SGLang's own expert distribution recorder (stat mode): the
    physical expert ids its select_experts hook saw in one pass, per logical expert. Its
    per-pass gatherer allocates on ``sglang.srt.utils.get_device()``, which raises without an
    accelerator (expert_distribution.py:580): here it is pointed at the CPU."""
    from sglang.srt.eplb import expert_distribution
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.runtime_context import get_context

    SGLANG.install()
    get_context().override(
        "test", expert_distribution_recorder_mode="stat", expert_distribution_recorder_buffer_size=8
    )
    monkeypatch.setattr(expert_distribution, "get_device", lambda: "cpu")
    rows = to_sglang(moved_placement(), HIDDEN)["physical_to_logical_map"]
    meta = ExpertLocationMetadata.init_by_mapping(None, rows, moe_ep_rank=0)
    recorder = ExpertDistributionRecorder.init_new(meta, rank=0)
    recorder.start_record()
    rng = np.random.default_rng(1)
    slots = {h: rng.integers(0, P, size=(16, 2)) for h in MOE_LAYERS}  # 16 tokens, top-2
    with recorder.with_forward_pass(1, None):
        for h in MOE_LAYERS:
            with recorder.with_current_layer(h):
                recorder.on_select_experts(topk_ids=torch.tensor(slots[h]))
    counts = plugin.routing_counts(recorder, meta, tuple(MOE_LAYERS))
    assert counts is not None
    for row, h in enumerate(MOE_LAYERS):
        expected = np.bincount(moved_placement().table[row][slots[h].ravel()], minlength=E)
        assert counts[row].tolist() == expected.tolist()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, port: int, directory: str, results: str) -> None:
    """One SGLang rank: trivial start, placement v1 live, then a mismatched v2 refused."""
    import torch.distributed as dist
    from sglang.srt.eplb.expert_location import (
        ExpertLocationMetadata,
        get_global_expert_location_metadata,
        set_global_expert_location_metadata,
    )

    SGLANG.install(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=G)
    set_global_expert_location_metadata(
        ExpertLocationMetadata.init_by_mapping(None, SGLANG.trivial_rows(), moe_ep_rank=rank)
    )
    model = SGLANG.model(rank)
    live = plugin.LivePlacement(None, lambda: model, Path(directory), check_every=1)
    for _ in range(2):
        live.on_forward_pass_end()
    after_v1 = model.snapshot()
    active_v1 = live.switch.active_version
    if rank == 0:
        bad = Placement.from_table([[s % E for s in range(16)]] * 3, MODEL, G, "bad")
        write_atomic(Path(directory), {"placement.json": bad.to_json(), "version": "2"})
    dist.barrier()
    for _ in range(2):
        live.on_forward_pass_end()
    meta = get_global_expert_location_metadata()
    out = {
        "after_v1": after_v1,
        "active_v1": active_v1,
        "active_end": live.switch.active_version,
        "weights_end": model.snapshot(),
        "p2l_end": meta.physical_to_logical_map_cpu.tolist(),
        "dispatch_end": meta.logical_to_rank_dispatch_physical_map.tolist(),
        "invalid": live.metrics.reloads_invalid._value.get(),
    }
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_live_placement_moves_weights_on_every_rank_over_gloo(tmp_path: Path) -> None:
    """(b) v1 reaches all 4 ranks and SGLang's ExpertLocationUpdater puts each expert's weights
    in the slots v1 names; (c) a v2 with the wrong slot count is refused by every rank, which
    keep serving v1 with SGLang's dispatch still pointing at slots holding each expert."""
    directory, results = tmp_path / "placement", tmp_path / "results"
    results.mkdir()
    v1 = moved_placement()
    write_atomic(directory, {"placement.json": v1.to_json(), "version": "1"})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(
        _rank_main, args=(_free_port(), str(directory), str(results)), nprocs=G, join=True
    )
    for rank in range(G):
        out: dict[str, Any] = json.loads((results / f"rank{rank}.json").read_text())
        mine = v1.table[:, rank * S : (rank + 1) * S]
        for row, hidden in enumerate(MOE_LAYERS):
            weights, ids = out["after_v1"][str(hidden)]
            assert np.array_equal(np.asarray(weights), np.repeat(mine[row][:, None], 4, axis=1))
            assert ids == mine[row].tolist()
        assert out["active_v1"] == 1
        assert out["active_end"] == 1
        assert out["invalid"] == pytest.approx(1.0)
        assert out["weights_end"] == out["after_v1"]
        p2l = np.asarray(out["p2l_end"])
        assert np.array_equal(p2l[DENSE:], v1.table)
        dispatch = np.asarray(out["dispatch_end"])
        for hidden in MOE_LAYERS:
            assert np.array_equal(p2l[hidden, dispatch[hidden]], np.arange(E))


def test_sglangs_plugin_loader_finds_and_registers_the_plugin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The installed entry point, through SGLang's own loader, hooks ModelRunner.forward when
    MOEPLACE_PLACEMENT_DIR is set, and nothing without it."""
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    register, dist = found["moeplace"]
    assert dist == "moeplace-serving"
    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.delenv(plugin.ENV_DIR, raising=False)
    register()
    assert plugin.FORWARD_TARGET not in HookRegistry._hooks
    monkeypatch.setenv(plugin.ENV_DIR, "/etc/moeplace/placement")
    register()
    [(hook_type, hook, _source)] = HookRegistry._hooks[plugin.FORWARD_TARGET]
    assert hook_type is HookType.AFTER
    assert hook is plugin._after_forward
