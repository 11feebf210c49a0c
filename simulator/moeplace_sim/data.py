"""The real inputs: the DeepSeek-V2-Lite routing trace replayed in order, GPU speeds drawn from
PAL's measured V100 variability, the H200 layer curve. Read from ``../shared/data`` (never
copied into the repository) and the repository's own 4x H200 profile."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.gpus import load_profile
from placement.model import FloatArray, IntArray, LatencyCurve

ROUTING = Path("data/routing/deepseek-v2-lite-chat")
TRACE_FILE = ROUTING / "routing_topk6_prompts_0001_1000.npz"
TRANSITIONS_FILE = ROUTING / "layer_transition_counts.npy"
SGEMM = Path("data/gpu-variability/pal-v100-rtx5000-a100/longhorn/sgemm-longhorn-agg.csv")
CHUNK = 64  # tokens per precomputed partial sum


class DataMissingError(FileNotFoundError):
    """A shared data file the simulator needs is absent; the message names it."""


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataMissingError(f"{path}: missing (the shared data folder is ../shared/data)")
    return path


@dataclass(frozen=True)
class RoutingTrace:
    """Every token's top-k experts per MoE layer, in prompt order. ``counts(start, n)`` is the
    [L, E] load of the ``n`` tokens from position ``start`` on (wrapping at the end), exact:
    whole 64-token chunks from prefix sums, the ragged ends counted token by token."""

    expert_ids: IntArray  # [T, L, K]
    prompt_ids: IntArray  # [prompts] the trace's prompt numbers, in order (one is missing)
    prompt_lengths: IntArray  # [prompts] tokens per prompt, in order
    transitions: FloatArray  # [L-1, E, E] token pairs layer l -> l+1
    experts: int
    _chunk_prefix: IntArray  # [T // CHUNK + 1, L, E]

    @property
    def tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @classmethod
    def load(cls, shared: Path) -> RoutingTrace:
        with np.load(_require(shared / TRACE_FILE)) as archive:
            ids = archive["expert_ids"].astype(np.int64)
            prompt = archive["prompt_id"]
        transitions = np.load(_require(shared / TRANSITIONS_FILE)).astype(np.float64)
        experts = int(transitions.shape[-1])
        numbers, lengths = np.unique(prompt, return_counts=True)
        whole = ids.shape[0] // CHUNK
        per_chunk = np.stack(
            [_bincount(ids[c * CHUNK : (c + 1) * CHUNK], experts) for c in range(whole)]
        )
        prefix = np.concatenate([np.zeros((1, *per_chunk.shape[1:]), np.int64), per_chunk])
        return cls(ids, numbers, lengths, transitions, experts, np.cumsum(prefix, axis=0))

    def first_token_after(self, prompt_number: int) -> int:
        """Position of the first token of the prompts numbered above ``prompt_number``."""
        return int(self.prompt_lengths[self.prompt_ids <= prompt_number].sum())

    def _span(self, start: int, stop: int) -> IntArray:
        """Counts of tokens start..stop-1 with 0 <= start <= stop <= T."""
        first, last = -(-start // CHUNK), stop // CHUNK
        if first >= last:
            return _bincount(self.expert_ids[start:stop], self.experts)
        out = self._chunk_prefix[last] - self._chunk_prefix[first]
        out = out + _bincount(self.expert_ids[start : first * CHUNK], self.experts)
        return np.asarray(out + _bincount(self.expert_ids[last * CHUNK : stop], self.experts))

    def counts(self, start: int, n: int) -> FloatArray:
        total = self.tokens
        laps, rest = divmod(n, total)
        begin = start % total
        out = laps * self._span(0, total) if laps else np.zeros((self.layers, self.experts))
        if begin + rest <= total:
            out = out + self._span(begin, begin + rest)
        else:
            out = out + self._span(begin, total) + self._span(0, begin + rest - total)
        return np.asarray(out, dtype=np.float64)


def _bincount(ids: IntArray, experts: int) -> IntArray:
    """[n, L, K] expert ids -> [L, E] counts."""
    layers = ids.shape[1]
    flat = (ids + np.arange(layers)[None, :, None] * experts).ravel()
    return np.bincount(flat, minlength=layers * experts).reshape(layers, experts)


def measured_speeds(shared: Path) -> FloatArray:
    """One relative speed per Longhorn V100 (cluster median SGEMM time / the GPU's median)."""
    times: dict[str, list[float]] = {}
    with _require(shared / SGEMM).open(newline="") as f:
        for row in csv.DictReader(f):
            times.setdefault(row["uuid"], []).append(float(row["perf"]))
    medians = np.array([np.median(v) for v in times.values()])
    return np.asarray(np.median(medians) / medians, dtype=np.float64)


def sample_speeds(pool: FloatArray, num_gpus: int, spread: float, seed: int) -> FloatArray:
    """``num_gpus`` speeds drawn from the measured ``pool`` (without replacement while it
    lasts), their distance from 1 scaled by ``spread``."""
    rng = np.random.default_rng(seed)
    draw = rng.choice(pool, size=num_gpus, replace=num_gpus > pool.size)
    return np.asarray(1.0 + spread * (draw - 1.0), dtype=np.float64)


def h200_layer_curve(profile: Path) -> LatencyCurve:
    """The mean of the profiled GPUs' layer curves (they differ by less than the noise)."""
    gpus = load_profile(profile).gpus
    curves = [g.curve for g in gpus if g.curve is not None]
    if not curves:
        raise DataMissingError(f"{profile}: no latency curves")
    tokens = curves[0].tokens
    micros = np.mean([c.time(tokens) for c in curves], axis=0)
    return LatencyCurve(tokens=tokens, micros=[float(m) for m in micros])
