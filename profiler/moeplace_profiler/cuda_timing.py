"""CUDA-graph capture and replay timing, shared by the profiler and the ``gpu/`` scripts.

Needs only torch, imported inside the functions, so the scripts on the GPU machine (which has
no pydantic) import it as they import the package's other numpy-only modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def capture(fn: Callable[[], object], device: Any, warmup: int = 2, pool: Any = None) -> Any:
    """Capture ``fn`` (no arguments) into a CUDA graph on ``device`` after ``warmup`` eager
    runs on a side stream (what graph capture needs); ``pool`` shares memory between graphs."""
    torch: Any = importlib.import_module("torch")

    with torch.cuda.device(device):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, pool=pool):
            fn()
        torch.cuda.synchronize(device)
    return graph


def time_replays(graph: Any, device: Any, reps: int, per_replay: int, warmup: int = 2) -> float:
    """Median µs per unit of work over ``reps`` timed replays (``per_replay`` units a replay),
    each timed with CUDA events. Waits on the current stream only, not the whole device: work
    on other streams (a co-tenant's seconds-long kernels) does not hold the timing loop up."""
    torch: Any = importlib.import_module("torch")

    with torch.cuda.device(device):
        for _ in range(warmup):
            graph.replay()
        torch.cuda.current_stream(device).synchronize()
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0 / per_replay)
    times.sort()
    return float(times[len(times) // 2])
