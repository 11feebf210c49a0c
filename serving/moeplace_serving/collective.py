"""The small collective interface the lock-step switch needs, and a light backend for CI.

``Collective`` reduces short vectors of Python ints over all ranks (every rank passes a vector of
the same length and gets the element-wise result) and offers a barrier. Two backends:

* :class:`LoopbackCollective` (here): TCP over loopback or a LAN, star topology, rank 0 reduces
  and answers. No dependencies; used by the tests and the serving stand-in.
* :class:`moeplace_serving.torch_collective.TorchCollective`: ``torch.distributed`` (gloo on CPU,
  NCCL on GPU); torch is imported lazily there.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Protocol

_LEN = struct.Struct("!I")
_OPS: dict[str, Callable[[Sequence[int]], int]] = {"min": min, "max": max, "sum": sum}
_OP_CODES = {name: code for code, name in enumerate(_OPS)}


class Collective(Protocol):
    """Element-wise all-reduce of int vectors over ``world_size`` ranks, and a barrier."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce_min(self, values: Sequence[int]) -> list[int]: ...

    def all_reduce_max(self, values: Sequence[int]) -> list[int]: ...

    def all_reduce_sum(self, values: Sequence[int]) -> list[int]: ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


def _send(sock: socket.socket, op: int, values: Sequence[int]) -> None:
    payload = struct.pack(f"!B{len(values)}q", op, *values)
    sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        try:
            chunk = sock.recv(size - len(buf))
        except TimeoutError as error:
            raise TimeoutError(
                f"no answer from a collective peer within {sock.gettimeout():g} s: "
                "a rank is stuck or its host is gone"
            ) from error
        if not chunk:
            raise ConnectionError("peer closed the collective connection")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[int, list[int]]:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    payload = _recv_exact(sock, size)
    count = (size - 1) // 8
    op, *values = struct.unpack(f"!B{count}q", payload)
    return op, list(values)


class LoopbackCollective:
    """Star-topology TCP collective: rank 0 listens on ``(host, port)``, the others connect.

    Each reduction is one round trip per non-zero rank (a few tens of µs on loopback). Ranks
    must call the same operations in the same order, as with any collective library.
    ``timeout_s`` bounds joining; ``op_timeout_s`` bounds each operation's wait for a peer
    (a dead rank's closed socket fails at once; a stuck rank or a vanished host fails after
    it, with ``TimeoutError``, instead of hanging the others mid-switch). A failed operation
    closes this rank's sockets, so the ranks waiting on it fail at once too (rank 0's peers
    wait on rank 0), and every later operation raises ``ConnectionError``: a rank left alone
    must never reduce its own values as if they were everyone's.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        port: int,
        host: str = "127.0.0.1",
        timeout_s: float = 60,
        op_timeout_s: float = 120,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self._rank, self._world = rank, world_size
        self._peers: list[socket.socket] = []
        self._failure: str | None = None
        if rank == 0:
            self._peers = _accept_peers(host, port, world_size - 1, timeout_s)
        else:
            self._peers = [_connect(host, port, rank, timeout_s)]
        for sock in self._peers:
            sock.settimeout(op_timeout_s)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def all_reduce_min(self, values: Sequence[int]) -> list[int]:
        return self._reduce("min", values)

    def all_reduce_max(self, values: Sequence[int]) -> list[int]:
        return self._reduce("max", values)

    def all_reduce_sum(self, values: Sequence[int]) -> list[int]:
        return self._reduce("sum", values)

    def barrier(self) -> None:
        self._reduce("sum", [])

    def close(self) -> None:
        for sock in self._peers:
            sock.close()
        self._peers = []

    def _reduce(self, op: str, values: Sequence[int]) -> list[int]:
        if self._failure is not None:
            raise ConnectionError(f"collective closed after a failure: {self._failure}")
        try:
            return self._exchange(op, values)
        except (OSError, RuntimeError, struct.error) as error:
            self._failure = str(error)
            self.close()
            raise

    def _exchange(self, op: str, values: Sequence[int]) -> list[int]:
        code = _OP_CODES[op]
        if self._rank != 0:
            _send(self._peers[0], code, values)
            return _recv(self._peers[0])[1]
        rows = [list(values)]
        for sock in self._peers:
            peer_op, peer_values = _recv(sock)
            if peer_op != code or len(peer_values) != len(values):
                raise RuntimeError(f"collective mismatch: rank 0 does {op}, a peer differs")
            rows.append(peer_values)
        result = [_OPS[op](column) for column in zip(*rows, strict=True)]
        for sock in self._peers:
            _send(sock, code, result)
        return result


def _accept_peers(host: str, port: int, count: int, timeout_s: float) -> list[socket.socket]:
    """Accept ``count`` peers on rank 0; returns their sockets ordered by rank 1..count."""
    with socket.create_server((host, port), reuse_port=False) as server:
        server.settimeout(timeout_s)
        by_rank: dict[int, socket.socket] = {}
        while len(by_rank) < count:
            sock, _ = server.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            (peer_rank,) = struct.unpack("!I", _recv_exact(sock, 4))
            by_rank[peer_rank] = sock
    return [by_rank[r] for r in sorted(by_rank)]


def _connect(host: str, port: int, rank: int, timeout_s: float) -> socket.socket:
    """Connect to rank 0, retrying until it listens or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack("!I", rank))
    return sock
