"""``run_profile``: measure the local GPUs and return (optionally write and publish) the
GPU-profile document. What ``moeplace profile`` calls.

Needs PyTorch with CUDA, imported only when called: without it the function raises
:class:`ProfilerUnavailableError` saying so. The timing method is the one ``gpu/profile_gpus.py``
validated on H200s: per token count of the tile plan, a CUDA graph of several FFNs over weight
sets larger than L2, median of timed replays per pass, GPUs interleaved within each pass
(order alternating), median over passes.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeplace_profiler.cuda_timing import capture, time_replays
from moeplace_profiler.document import GPUMeasurement, build_profile, write_profile
from moeplace_profiler.plan import tile_plan
from placement.gpus import H200_SHAPES, ExpertShape, GPUProfile

L2_BYTES = 60 * 1024 * 1024


class ProfilerUnavailableError(RuntimeError):
    """No PyTorch or no CUDA device here: the profiler must run on a GPU node."""


def parse_shape(shape: str) -> ExpertShape:
    """A known model name (``deepseek-v2-lite``, ``mixtral-8x7b``, ``deepseek-v3``) or
    ``HIDDENxINTERMEDIATE`` (e.g. ``2048x1408``)."""
    if shape in H200_SHAPES:
        hidden, inter = H200_SHAPES[shape]
        return ExpertShape(name=shape, hidden=hidden, intermediate=inter)
    try:
        h, i = (int(v) for v in shape.lower().split("x"))
    except ValueError as err:
        raise ValueError(
            f"unknown expert shape {shape!r}: use one of {sorted(H200_SHAPES)} or HxI"
        ) from err
    if h <= 0 or i <= 0:
        raise ValueError("expert shape dimensions must be positive")
    return ExpertShape(name=shape, hidden=h, intermediate=i)


def _torch() -> Any:
    try:
        torch = importlib.import_module("torch")
    except ImportError as err:
        raise ProfilerUnavailableError(
            "moeplace profile needs PyTorch with CUDA (pip install torch) and a GPU; "
            "torch is not installed here"
        ) from err
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise ProfilerUnavailableError("moeplace profile found no CUDA device on this machine")
    return torch


def _graph(torch: Any, dev: Any, hidden: int, inter: int, tokens: int, weights: list[Any]) -> Any:
    per = max(8, len(weights))
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)

    def work() -> None:
        for i in range(per):
            w13, w2 = weights[i % len(weights)]
            a = x @ w13
            (torch.nn.functional.silu(a[:, :inter]) * a[:, inter:]) @ w2

    return capture(work, dev), per, x


def run_profile(
    shape: str = "deepseek-v2-lite",
    out: str | Path | None = None,
    node: str | None = None,
    rounds: int = 5,
    reps: int = 10,
    max_tokens: int = 4096,
    budget_s: float = 60.0,
    publish_to_node: bool = False,
    kubeconfig: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> GPUProfile:
    """Profile every local GPU on ``shape``'s expert FFN; write to ``out`` if given; patch
    this node (``node`` or ``$NODE_NAME``) if ``publish_to_node``. ``budget_s`` bounds the
    timed passes per GPU (at least one pass always runs). Raises
    :class:`ProfilerUnavailableError` without torch or CUDA."""
    expert = parse_shape(shape)
    torch = _torch()
    node_name = node or os.environ.get("NODE_NAME") or socket.gethostname()
    hidden, inter = expert.hidden, expert.intermediate
    plan = tile_plan(max_tokens)
    devs = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    sets = max(1, min(12, math.ceil(3 * L2_BYTES / (3 * hidden * inter * 2))))
    graphs: dict[int, dict[int, Any]] = {}
    keep: list[Any] = []
    for d in devs:
        gen = torch.Generator(device=d).manual_seed(0)
        weights = [
            (
                torch.randn(hidden, 2 * inter, device=d, dtype=torch.bfloat16, generator=gen)
                * hidden**-0.5,
                torch.randn(inter, hidden, device=d, dtype=torch.bfloat16, generator=gen)
                * inter**-0.5,
            )
            for _ in range(sets)
        ]
        keep.append(weights)
        graphs[d.index] = {t: _graph(torch, d, hidden, inter, t, weights) for t in plan}
    passes: dict[int, list[list[float]]] = {d.index: [] for d in devs}
    end = time.monotonic() + budget_s * max(1, len(devs))
    for r in range(rounds):
        if r and time.monotonic() > end:
            break
        order = devs if r % 2 == 0 else devs[::-1]
        row: dict[int, list[float]] = {d.index: [] for d in devs}
        for t in plan:
            for d in order:
                g, per, _ = graphs[d.index][t]
                row[d.index].append(time_replays(g, d, reps, per, warmup=1))
        for k, v in row.items():
            passes[k].append(v)
        if progress is not None:
            progress((r + 1) / rounds)
    profile = build_profile(
        [GPUMeasurement(gpu=k, node=node_name, tokens=plan, passes=v) for k, v in passes.items()],
        expert_shape=expert,
    )
    if out is not None:
        write_profile(profile, out)
    if publish_to_node:
        from moeplace_profiler.publish import publish

        publish(profile, node=node_name, kubeconfig=kubeconfig)
    return profile
