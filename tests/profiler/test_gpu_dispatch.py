"""The MoE stack's dispatch bookkeeping (gpu/moe_stack.py), simulated with numpy all-to-alls:
every token-expert pair reaches a GPU that holds the expert, comes back to its token, and
copies share an expert's tokens evenly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gpu"))

from moe_stack import copies_table, layer_dispatch


def simulate(ids: np.ndarray, row: list[int], world: int, S: int, experts: int) -> np.ndarray:
    B, K = ids.shape
    rng = np.random.default_rng(0)
    h = rng.normal(size=(B, 3))
    plans = layer_dispatch(ids, row, world, S, experts)
    per = B // world
    sends = [h[r * per : (r + 1) * per][p["send_tok"]] for r, p in enumerate(plans)]
    seg = [np.split(s, np.cumsum(p["send_splits"])[:-1]) for s, p in zip(sends, plans, strict=True)]
    backs = []
    for d, p in enumerate(plans):
        recv = np.concatenate([seg[r][d] for r in range(world)])
        assert [len(seg[r][d]) for r in range(world)] == p["recv_splits"]
        xs = recv[p["perm"]]
        local = np.repeat(np.arange(S), p["counts"])
        expert = np.asarray(row)[d * S + local]
        ys = xs * (expert + 1)[:, None]
        back = np.empty_like(recv)
        back[p["perm"]] = ys
        backs.append(np.split(back, np.cumsum(p["recv_splits"])[:-1]))
    y = np.zeros_like(h)
    for r, p in enumerate(plans):
        ret = np.concatenate([backs[d][r] for d in range(world)])
        np.add.at(y[r * per : (r + 1) * per], p["send_tok"], ret / K)
    return y - (h * (ids + 1).sum(1, keepdims=True) / K)


@pytest.mark.parametrize("world,S", [(2, 36), (4, 18), (2, 32)])
def test_every_pair_round_trips(world: int, S: int) -> None:
    rng = np.random.default_rng(world * S)
    experts, K, B = 64, 6, 512
    ids = np.stack([rng.choice(experts, K, replace=False) for _ in range(B)])
    slots = world * S
    row = list(range(experts)) + list(rng.choice(experts, slots - experts, replace=False))
    row = list(rng.permutation(row))
    err = simulate(ids, row, world, S, experts)
    assert np.abs(err).max() < 1e-9


def test_copies_split_evenly() -> None:
    row = [0, 1, 2, 3, 0, 1, 2, 0]  # expert 0 has 3 copies, 1 and 2 two, 3 one
    ids = np.array([[0], [0], [0], [0], [0], [0], [1], [1], [3], [3]] * 2)
    plans = layer_dispatch(ids, row, 2, 4, 4)
    table, counts = copies_table(row, 4)
    assert counts.tolist() == [3, 2, 2, 1]
    assert sorted(table[0].tolist()) == [0, 4, 7]
    loads = [p["load"] for p in plans]
    assert sum(loads) == ids.size
    # expert 0: 12 assignments over 3 copies (slots 0, 4, 7) -> 4 each
    per_slot = np.zeros(8, dtype=int)
    for d, p in enumerate(plans):
        per_slot[d * 4 : d * 4 + 4] += p["counts"]
    assert per_slot[[0, 4, 7]].tolist() == [4, 4, 4]


def test_missing_expert_is_refused() -> None:
    with pytest.raises(ValueError, match="without a copy"):
        copies_table([0, 0, 1, 1], 3)
