"""What a run is judged by: TTFT, TPOT and end-to-end latency (P50/P90/P99), SLO attainment,
tokens/s, the straggler share of step time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeplace_sim.engine import RequestLog, StepLog
from moeplace_sim.workload import Requests
from placement.model import FloatArray

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Latencies:
    ttft_s: FloatArray  # inf for a request that never got its first token
    tpot_s: FloatArray  # nan for one-token outputs, inf when unfinished
    e2e_s: FloatArray

    @classmethod
    def of(cls, requests: Requests, log: RequestLog) -> Latencies:
        first = np.where(np.isnan(log.first_token_s), np.inf, log.first_token_s)
        finish = np.where(np.isnan(log.finish_s), np.inf, log.finish_s)
        decoded = requests.output - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(decoded > 0, (finish - first) / np.maximum(decoded, 1), np.nan)
        tpot = np.where(np.isinf(finish), np.inf, tpot)
        return cls(first - requests.arrival_s, tpot, finish - requests.arrival_s)


def percentiles(values: FloatArray) -> dict[str, float]:
    """Order statistics (no interpolation: an unfinished request's inf stays inf)."""
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return {f"p{p}": float("nan") for p in PERCENTILES}
    return {f"p{p}": float(np.quantile(kept, p / 100, method="inverted_cdf")) for p in PERCENTILES}


def slo_attainment(lat: Latencies, ttft_slo: float, tpot_slo: float) -> float:
    """Share of requests meeting both SLOs (a one-token output has no TPOT to miss)."""
    if lat.ttft_s.size == 0:
        return float("nan")
    tpot_ok = np.isnan(lat.tpot_s) | (lat.tpot_s <= tpot_slo)
    return float(((lat.ttft_s <= ttft_slo) & tpot_ok & np.isfinite(lat.e2e_s)).mean())


def summarize(
    requests: Requests, log: RequestLog, steps: StepLog, ttft_slo: float, tpot_slo: float
) -> dict[str, Any]:
    lat = Latencies.of(requests, log)
    finished = np.isfinite(lat.e2e_s)
    makespan = float(np.nanmax(log.finish_s)) if finished.any() else float("nan")
    served = int((requests.prompt[finished] + requests.output[finished]).sum())
    step_us = np.asarray(steps.step_us)
    stall_s = sum(stall for _, _, stall in steps.changes)
    busy_s = float(step_us.sum()) * 1e-6 + stall_s
    return {
        "requests": len(requests),
        "finished": int(finished.sum()),
        "ttft_s": percentiles(lat.ttft_s),
        "tpot_s": percentiles(lat.tpot_s),
        "e2e_s": percentiles(lat.e2e_s),
        "slo_attainment": slo_attainment(lat, ttft_slo, tpot_slo),
        "tokens_per_s": served / makespan if makespan > 0 else float("nan"),
        "steps": int(step_us.size),
        "mean_step_ms": float(step_us.mean()) * 1e-3 if step_us.size else float("nan"),
        "straggler_share": float(np.sum(steps.straggler_us) / step_us.sum())
        if step_us.size
        else float("nan"),
        "expert_share": float(np.sum(steps.expert_us) / step_us.sum()) if step_us.size else 0.0,
        "a2a_share": float(np.sum(steps.a2a_us) / step_us.sum()) if step_us.size else 0.0,
        "stall_s": stall_s,
        "stall_share": stall_s / busy_s if busy_s > 0 else 0.0,
        "changes": len(steps.changes),
        "preemptions": log.preemptions,
        "recomputed_tokens": log.recomputed_tokens,
        "max_kv_tokens": log.max_kv_tokens,
    }
