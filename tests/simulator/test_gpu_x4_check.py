"""The cost model against the real 4x H200 MoE stack (docs/gpu-x4-results.md): tokens per
rank exact, per-layer expert compute and whole layers within 5% for every strategy."""

from pathlib import Path

import pytest
from moeplace_sim.sim import routing_trace
from moeplace_sim.validate import gpu_x4_checks
from sim_helpers import ROOT

pytestmark = pytest.mark.simulator


def test_predicted_layers_match_the_measured_stack(shared: Path) -> None:
    checks = gpu_x4_checks(routing_trace(shared), ROOT / "docs" / "gpu-x4")
    assert {(c.scenario, c.strategy) for c in checks} >= {("slowed", "cpsat"), ("asis", "eplb")}
    for check in checks:
        print(
            f"{check.scenario}/{check.strategy}: compute {check.compute_error:+.1%}, "
            f"layer {check.layer_error:+.1%}, tokens per rank {check.load_error:.2%}"
        )
        assert check.load_error < 0.01  # round-robin by token vs fractional even split
        assert abs(check.compute_error) < 0.05
        assert abs(check.layer_error) < 0.05
