"""The rollout policy: whether a proposed placement replaces the one in service (hysteresis,
cooldown, move budget). Pure, no clocks (``now`` is passed in): the operator decides with it on
every pass and the simulator replays the same rules over simulated time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class RolloutMode(StrEnum):
    AUTO = "Auto"
    PROPOSE = "Propose"
    PINNED = "Pinned"


@dataclass(frozen=True)
class RolloutRules:
    """The thresholds a rollout must pass (the operator's ``spec.rollout``, parsed)."""

    mode: RolloutMode = RolloutMode.AUTO
    min_improvement_percent: float = 5.0
    cooldown: timedelta = timedelta(minutes=10)
    max_moved_experts: int | None = None


@dataclass(frozen=True)
class Decision:
    roll: bool
    reason: str
    message: str


def gain_percent(before: float, after: float) -> float:
    """Predicted straggler-time improvement of ``after`` over ``before``, in percent."""
    return 0.0 if before <= 0 else 100.0 * (before - after) / before


def decide_rollout(
    *,
    rules: RolloutRules,
    current_hash: str | None,
    proposed_hash: str,
    gain: float,
    moved: int,
    last_rollout: datetime | None,
    now: datetime,
) -> Decision:
    """Whether the proposed placement replaces the one in service.

    ``current_hash`` is None when nothing valid for this shape and EP group is in service:
    then the proposal goes out whatever the gain (except in Propose mode). In Pinned mode the
    "proposal" is the pinned placement, which goes out whenever it differs."""
    if rules.mode is RolloutMode.PROPOSE:
        return Decision(False, "ProposeMode", f"proposal {proposed_hash} published, not rolled out")
    if current_hash == proposed_hash:
        return Decision(False, "UpToDate", f"placement {proposed_hash} is in service")
    if current_hash is None:
        return Decision(True, "InitialPlacement", f"first placement {proposed_hash} for this group")
    if rules.mode is RolloutMode.PINNED:
        return Decision(True, "PinnedChanged", f"pinned placement {proposed_hash} rolled out")
    if gain <= rules.min_improvement_percent:
        return Decision(
            False,
            "GainBelowThreshold",
            f"predicted gain {gain:.2f}% <= minImprovementPercent "
            f"{rules.min_improvement_percent:g}%: keeping {current_hash}",
        )
    if last_rollout is not None and now - last_rollout < rules.cooldown:
        wait = rules.cooldown - (now - last_rollout)
        return Decision(
            False,
            "CooldownActive",
            f"gain {gain:.2f}% but the last rollout was "
            f"{int((now - last_rollout).total_seconds())}s ago; next possible in "
            f"{int(wait.total_seconds())}s",
        )
    if rules.max_moved_experts is not None and moved > rules.max_moved_experts:
        return Decision(
            False,
            "TooManyMoves",
            f"gain {gain:.2f}% needs {moved} moved expert copies > maxMovedExperts "
            f"{rules.max_moved_experts}",
        )
    return Decision(
        True, "GainAboveThreshold", f"predicted gain {gain:.2f}%: rolling out {proposed_hash}"
    )
