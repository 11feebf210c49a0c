"""The torch.distributed backend (skipped where torch is missing, as in CI): gloo on CPU, NCCL
with one GPU per rank when the machine has two or more."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

import pytest

torch = pytest.importorskip("torch")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, port: int, backend: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from moeplace_serving.torch_collective import TorchCollective

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    if backend == "nccl":
        torch.cuda.set_device(rank)
    coll = TorchCollective(backend)
    results = [
        coll.all_reduce_min([rank + 5, -rank]),
        coll.all_reduce_max([rank + 5, -rank]),
        coll.all_reduce_sum([rank, 2**40]),
    ]
    coll.barrier()
    start = time.perf_counter()
    for _ in range(100):
        coll.all_reduce_min([rank, -rank])
    per_call_us = (time.perf_counter() - start) / 100 * 1e6
    coll.close()
    out.put((rank, results, per_call_us))


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_torch_collective(backend: str) -> None:
    if backend == "nccl" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"NCCL needs {WORLD} GPUs")
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, backend, out)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    for _, results, _ in got:
        assert results == [[5, -1], [6, 0], [1, 2**41]]
    print(
        f"\n{backend}: int all-reduce {max(us for *_, us in got):.0f} µs per call ({WORLD} ranks)"
    )
