"""Hypothesis strategies shared by the placement tests: random shapes, loads, speeds, curves."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from placement.model import GPU, Cluster, LatencyCurve, MoEModelShape, Placement
from placement.problem import Problem


@st.composite
def curves(draw: st.DrawFn) -> LatencyCurve:
    """A latency curve with 2..6 samples, possibly non-monotone, rising at the end."""
    n = draw(st.integers(2, 6))
    xs = sorted(draw(st.sets(st.integers(0, 400), min_size=n, max_size=n)))
    ys = [draw(st.floats(1.0, 100.0)) for _ in xs]
    ys[-1] = ys[-2] + draw(st.floats(0.5, 20.0))
    return LatencyCurve(tokens=xs, micros=ys)


@st.composite
def clusters(draw: st.DrawFn, max_gpus: int = 6, with_curves: bool | None = None) -> Cluster:
    G = draw(st.integers(1, max_gpus))
    use_curves = draw(st.booleans()) if with_curves is None else with_curves
    per_node = draw(st.integers(1, G))
    if use_curves:
        return Cluster(gpus=[GPU(node=f"n{g // per_node}", curve=draw(curves())) for g in range(G)])
    speeds = [draw(st.floats(0.3, 3.0)) for _ in range(G)]
    return Cluster(gpus=[GPU(node=f"n{g // per_node}", speed=s) for g, s in enumerate(speeds)])


@st.composite
def problems(draw: st.DrawFn, max_gpus: int = 6, with_curves: bool | None = None) -> Problem:
    """A random problem: 1..3 layers, G GPUs, S slots per GPU, S <= E <= G*S experts, skewed
    loads with zeros allowed, sometimes load samples."""
    cluster = draw(clusters(max_gpus, with_curves))
    G = cluster.size
    S = draw(st.integers(1, 4))
    E = draw(st.integers(S, G * S))
    L = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    load = np.floor(rng.pareto(1.2, (L, E)) * 50) * (rng.random((L, E)) > 0.1)
    samples = None
    if draw(st.booleans()):
        K = draw(st.integers(1, 4))
        samples = load[None] * rng.uniform(0.3, 1.7, (K, L, E))
    model = MoEModelShape(moe_layers=L, experts=E)
    return Problem(model, cluster, S, load, samples=samples)


def random_placement(problem: Problem, seed: int) -> Placement:
    """A random valid placement of ``problem``: every expert once, extra copies random, no two
    copies of one expert on one GPU."""
    rng = np.random.default_rng(seed)
    L, E, G, S = (
        problem.model.moe_layers,
        problem.model.experts,
        problem.cluster.size,
        problem.slots_per_gpu,
    )
    rows = []
    for _ in range(L):
        while True:
            held: list[set[int]] = [set() for _ in range(G)]
            order = list(rng.permutation(E)) + list(rng.integers(0, E, G * S - E))
            ok = True
            for e in order:
                room = [g for g in range(G) if len(held[g]) < S and e not in held[g]]
                if not room:
                    ok = False
                    break
                held[int(rng.choice(room))].add(int(e))
            if ok:
                rows.append([e for h in held for e in sorted(h)])
                break
    return Placement.from_table(rows, problem.model, G, "random")


@st.composite
def tiny_problems(draw: st.DrawFn, with_curves: bool | None = None) -> Problem:
    """A problem small enough to enumerate every placement: 2..3 GPUs x 2..3 slots, 1..2
    layers, at least one redundant copy, sometimes 1..3 load samples."""
    cluster = draw(clusters(3, with_curves).filter(lambda c: c.size >= 2))
    G = cluster.size
    S = draw(st.integers(2, 3))
    E = draw(st.integers(S, G * S - 1))
    L = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    load = np.floor(rng.pareto(1.0, (L, E)) * 30) + draw(st.sampled_from([0.0, 1.0]))
    samples = None
    if draw(st.booleans()):
        samples = load[None] * rng.uniform(0.3, 1.7, (draw(st.integers(1, 3)), L, E))
    return Problem(MoEModelShape(moe_layers=L, experts=E), cluster, S, load, samples=samples)
