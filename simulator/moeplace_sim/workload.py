"""Requests: arrival times (Poisson, bursty, or a replayed trace), prompt lengths taken from the
routing trace's real prompts in order, output lengths from a capped geometric law."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from moeplace_sim.config import Arrivals, Workload
from placement.model import FloatArray, IntArray


@dataclass(frozen=True)
class Requests:
    arrival_s: FloatArray  # sorted
    prompt: IntArray
    output: IntArray

    def __len__(self) -> int:
        return int(self.arrival_s.size)


def poisson_times(rate: float, duration: float, rng: np.random.Generator) -> FloatArray:
    count = rng.poisson(rate * duration)
    return np.sort(rng.uniform(0.0, duration, size=count))


def bursty_times(spec: Workload, rate: float, rng: np.random.Generator) -> FloatArray:
    """Poisson at ``rate x burst_factor`` during bursts, at the rate that keeps the mean
    between them (a thinned inhomogeneous Poisson process)."""
    high = rate * spec.burst_factor
    quiet = spec.period_s - spec.burst_s
    low = max(rate * spec.period_s - high * spec.burst_s, 0.0) / quiet
    candidates = poisson_times(high, spec.duration_s, rng)
    in_burst = (candidates % spec.period_s) < spec.burst_s
    keep = in_burst | (rng.uniform(size=candidates.size) < low / high)
    return candidates[keep]


def make_requests(spec: Workload, num_gpus: int, prompt_lengths: IntArray, seed: int) -> Requests:
    rng = np.random.default_rng(seed)
    if spec.arrivals is Arrivals.TRACE:
        return read_trace(spec)
    rate = spec.rate_per_gpu * num_gpus
    if spec.arrivals is Arrivals.POISSON:
        times = poisson_times(rate, spec.duration_s, rng)
    else:
        times = bursty_times(spec, rate, rng)
    scaled = np.maximum(np.rint(prompt_lengths * spec.prompt_scale), 1)
    prompts = np.resize(scaled, times.size).astype(np.int64)
    outputs = np.minimum(rng.geometric(1.0 / spec.output_mean, size=times.size), spec.output_max)
    return Requests(times, prompts, np.maximum(outputs, 1).astype(np.int64))


def read_trace(spec: Workload) -> Requests:
    """``arrival_s,prompt_tokens,output_tokens`` rows (a header line), arrivals < duration."""
    assert spec.trace_file is not None
    with spec.trace_file.open(newline="") as f:
        rows = [(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
                for r in csv.DictReader(f)]  # fmt: skip
    rows = sorted(r for r in rows if 0 <= r[0] < spec.duration_s and r[1] > 0 and r[2] > 0)
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return Requests(arr[:, 0], arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64))
