"""Routing and per-layer metrics: exact counts, /metrics over HTTP, transitions (the cost per
step is measured by bench/serving_bench.py)."""

from __future__ import annotations

import socket
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


def test_routing_counts_accumulate_per_layer_and_expert() -> None:
    """DeepSeek-V2-Lite shape: 26 layers x 64 experts, 512 tokens x top-6 per step (the cost
    per step is measured by bench/serving_bench.py)."""
    metrics = ServingMetrics("m", layers=26, experts=64)
    ids = np.random.default_rng(1).integers(0, 64, size=(512, 26, 6), dtype=np.uint8)
    for _ in range(3):
        metrics.observe_routing(ids)
    expected = np.stack([np.bincount(ids[:, ly].reshape(-1), minlength=64) for ly in range(26)])
    np.testing.assert_array_equal(metrics.expert_tokens(), 3 * expected)


def _pairs_by_loop(steps: list[np.ndarray], layers: int, experts: int) -> np.ndarray:
    expected = np.zeros((layers - 1, experts, experts), dtype=np.int64)
    for ids in steps:
        for token in ids:
            for layer in range(layers - 1):
                for src in token[layer]:
                    for dst in token[layer + 1]:
                        expected[layer, src, dst] += 1
    return expected


def test_transitions_are_opt_in_exact_and_exported() -> None:
    rng = np.random.default_rng(3)
    steps = [rng.integers(0, 5, size=(7, 3, 2), dtype=np.uint8) for _ in range(4)]
    plain = ServingMetrics("m", layers=3, experts=5)
    counted = ServingMetrics("m", layers=3, experts=5, transitions=True)
    for ids in steps:
        plain.observe_routing(ids)
        counted.observe_routing(ids)
    expected = _pairs_by_loop(steps, 3, 5)
    assert (counted.transitions() == expected).all()
    assert (counted.expert_tokens() == plain.expert_tokens()).all()  # the counter is unchanged
    assert not plain.transitions().any()
    labels = {"model": "m", "layer": "1", "src": "4", "dst": "0"}
    sample = counted.registry.get_sample_value("moe_expert_transitions_total", labels)
    assert sample == expected[1, 4, 0]
    assert plain.registry.get_sample_value("moe_expert_transitions_total", labels) is None
    series = [
        s
        for family in counted.registry.collect()
        if family.name == "moe_expert_transitions"
        for s in family.samples
        if s.name.endswith("_total")
    ]
    assert len(series) == 2 * 5 * 5  # (L-1) * E * E, zeros included


def test_transitions_stride_samples_rotating_tokens() -> None:
    rng = np.random.default_rng(4)
    steps = [rng.integers(0, 4, size=(6, 3, 2), dtype=np.int64) for _ in range(3)]
    metrics = ServingMetrics("m", layers=3, experts=4, transitions=True, transitions_stride=2)
    for ids in steps:
        metrics.observe_routing(ids)
    sampled = [ids[phase::2] for phase, ids in zip([0, 1, 0], steps, strict=True)]
    assert (metrics.transitions() == _pairs_by_loop(sampled, 3, 4)).all()
    assert (metrics.expert_tokens().sum()) == 3 * 6 * 3 * 2  # the load counter sees every token


def test_transitions_csv_reads_back_with_the_placement_parser() -> None:
    from placement.load import parse_transitions_csv

    rng = np.random.default_rng(5)
    metrics = ServingMetrics("m", layers=4, experts=6, transitions=True)
    metrics.observe_routing(rng.integers(0, 6, size=(50, 4, 2)))
    counts, layer_ids = parse_transitions_csv(metrics.transitions_csv(layer_offset=1), experts=6)
    assert layer_ids == [1, 2, 3]
    assert (counts == metrics.transitions()).all()
