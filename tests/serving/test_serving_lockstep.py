"""Lock-step switch with several rank processes whose placement files arrive at different steps.

Rank ``r`` writes each version into its own kubelet-style directory at its own step (as the
kubelet on different nodes would, up to a minute apart). Every rank must switch at the same
step, and only to a version that every rank has.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from moeplace_serving.collective import Collective, LoopbackCollective
from moeplace_serving.configdir import write_atomic
from moeplace_serving.switch import LockStepSwitch, plan_moves
from moeplace_serving.watcher import PlacementWatcher, ServingShape
from serving_helpers import tiny_placement

from placement import Placement

WORLD = 3
STEPS = 20
# rank -> [(step, version)]: when that rank's kubelet publishes the version.
ARRIVALS = {
    0: [(2, 1), (8, 2), (14, 3), (16, 5)],
    1: [(5, 1), (8, 2), (10, 3), (16, 4), (18, 5)],
    2: [(3, 1), (12, 2), (13, 3), (16, 4), (17, 5)],
}
# v1 once the last rank has it (5); v2 at 12 (rank 1 already has v3 but keeps v2); v3 at 14;
# at 16 rank 0 skipped v4, so nobody moves until all have v5 (18).
EXPECTED_SWITCHES = [(5, 1), (12, 2), (14, 3), (18, 5)]

RankResult = tuple[int, list[tuple[int, int]], list[tuple[int, int]], list[float], int]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback(rank: int, port: int) -> Collective:
    return LoopbackCollective(rank, WORLD, port)


def torch_gloo(rank: int, port: int) -> Collective:
    import os

    from moeplace_serving.torch_collective import TorchCollective

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    return TorchCollective("gloo")


def _rank_main(
    rank: int,
    port: int,
    root: Path,
    make: Callable[[int, int], Collective],
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    collective = make(rank, port)
    directory = root / f"rank-{rank}"
    watcher = PlacementWatcher(directory, ServingShape(3, 4, WORLD))
    held: dict[int, set[int]] = {}
    missing = 0

    def mover(old: Placement | None, new: Placement) -> None:
        nonlocal missing
        gpu = rank
        for move in plan_moves(old, new, gpu):
            held.setdefault(move.layer, set()).add(move.expert)
        for layer, row in enumerate(new.table.reshape(new.model.moe_layers, new.num_gpus, -1)):
            missing += len(set(row[gpu].tolist()) - held.get(layer, set()))
            held[layer] = set(row[gpu].tolist())

    switch = LockStepSwitch(
        collective, watcher, mover, initial=tiny_placement(0, gpus=WORLD, slots=2)
    )
    mover(None, tiny_placement(0, gpus=WORLD, slots=2))
    used, seen = [], []
    for step in range(STEPS):
        for at, version in ARRIVALS[rank]:
            if at == step:
                placement = tiny_placement(version, shift=version, gpus=WORLD, slots=2)
                write_atomic(directory, {"placement.json": placement.to_json()})
        watcher.poll()
        latest = watcher.latest
        active = switch.at_step(step)
        assert active is not None
        used.append((step, active.version))
        seen.append((step, latest.version if latest else 0))
    times = [event.total_s for event in switch.events]
    collective.close()
    out.put((rank, used, seen, times, missing))


def run_ranks(make: Callable[[int, int], Collective], root: Path) -> list[RankResult]:
    ctx = mp.get_context("forkserver")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, root, make, out)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    return results


def _check(results: list[RankResult]) -> None:
    used_by_rank = [used for _, used, _, _, _ in results]
    assert all(used == used_by_rank[0] for used in used_by_rank), "ranks used different versions"
    switches = [
        (s, v)
        for (s, v), (_, prev) in zip(used_by_rank[0][1:], used_by_rank[0], strict=False)
        if v != prev
    ]
    assert switches == EXPECTED_SWITCHES
    for _, used, seen, times, missing in results:
        assert missing == 0, "a rank switched to a slot whose expert it had not loaded"
        for (_, version), (_, newest) in zip(used, seen, strict=True):
            assert version <= newest
        assert len(times) == len(EXPECTED_SWITCHES)
    times = sorted(t for *_, rank_times, _ in results for t in rank_times)
    print(
        f"\nlock-step switch with {WORLD} ranks (agree + move + barrier, incl. waiting for the "
        f"slowest rank): median {times[len(times) // 2] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms"
    )


def test_lockstep_loopback(tmp_path: Path) -> None:
    _check(run_ranks(loopback, tmp_path))


def test_lockstep_torch_gloo(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    _check(run_ranks(torch_gloo, tmp_path))


def test_a_stuck_rank_times_out_instead_of_hanging_the_others() -> None:
    """Rank 1 joins, then never takes part: rank 0's all-reduce fails after op_timeout_s."""
    import threading
    import time

    port = free_port()
    joined = threading.Event()

    def stuck_rank() -> None:
        peer = LoopbackCollective(1, 2, port)
        joined.set()
        time.sleep(2.0)  # alive, silent: what a wedged rank or a vanished host looks like
        peer.close()

    thread = threading.Thread(target=stuck_rank)
    thread.start()
    rank0 = LoopbackCollective(0, 2, port, op_timeout_s=0.3)
    assert joined.wait(5)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer from a collective peer within 0\.3 s"):
        rank0.all_reduce_min([1])
    waited = time.monotonic() - start
    rank0.close()
    thread.join()
    assert 0.25 < waited < 1.5
