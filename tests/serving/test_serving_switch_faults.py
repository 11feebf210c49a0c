"""A serving rank killed during a lock-step switch (issue 13, faults): 3 rank processes on the
loopback collective, version 1 published to every rank at step 3, one rank SIGKILLed at a
point of that switch (``MOEPLACE_SERVING_KILL_AT``, not a sleep). The live ranks must learn
it within a second (not after the collective's 120 s operation timeout: the rank that sees the
dead peer closes its sockets, which fails the others' waits too), keep serving the placement
they had, all the same one, and never switch on their own afterwards."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
from moeplace_serving.collective import LoopbackCollective
from moeplace_serving.configdir import write_atomic
from moeplace_serving.switch import KILL_AT_ENV, LockStepSwitch
from moeplace_serving.watcher import PlacementWatcher, ServingShape
from serving_helpers import tiny_placement
from test_serving_lockstep import free_port

pytestmark = pytest.mark.faults

WORLD, STEPS, PUBLISHED_AT = 3, 8, 3
# rank -> (versions used per step, newest seen at the end, seconds the failing step took,
# the failure's type)
RankResult = tuple[int, list[int], int, float, str]


def _rank_main(
    rank: int,
    port: int,
    root: Path,
    kill: tuple[int, str],
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    if rank == kill[0]:
        os.environ[KILL_AT_ENV] = kill[1]
    collective = LoopbackCollective(rank, WORLD, port)
    directory = root / f"rank-{rank}"
    watcher = PlacementWatcher(directory, ServingShape(3, 4, WORLD))
    switch = LockStepSwitch(
        collective, watcher, lambda old, new: None, initial=tiny_placement(0, gpus=WORLD, slots=2)
    )
    used, failing_step_s = [], 0.0
    for step in range(STEPS):
        if step == PUBLISHED_AT:
            placement = tiny_placement(1, shift=1, gpus=WORLD, slots=2)
            write_atomic(directory, {"placement.json": placement.to_json()})
        watcher.poll()
        started = time.monotonic()
        failed_before = switch.failure is not None
        active = switch.at_step(step)
        if switch.failure is not None and not failed_before:
            failing_step_s = time.monotonic() - started
        assert active is not None
        used.append(active.version)
    latest = watcher.latest.version if watcher.latest else 0
    out.put((rank, used, latest, failing_step_s, type(switch.failure).__name__))


def run_with_kill(root: Path, kill: tuple[int, str]) -> tuple[list[RankResult], int | None]:
    ctx = mp.get_context("forkserver")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, root, kill, out)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    results = sorted(out.get(timeout=60) for _ in range(WORLD - 1))
    for proc in procs:
        proc.join(timeout=10)
    killed = procs[kill[0]].exitcode
    assert all(p.exitcode == 0 for r, p in enumerate(procs) if r != kill[0])
    return results, killed


@pytest.mark.parametrize("point", ["before-agree", "after-agree", "after-move"])
@pytest.mark.parametrize("killed_rank", [0, 2])
def test_a_rank_killed_mid_switch_leaves_the_others_on_one_placement(
    tmp_path: Path, killed_rank: int, point: str
) -> None:
    results, exitcode = run_with_kill(tmp_path, (killed_rank, point))
    assert exitcode == -signal.SIGKILL  # it died at the point, not some other way
    live = [rank for rank, *_ in results]
    assert live == [r for r in range(WORLD) if r != killed_rank]
    for _rank, used, latest, failing_step_s, failure in results:
        assert latest == 1  # each live rank had the new version ...
        assert used == [0] * STEPS  # ... and kept the old one, every step after the failure
        assert failure in {"ConnectionError", "ConnectionResetError", "BrokenPipeError"}
        assert failing_step_s < 5.0  # the operation timeout is 120 s
    learned = max(r[3] for r in results)
    versions = sorted({v for r in results for v in r[1]})
    print(
        f"\nFAULT serving-rank-killed rank={killed_rank} at={point} "
        f"live_ranks_learned_within_s={learned:.3f} versions_used={versions}"
    )
