"""The GPU scripts' pure parts added for the heavy-expert run: co-tenant names (gpu/kernels.py),
slot assignment and the world-1 dispatch (gpu/moe_stack.py), and the expert-shape agreement
between call 1 and the placements (gpu/make_placements.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gpu"))

from kernels import HOLD_CAP_US, SHAPES, CoTenantSpec, expert_bytes
from make_placements import expert_shape_of
from moe_stack import assign_slots, layer_dispatch


@pytest.mark.parametrize(
    "name",
    [
        "k8",
        "k66",
        "k132-on50-off150",
        "k26-hold",
        "k52-hold",
        "k26-hold-solo",
        "k26-hold-solo-carve34",
        "k26-hold-nocarve-on2000",
    ],
)
def test_cotenant_names_round_trip(name: str) -> None:
    spec = CoTenantSpec.parse(name)
    assert spec.name == name
    assert CoTenantSpec.parse(spec.as_dict()["name"]) == spec  # type: ignore[arg-type]


def test_hold_specs() -> None:
    hold = CoTenantSpec.parse("k52-hold")
    assert (hold.hold, hold.carveout, hold.solo, hold.on_us) == (True, True, False, HOLD_CAP_US)
    assert hold.carveout_sms == 52 and hold.duty == 1.0
    assert CoTenantSpec.parse("k26-hold-solo-carve34").carveout_sms == 34
    assert CoTenantSpec.parse("k26-hold-carve26").name == "k26-hold"  # one name per setting
    assert CoTenantSpec.parse("k26-hold-nocarve").carveout_sms is None
    assert CoTenantSpec.parse("k66").carveout_sms is None
    assert CoTenantSpec.parse("k66").as_dict() == {
        "name": "k66",
        "k": 66,
        "onUs": 200.0,
        "offUs": 0.0,
    }


@pytest.mark.parametrize("bad", ["k27-hold", "k26-solo", "k26-carve30", "k26-hold-off5", "k8-x"])
def test_bad_cotenants_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        CoTenantSpec.parse(bad)


def test_expert_bytes() -> None:
    assert expert_bytes("deepseek-v2-lite") == 3 * 2048 * 1408 * 2
    assert expert_bytes("mixtral-8x7b") == 3 * 4096 * 14336 * 2
    assert set(SHAPES) == {"deepseek-v2-lite", "mixtral-8x7b", "deepseek-v3"}


def test_slots_hold_their_experts_and_match_the_dispatch() -> None:
    rng = np.random.default_rng(3)
    experts, K, B, world, S = 64, 6, 256, 2, 36
    ids = np.stack([rng.choice(experts, K, replace=False) for _ in range(B)])
    row = list(rng.permutation(list(range(experts)) + list(rng.choice(experts, 8, replace=False))))
    slot = assign_slots(ids, row, experts)
    assert (np.asarray(row)[slot] == ids.reshape(-1)).all()
    plans = layer_dispatch(ids, row, world, S, experts)
    per_slot = np.bincount(slot, minlength=world * S)
    for d, p in enumerate(plans):
        assert p["counts"] == per_slot[d * S : (d + 1) * S].tolist()


def test_world_one_keeps_every_row() -> None:
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice(64, 6, replace=False) for _ in range(128)])
    (p,) = layer_dispatch(ids, list(rng.permutation(64)), 1, 64, 64)
    assert p["send_splits"] == p["recv_splits"] == [ids.size]
    assert p["load"] == ids.size and sum(p["counts"]) == ids.size


def test_expert_shape_must_match_call1() -> None:
    assert expert_shape_of({}, None) == "deepseek-v2-lite"  # call1.json from before the option
    heavy = {"C": {"expertShape": "mixtral-8x7b"}}
    assert expert_shape_of(heavy, None) == "mixtral-8x7b"
    assert expert_shape_of(heavy, "mixtral-8x7b") == "mixtral-8x7b"
    with pytest.raises(SystemExit, match="profile again"):
        expert_shape_of(heavy, "deepseek-v2-lite")
