"""``torch.distributed`` backend of :class:`moeplace_serving.collective.Collective`.

torch is imported when a :class:`TorchCollective` is built, never at module import, so the
serving library installs and type-checks without it (CI has no torch; the backend is exercised
on the GPU machine). Use gloo on CPU and NCCL on GPU; with NCCL the int vectors travel as
CUDA int64 tensors on the rank's current device.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any


class TorchCollective:
    """Element-wise int all-reduce and barrier over an initialised torch process group.

    If no default process group exists, one is created from the usual ``env://`` variables
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) with ``backend``.
    """

    def __init__(self, backend: str = "gloo", group: Any = None) -> None:
        self._torch: Any = importlib.import_module("torch")
        self._dist: Any = importlib.import_module("torch.distributed")
        if not self._dist.is_initialized():
            self._dist.init_process_group(backend=backend)
        self._group = group
        on_gpu = self._dist.get_backend(group) == "nccl"
        self._device = (
            self._torch.device("cuda", self._torch.cuda.current_device())
            if on_gpu
            else self._torch.device("cpu")
        )

    @property
    def rank(self) -> int:
        return int(self._dist.get_rank(self._group))

    @property
    def world_size(self) -> int:
        return int(self._dist.get_world_size(self._group))

    def all_reduce_min(self, values: Sequence[int]) -> list[int]:
        return self._reduce(values, self._dist.ReduceOp.MIN)

    def all_reduce_max(self, values: Sequence[int]) -> list[int]:
        return self._reduce(values, self._dist.ReduceOp.MAX)

    def all_reduce_sum(self, values: Sequence[int]) -> list[int]:
        return self._reduce(values, self._dist.ReduceOp.SUM)

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def close(self) -> None:
        if self._group is None and self._dist.is_initialized():
            self._dist.destroy_process_group()

    def _reduce(self, values: Sequence[int], op: Any) -> list[int]:
        if not values:
            return []
        tensor = self._torch.tensor(list(values), dtype=self._torch.int64, device=self._device)
        self._dist.all_reduce(tensor, op=op, group=self._group)
        return [int(v) for v in tensor.tolist()]
