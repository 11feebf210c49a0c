"""Our DeepSeek EPLB (placement.solvers.eplb) against the engines' own copies of it.

deepseek-ai/EPLB's eplb.py is not on PyPI; SGLang 0.5.23 ships it as
``sglang/srt/eplb/eplb_algorithms/deepseek.py`` ("copied from github.com/deepseek-ai/EPLB"),
torch code, so that file stands for DeepSeek's: all three arrays (phy2log, log2phy, logcnt) must
be equal, including tie order. vLLM 0.33.0's ``DefaultEplbPolicy.rebalance_experts`` is a numpy
port that returns phy2log only (its ``preserve_intragpu_slots`` step runs only when given the
old map; not used here). It sorts with numpy's unstable argsort and divides in float64, so on
equal loads it may order ties differently from DeepSeek: on tie-free loads phy2log must be
equal; on loads with ties (the real counts) the replica counts and every layer's per-GPU loads
must be equal, the slot order may differ. Both modules are executed from the wheels' files
(engine_sources.py) without their packages' serving stacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_sources import sglang_deepseek, vllm_default_policy
from moeplace_cli.main import app
from typer.testing import CliRunner

from placement.formats import loads
from placement.gpus import GPUProfile
from placement.load import read_counts_csv
from placement.model import Cluster, MoEModelShape
from placement.solvers.eplb import rebalance_experts
from placement.solvers.introsort import descending_order
from placement.validate import duplicate_copies

pytestmark = pytest.mark.engines

COUNTS = Path("/work/shared/data/routing/deepseek-v2-lite-chat/expert_counts.csv")
# (num_groups, num_nodes, num_gpus, redundant) on DeepSeek-V2-Lite's 64 experts
SETUPS = [(1, 1, 8, 16), (1, 1, 32, 32), (8, 8, 32, 32), (4, 2, 8, 16), (8, 4, 16, 32)]
SGLANG = sglang_deepseek()
VLLM = vllm_default_policy()


@pytest.fixture(scope="module")
def real_counts() -> np.ndarray:
    if not COUNTS.exists():
        pytest.skip(f"{COUNTS} absent: the shared DeepSeek-V2-Lite routing counts are not here")
    counts, _ = read_counts_csv(COUNTS)
    return counts


def sglang_arrays(
    weight: np.ndarray, P: int, groups: int, nodes: int, gpus: int, hierarchical: bool
) -> tuple[np.ndarray, ...]:
    out = SGLANG.rebalance_experts(torch.tensor(weight), P, groups, nodes, gpus, hierarchical)
    return tuple(t.numpy() for t in out)


def vllm_phy2log(weight: np.ndarray, P: int, groups: int, nodes: int, gpus: int) -> np.ndarray:
    return np.asarray(VLLM.rebalance_experts(torch.tensor(weight), P, groups, nodes, gpus).numpy())


def assert_same_arrays(ours: tuple[np.ndarray, ...], theirs: tuple[np.ndarray, ...]) -> None:
    for name, a, b in zip(("phy2log", "log2phy", "logcnt"), ours, theirs, strict=True):
        assert a.shape == b.shape, f"{name}: {a.shape} vs {b.shape}"
        layers = (a != b).reshape(a.shape[0], -1).any(-1)
        assert not layers.any(), f"{name} differs in layers {np.flatnonzero(layers).tolist()}"


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, gpus: int) -> np.ndarray:
    """[L, G] sorted per-GPU loads, each copy load / copies."""
    L, P = phy2log.shape
    out = np.zeros((L, gpus))
    for layer in range(L):
        per_copy = weight[layer] / np.bincount(phy2log[layer], minlength=weight.shape[1])
        out[layer] = np.sort(
            np.bincount(np.arange(P) // (P // gpus), per_copy[phy2log[layer]], gpus)
        )
    return out


def random_setups(seed: int, n: int) -> Iterator[tuple[np.ndarray, int, int, int, int]]:
    rng = np.random.default_rng(seed)
    while n:
        gpus, nodes = int(rng.choice([2, 4, 8, 16])), int(rng.choice([1, 2, 4]))
        groups = int(rng.choice([1, 2, 4, 8]))
        experts = groups * int(rng.choice([2, 4, 8]))
        P = experts + gpus * int(rng.integers(0, 3))
        if gpus % nodes or P % gpus or groups % nodes or experts % nodes:
            continue
        n -= 1
        yield (
            rng.integers(0, int(rng.choice([3, 10, 10**4])), size=(3, experts)),
            P,
            groups,
            nodes,
            gpus,
        )


@pytest.mark.parametrize("hierarchical", [True, False], ids=["hierarchical", "global"])
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: "g{}-n{}-gpu{}-r{}".format(*s))
def test_real_counts_equal_sglang_deepseek(
    real_counts: np.ndarray, setup: tuple[int, int, int, int], hierarchical: bool
) -> None:
    groups, nodes, gpus, redundant = setup
    P = real_counts.shape[1] + redundant
    ours = rebalance_experts(real_counts, P, groups, nodes, gpus, hierarchical=hierarchical)
    assert_same_arrays(ours, sglang_arrays(real_counts, P, groups, nodes, gpus, hierarchical))


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: "g{}-n{}-gpu{}-r{}".format(*s))
def test_real_counts_equal_vllm_up_to_tie_order(
    real_counts: np.ndarray, setup: tuple[int, int, int, int]
) -> None:
    groups, nodes, gpus, redundant = setup
    P = real_counts.shape[1] + redundant
    ours = rebalance_experts(real_counts, P, groups, nodes, gpus)[0]
    theirs = vllm_phy2log(real_counts, P, groups, nodes, gpus)
    count = [np.bincount(row, minlength=64) for row in (*ours, *theirs)]
    assert np.array_equal(count[: len(ours)], count[len(ours) :])
    np.testing.assert_allclose(
        gpu_loads(real_counts, ours, gpus), gpu_loads(real_counts, theirs, gpus)
    )


def test_random_loads_with_ties_equal_sglang_deepseek() -> None:
    cases = 0
    for weight, P, groups, nodes, gpus in random_setups(seed=11, n=150):
        for hierarchical in (True, False):
            ours = rebalance_experts(weight, P, groups, nodes, gpus, hierarchical=hierarchical)
            assert_same_arrays(ours, sglang_arrays(weight, P, groups, nodes, gpus, hierarchical))
            cases += 1
    assert cases == 300


def test_random_tie_free_loads_equal_vllm() -> None:
    differ_with_ties = 0
    for weight, P, groups, nodes, gpus in random_setups(seed=12, n=150):
        distinct = np.random.default_rng(P).permutation(10**6)[: weight.size].reshape(weight.shape)
        ours = rebalance_experts(distinct + 1, P, groups, nodes, gpus)[0]
        assert np.array_equal(ours, vllm_phy2log(distinct + 1, P, groups, nodes, gpus))
        tied = rebalance_experts(weight, P, groups, nodes, gpus)[0]
        differ_with_ties += not np.array_equal(tied, vllm_phy2log(weight, P, groups, nodes, gpus))
    assert differ_with_ties > 0  # the documented difference: vLLM's tie order is numpy's


def test_introsort_order_equals_torch_sort() -> None:
    rng = np.random.default_rng(5)
    for _ in range(500):
        values = rng.integers(0, int(rng.choice([1, 2, 5, 1000])), size=int(rng.integers(1, 300)))
        values = values.astype(np.float32)
        expected = torch.tensor(values).sort(-1, descending=True).indices.tolist()
        assert descending_order(values.tolist()) == expected


def _sglang_file(real_counts: np.ndarray, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    phy2log, log2phy, logcnt = sglang_arrays(real_counts, 96, 8, 8, 32, True)
    obj = {"phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(), "logcnt": logcnt.tolist()}
    path = tmp_path / "sglang-eplb.json"
    path.write_text(json.dumps(obj))
    return path, obj


def test_sglang_output_imports_as_it_is(real_counts: np.ndarray, tmp_path: Path) -> None:
    path, obj = _sglang_file(real_counts, tmp_path)
    model = MoEModelShape(moe_layers=26, experts=64, dense_layers_before=1)
    placement = loads(path.read_text(), "eplb", model, 32)
    assert placement.phy2log == obj["phy2log"]
    assert len(duplicate_copies(placement.table, 32)) == 41  # 8 groups on 8 nodes, 32 GPUs


def test_sglang_output_through_moeplace_evaluate(real_counts: np.ndarray, tmp_path: Path) -> None:
    path, _ = _sglang_file(real_counts, tmp_path)
    gpus = tmp_path / "gpus.json"
    gpus.write_text(GPUProfile.from_cluster(Cluster.uniform(32, 4)).to_json())
    runner = CliRunner()
    ran = runner.invoke(app, ["evaluate", "--placement", str(path), "--load", str(COUNTS),
                              "--gpus", str(gpus), "--json"])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert "41 extra copies" in ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["straggler"] >= summary["fluidBound"] > 0
    refused = runner.invoke(app, ["evaluate", "--placement", str(path), "--load", str(COUNTS),
                                  "--gpus", str(gpus), "--engine", "sglang-deepep"])  # fmt: skip
    assert refused.exit_code != 0 and "DeepEP" in refused.stderr
