"""Arrivals: the bursty process keeps the mean rate and puts its excess in the bursts; a
replayed trace is read as written."""

from pathlib import Path

import numpy as np
import pytest
from moeplace_sim.config import Arrivals, Workload
from moeplace_sim.workload import make_requests

pytestmark = pytest.mark.simulator
PROMPTS = np.array([10, 20, 30])


def test_bursty_keeps_the_mean_and_bursts() -> None:
    spec = Workload(arrivals=Arrivals.BURSTY, rate_per_gpu=50.0, duration_s=400.0,
                    burst_factor=3.0, burst_s=5.0, period_s=20.0)  # fmt: skip
    times = make_requests(spec, 1, PROMPTS, seed=1).arrival_s
    assert times.size == pytest.approx(50.0 * 400.0, rel=0.03)
    in_burst = (times % 20.0) < 5.0
    assert in_burst.mean() == pytest.approx(3.0 * 5.0 / 20.0, abs=0.02)  # 3x rate, 1/4 of time
    assert (np.diff(times) >= 0).all()


def test_poisson_prompts_follow_the_trace_in_order() -> None:
    spec = Workload(rate_per_gpu=10.0, duration_s=2.0, prompt_scale=2.0)
    requests = make_requests(spec, 4, PROMPTS, seed=0)
    assert requests.prompt[:6].tolist() == [20, 40, 60, 20, 40, 60]
    assert (requests.output >= 1).all() and (requests.output <= spec.output_max).all()


def test_trace_arrivals_are_replayed(tmp_path: Path) -> None:
    trace = tmp_path / "arrivals.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.5,12,3\n0.1,7,2\n9.0,5,5\n")
    spec = Workload(arrivals=Arrivals.TRACE, trace_file=trace, duration_s=5.0)
    requests = make_requests(spec, 8, PROMPTS, seed=0)
    assert requests.arrival_s.tolist() == [0.1, 0.5]  # sorted; the one after 5 s dropped
    assert requests.prompt.tolist() == [7, 12] and requests.output.tolist() == [2, 3]
