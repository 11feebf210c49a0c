"""Lock-step placement switch: every rank changes placement at the same forward step.

At a step boundary each rank contributes the newest version its watcher accepted. With one
all-reduce of ``[newest, -newest]`` (min) the ranks learn the smallest and largest newest
version. If all agree, that version is the target; if not, the target is the smallest (the
newest version every rank has seen) and a second all-reduce checks that every rank still keeps
it. Only then do the ranks move the expert weights that must move (``mover``), meet at a
barrier and switch: no step ever runs on a placement that some rank has not loaded.

When the collective fails (a rank died, or hangs past the collective's timeout) before the
barrier completes, every live rank keeps the placement it had and never switches again on its
own (``failure`` says why; the group must be restarted). The one window left: rank 0 dying
while it answers the barrier, after some ranks got the answer. The mover must leave the old
placement servable until the barrier (the stand-in's only loads copies). Fault tests kill a
rank at a point of the switch with ``MOEPLACE_SERVING_KILL_AT`` (``before-agree``,
``after-agree``, ``after-move``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moeplace_serving.collective import Collective
from moeplace_serving.metrics import ServingMetrics
from moeplace_serving.watcher import PlacementVersion
from placement import Placement

KILL_AT_ENV = "MOEPLACE_SERVING_KILL_AT"
_log = logging.getLogger(__name__)


def _kill_if_asked(point: str) -> None:
    """SIGKILL this rank at ``point`` of a switch when ``MOEPLACE_SERVING_KILL_AT`` names it."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class VersionSource(Protocol):
    """What the switch needs from a watcher."""

    @property
    def latest(self) -> PlacementVersion | None: ...

    def get(self, version: int) -> PlacementVersion | None: ...


@dataclass(frozen=True)
class Move:
    """One expert copy a GPU must fetch before a switch; ``source_gpu`` -1: from the checkpoint
    (no GPU held that expert in the old placement)."""

    layer: int
    slot: int
    expert: int
    source_gpu: int


def plan_moves(old: Placement | None, new: Placement, gpu: int) -> list[Move]:
    """Copies that ``gpu`` must load to serve ``new``: its slots whose expert it did not hold in
    the same layer under ``old`` (all of its slots when ``old`` is None)."""
    S = new.slots_per_gpu
    mine = new.table[:, gpu * S : (gpu + 1) * S]  # [L, S]
    moves = []
    for layer, row in enumerate(mine):
        held = set() if old is None else set(old.table[layer, gpu * S : (gpu + 1) * S].tolist())
        for offset, expert in enumerate(row.tolist()):
            if expert not in held:
                source = -1 if old is None else _holder(old, layer, expert)
                moves.append(Move(layer, gpu * S + offset, expert, source))
    return moves


def _holder(old: Placement, layer: int, expert: int) -> int:
    slots = np.flatnonzero(old.table[layer] == expert)
    return int(slots[0]) // old.slots_per_gpu if slots.size else -1


Mover = Callable[[Placement | None, Placement], None]


@dataclass(frozen=True)
class SwitchEvent:
    """A completed switch: at ``step``, from ``old_version`` to ``new_version``."""

    step: int
    old_version: int
    new_version: int
    agree_s: float
    move_s: float
    total_s: float


class LockStepSwitch:
    """Decide at each step boundary which placement this rank uses, in agreement with all ranks.

    ``initial``: placement (version 0) used until all ranks have a file; ``check_every``: agree
    every N steps (1: every step; one int all-reduce per check when nothing changes).
    """

    def __init__(
        self,
        collective: Collective,
        source: VersionSource,
        mover: Mover | None = None,
        initial: Placement | None = None,
        check_every: int = 1,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.collective, self.source, self.mover = collective, source, mover
        self.check_every, self.metrics = check_every, metrics
        self.active: PlacementVersion | None = (
            PlacementVersion(0, initial, "initial") if initial is not None else None
        )
        self.events: list[SwitchEvent] = []
        self.failure: Exception | None = None  # the collective's error that ended switching

    @property
    def active_version(self) -> int:
        return self.active.version if self.active is not None else 0

    def at_step(self, step: int) -> PlacementVersion | None:
        """Call at the start of every step on every rank; returns the placement to use."""
        if step % self.check_every or self.failure is not None:
            return self.active
        try:
            return self._switch(step)
        except (OSError, RuntimeError) as error:  # socket errors, timeouts; gloo's errors
            self.failure = error
            _log.warning("placement switching stopped, keeping v%d: %s", self.active_version, error)
            return self.active

    def _switch(self, step: int) -> PlacementVersion | None:
        start = time.perf_counter()
        latest = self.source.latest
        if latest is not None and latest.version > self.active_version:
            _kill_if_asked("before-agree")
        target = self._agree()
        if target is None:
            return self.active
        _kill_if_asked("after-agree")
        agreed = time.perf_counter()
        if self.mover is not None:
            self.mover(self.active.placement if self.active else None, target.placement)
        _kill_if_asked("after-move")
        moved = time.perf_counter()
        self.collective.barrier()
        done = time.perf_counter()
        self.events.append(
            SwitchEvent(
                step,
                self.active_version,
                target.version,
                agreed - start,
                moved - agreed,
                done - start,
            )
        )
        self.active = target
        if self.metrics is not None:
            self.metrics.switch_seconds.observe(done - start)
            self.metrics.active_version.set(target.version)
        return self.active

    def _agree(self) -> PlacementVersion | None:
        """The version all ranks will switch to now, or None to stay."""
        latest = self.source.latest
        newest = latest.version if latest is not None else 0
        low, neg_high = self.collective.all_reduce_min([newest, -newest])
        if low <= self.active_version:
            return None
        if low == -neg_high:
            assert latest is not None  # every rank's newest is low > 0
            return latest
        mine = self.source.get(low)
        [everyone] = self.collective.all_reduce_min([1 if mine is not None else 0])
        return mine if everyone else None
