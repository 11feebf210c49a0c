"""Hot-path cost of the serving library, per forward step, with ratios measured in one run.

Inputs (stated in the output): the DeepSeek-V2-Lite MoE shape (26 layers x 64 experts, top-6),
512 tokens per step, expert ids drawn uniformly with a fixed seed (the cost does not depend on
which experts are chosen, only on how many pairs there are); for dispatch, 8 GPUs x 16 slots
(+64 redundant copies from ``greedy`` on a Zipf load, PAL-like speeds 0.85..1.15).

Measured: CPU time (``time.process_time``, robust to other work on a shared machine) of

* routing metrics: our numpy counter (the baseline), the same counts fed into pre-created
  ``prometheus_client`` children one ``.inc`` per (layer, expert), and the opt-in layer-to-layer
  transitions (every token, every 8th token);
* one scrape (``generate_latest``) of a rank with and without transitions;
* dispatch of one layer's 3,072 pairs to slots: even split vs speed-aware ``best_split``.

Left out: the model's own compute, the HTTP transfer of a scrape, GPU-side costs (these are
CPU costs; on the GPU machine the serving process runs them on the host beside the kernels).

    .venv/bin/python bench/serving_bench.py [--rounds N] [--json bench/results/serving_bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from moeplace_serving.dispatch import Dispatcher
from moeplace_serving.metrics import ServingMetrics
from prometheus_client import CollectorRegistry, Counter, generate_latest

from placement import Cluster, MoEModelShape, Problem
from placement.dispatch import best_split
from placement.solvers import solve

LAYERS, EXPERTS, TOP_K, TOKENS = 26, 64, 6, 512
GPUS, SLOTS_PER_GPU = 8, 16


def cpu_us(fn: Callable[[], object], rounds: int) -> float:
    """Median CPU µs of ``fn`` over ``rounds`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time_ns()
        fn()
        times.append((time.process_time_ns() - start) / 1e3)
    return float(np.median(times))


def per_child_counter(ids: np.ndarray) -> Callable[[], None]:
    """The plain prometheus_client way: one labelled child per (layer, expert), ``.inc`` each."""
    counter = Counter("moe_expert_tokens", "", ["layer", "expert"], registry=CollectorRegistry())
    children = [[counter.labels(str(ly), str(e)) for e in range(EXPERTS)] for ly in range(LAYERS)]

    def step() -> None:
        for ly in range(LAYERS):
            counts = np.bincount(ids[:, ly, :].reshape(-1), minlength=EXPERTS)
            for e, child in enumerate(children[ly]):
                child.inc(int(counts[e]))

    return step


def routing_rows(ids: np.ndarray, rounds: int) -> dict[str, float]:
    counter = ServingMetrics("m", LAYERS, EXPERTS)
    every = ServingMetrics("m", LAYERS, EXPERTS, transitions=True)
    eighth = ServingMetrics("m", LAYERS, EXPERTS, transitions=True, transitions_stride=8)
    return {
        "counter (numpy, ours)": cpu_us(lambda: counter.observe_routing(ids), rounds),
        "prometheus_client children .inc": cpu_us(per_child_counter(ids), max(rounds // 4, 5)),
        "counter + transitions, every token": cpu_us(lambda: every.observe_routing(ids), rounds),
        "counter + transitions, every 8th token": cpu_us(
            lambda: eighth.observe_routing(ids), rounds
        ),
    }


def scrape_rows(ids: np.ndarray) -> dict[str, tuple[float, int]]:
    rows = {}
    for name, transitions in (("without transitions", False), ("with transitions", True)):
        metrics = ServingMetrics("m", LAYERS, EXPERTS, transitions=transitions)
        metrics.observe_routing(ids)
        body = generate_latest(metrics.registry)
        rows[name] = (cpu_us(partial(generate_latest, metrics.registry), 3), len(body))
    return rows


def dispatch_rows(ids: np.ndarray, rounds: int) -> dict[str, float]:
    rng = np.random.default_rng(2)
    load = 1e4 / rng.permuted(np.tile(np.arange(1, EXPERTS + 1), (LAYERS, 1)), axis=1)
    speeds = rng.uniform(0.85, 1.15, GPUS).tolist()
    cluster = Cluster.uniform(GPUS, 2, speeds=speeds)
    redundant = GPUS * SLOTS_PER_GPU - EXPERTS
    shape = MoEModelShape(moe_layers=LAYERS, experts=EXPERTS, top_k=TOP_K)
    placement = solve(Problem.build(shape, cluster, load, redundant=redundant), "greedy").placement
    pairs = ids[:, 0, :].reshape(-1)
    even = Dispatcher(placement, cluster, "even")
    speed = Dispatcher(placement, cluster, "speed-aware")
    counts = np.bincount(pairs, minlength=EXPERTS).astype(np.float64)
    row = placement.table[0]
    return {
        "even": cpu_us(lambda: even.assign(0, pairs), rounds),
        "speed": cpu_us(lambda: speed.assign(0, pairs), rounds),
        "best_split alone": cpu_us(
            lambda: best_split(row, counts, speed.time_model, SLOTS_PER_GPU), rounds
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="timed calls per row")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    ids = np.random.default_rng(1).integers(0, EXPERTS, (TOKENS, LAYERS, TOP_K), dtype=np.uint8)
    print(
        f"serving hot path: {LAYERS} layers x {EXPERTS} experts, top-{TOP_K}, {TOKENS} tokens "
        f"per step (uniform ids, seed 1); CPU time, median of {args.rounds} calls; "
        f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    routing = routing_rows(ids, args.rounds)
    base = routing["counter (numpy, ours)"]
    print("\nrouting metrics per step            µs CPU   x counter")
    for name, us in routing.items():
        print(f"  {name:<38}{us:>8.0f}   {us / base:>6.2f}")
    scrape = scrape_rows(ids)
    print("\none scrape (generate_latest)         ms CPU   MB")
    for name, (us, size) in scrape.items():
        print(f"  {name:<38}{us / 1e3:>8.1f}   {size / 1e6:>5.2f}")
    dispatch = dispatch_rows(ids, args.rounds)
    print(f"\ndispatch of one layer ({TOKENS * TOP_K} pairs, {GPUS} GPUs x {SLOTS_PER_GPU} slots)")
    even, speed = dispatch["even"], dispatch["speed"]
    print(f"  even split {even:.0f} µs; speed-aware best_split {speed:.0f} µs ", end="")
    print(f"({speed / even:.2f}x the even split)")
    print(f"  of which best_split itself {dispatch['best_split alone']:.0f} µs (DeepSeek's LPLB")
    print("  solves its per-batch LP in ~100 µs on its own hardware)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "routingUsPerStep": routing,
                    "scrape": {k: {"cpuMs": v[0] / 1e3, "bytes": v[1]} for k, v in scrape.items()},
                    "dispatchUsPerLayer": dispatch,
                    "rounds": args.rounds,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
