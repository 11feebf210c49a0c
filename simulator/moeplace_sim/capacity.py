"""Where a setup saturates, so scenarios can be run at a stated share of it (the papers compare
at a load near capacity, not at an idle or a drowning server)."""

from __future__ import annotations

import numpy as np

from moeplace_sim.config import Arrivals, SimConfig
from moeplace_sim.sim import simulate

BURST_S = 0.01  # the probe's requests all arrive within this
BACKLOG = 1.5  # probe requests per GPU, in units of the sequence limit
PROBE_LIMIT_S = 3600.0


def capacity_per_gpu(config: SimConfig) -> float:
    """Requests/s per GPU the setup serves when saturated: a backlog of requests arrives at
    once; until half of them are done the server is full, and the tokens its steps carried
    per second then, over the tokens of a request, is its capacity."""
    count = BACKLOG * config.max_seqs_per_gpu
    workload = config.workload.model_copy(
        update={
            "arrivals": Arrivals.POISSON,
            "rate_per_gpu": count / BURST_S,
            "duration_s": BURST_S,
        }
    )
    run = simulate(config.model_copy(update={"workload": workload, "max_time_s": PROBE_LIMIT_S}))
    finish = np.sort(run.engine.log.finish_s)  # all finish: no time limit is reached
    half_s = float(finish[finish.size // 2])
    end = np.asarray(run.engine.steps.end_s)
    tokens = np.asarray(run.engine.steps.tokens)[end <= half_s]
    per_request = float((run.requests.prompt + run.requests.output - 1).mean())
    return float(tokens.sum()) / half_s / per_request / config.gpus.num_gpus


def at_load(config: SimConfig, share: float) -> SimConfig:
    """``config`` with its arrival rate at ``share`` of its capacity."""
    rate = share * capacity_per_gpu(config)
    workload = config.workload.model_copy(update={"rate_per_gpu": rate})
    return config.model_copy(update={"workload": workload})
