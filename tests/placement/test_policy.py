"""The rollout rules the operator and the simulator share."""

from datetime import UTC, datetime, timedelta

import pytest

from placement.policy import Decision, RolloutMode, RolloutRules, decide_rollout, gain_percent

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RULES = RolloutRules(min_improvement_percent=5, cooldown=timedelta(minutes=10))


def decide(**overrides: object) -> Decision:
    args: dict[str, object] = {
        "rules": RULES,
        "current_hash": "old",
        "proposed_hash": "new",
        "gain": 10.0,
        "moved": 3,
        "last_rollout": NOW - timedelta(hours=1),
        "now": NOW,
    }
    return decide_rollout(**{**args, **overrides})  # type: ignore[arg-type]


def test_rolls_out_a_clear_gain() -> None:
    assert decide().roll and decide().reason == "GainAboveThreshold"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"gain": 4.9}, "GainBelowThreshold"),
        ({"last_rollout": NOW - timedelta(minutes=2)}, "CooldownActive"),
        ({"rules": RolloutRules(max_moved_experts=2)}, "TooManyMoves"),
        ({"proposed_hash": "old"}, "UpToDate"),
        ({"rules": RolloutRules(mode=RolloutMode.PROPOSE)}, "ProposeMode"),
    ],
)
def test_refusals(overrides: dict[str, object], reason: str) -> None:
    decision = decide(**overrides)
    assert not decision.roll and decision.reason == reason


def test_first_placement_ignores_thresholds() -> None:
    decision = decide(current_hash=None, gain=0.0, rules=RolloutRules(max_moved_experts=0))
    assert decision.roll and decision.reason == "InitialPlacement"


def test_pinned_rolls_whenever_it_differs() -> None:
    decision = decide(gain=-30.0, rules=RolloutRules(mode=RolloutMode.PINNED))
    assert decision.roll and decision.reason == "PinnedChanged"


def test_gain_is_the_relative_straggler_reduction() -> None:
    assert gain_percent(200.0, 150.0) == pytest.approx(25.0)
    assert gain_percent(0.0, 1.0) == 0.0  # nothing measured yet: no gain claimed
