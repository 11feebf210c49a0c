"""Routing and per-layer metrics: exact counts, /metrics over HTTP, hot-path overhead."""

from __future__ import annotations

import socket
import time
import urllib.request

import numpy as np
from moeplace_serving.metrics import ServingMetrics


def test_routing_counts_are_exact() -> None:
    rng = np.random.default_rng(0)
    metrics = ServingMetrics("m", layers=3, experts=5, rank=2)
    steps = [rng.integers(0, 5, size=(7, 3, 2), dtype=np.uint8) for _ in range(4)]
    for ids in steps:
        metrics.observe_routing(ids)
    expected = np.zeros((3, 5), dtype=np.int64)
    for ids in steps:
        for token in ids:
            for layer, chosen in enumerate(token):
                for expert in chosen:
                    expected[layer, expert] += 1
    assert (metrics.expert_tokens() == expected).all()
    sample = metrics.registry.get_sample_value(
        "moe_expert_tokens_total", {"model": "m", "layer": "1", "expert": "4"}
    )
    assert sample == expected[1, 4]


def test_layer_metrics_and_http() -> None:
    metrics = ServingMetrics("m", layers=2, experts=3, rank=1, reporter=True)
    metrics.observe_layers(np.array([0.5, 0.25]), np.array([10, 20]), np.array([0.75, 0.5]))
    metrics.observe_layers(np.array([0.5, 0.25]), np.array([10, 20]), np.array([0.75, 0.5]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'moe_layer_compute_seconds_total{layer="1",model="m",rank="1"} 0.5' in body
    assert 'moe_layer_tokens_total{layer="0",model="m",rank="1"} 20.0' in body
    assert 'moe_layer_straggler_seconds_total{layer="0",model="m"} 1.5' in body
    assert 'moe_steps_total{model="m",rank="1"} 2.0' in body
    assert 'moe_expert_tokens_total{expert="2",layer="1",model="m"} 0.0' in body
    assert "rank" not in next(
        line for line in body.splitlines() if "moe_expert_tokens_total{" in line
    )


def test_routing_overhead_per_step() -> None:
    """DeepSeek-V2-Lite shape: 26 layers x 64 experts, 512 tokens x top-6 per step."""
    metrics = ServingMetrics("m", layers=26, experts=64)
    ids = np.random.default_rng(1).integers(0, 64, size=(512, 26, 6), dtype=np.uint8)
    metrics.observe_routing(ids)
    rounds = 200
    start = time.process_time()  # CPU time: robust to other work on the machine
    for _ in range(rounds):
        metrics.observe_routing(ids)
    per_step_us = (time.process_time() - start) / rounds * 1e6
    print(f"\nrouting metrics overhead: {per_step_us:.0f} µs CPU/step (26x64, 512 tokens, top-6)")
    assert metrics.expert_tokens().sum() == (rounds + 1) * 512 * 26 * 6
    assert per_step_us < 5000
