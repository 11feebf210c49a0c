from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moeplace_profiler.stats import (
    clean_curve,
    interp,
    load_weights,
    mean_t,
    median_boot,
    paired_difference,
    relative_spread,
    speed_factors,
    suffix_min,
    t975,
)


def test_t_quantiles() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(4) == pytest.approx(2.776)
    assert t975(1000) == pytest.approx(1.96)
    assert math.isinf(t975(0))


def test_mean_t_interval_covers_known_mean() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        est = mean_t(rng.normal(10.0, 1.0, size=5))
        hits += est.lo <= 10.0 <= est.hi
    assert 0.90 <= hits / 400 <= 0.99  # a 95% interval


def test_single_sample_has_infinite_interval() -> None:
    assert math.isinf(mean_t([3.0]).hi)
    assert math.isinf(median_boot([3.0]).hi)


def test_median_bootstrap_is_robust_and_deterministic() -> None:
    vals = [10.0, 10.1, 9.9, 10.05, 500.0]
    est = median_boot(vals)
    assert est.value == pytest.approx(10.05)
    assert est.lo <= est.value <= est.hi
    assert est == median_boot(vals)
    assert est.rel_halfwidth > 0
    with pytest.raises(ValueError):
        median_boot([math.nan])


def test_difference_inside_noise_is_not_significant() -> None:
    rng = np.random.default_rng(2)
    a = 100 * (1 + rng.normal(0, 0.03, 5))
    b = 100 * (1 + rng.normal(0, 0.03, 5))
    d = paired_difference(a, b)
    assert not d.significant
    assert d.lo < 1.0 < d.hi


def test_real_difference_is_significant_even_with_shared_drift() -> None:
    drift = np.array([1.0, 1.08, 0.95, 1.12, 1.02])  # both GPUs drift together per pass
    a = 100 * drift
    b = 104 * drift * (1 + np.array([0.002, -0.001, 0.001, 0.0, -0.002]))
    d = paired_difference(a, b)
    assert d.significant
    assert d.ratio == pytest.approx(1.04, abs=0.003)


def test_tiny_difference_is_not_worth_reporting() -> None:
    a = np.full(5, 100.0)
    b = np.array([100.3, 100.31, 100.29, 100.3, 100.3])
    assert not paired_difference(a, b, min_effect=0.01).significant
    assert paired_difference(a, b, min_effect=0.001).significant


def test_paired_difference_checks_shapes() -> None:
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_suffix_min_and_clean_curve() -> None:
    np.testing.assert_allclose(suffix_min([5, 4, 6, 5.5, 7]), [4, 4, 5.5, 5.5, 7])
    xs, ys = clean_curve([64, 1, 16, 16, 0], [56, 20, 19, 21, 3])
    assert xs == [1, 16, 64]
    assert ys == [20.0, 20.0, 56.0]
    with pytest.raises(ValueError):
        clean_curve([1], [2.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.1, 1e4), min_size=2, max_size=30))
def test_clean_curve_is_monotone_and_never_above_measured(vals: list[float]) -> None:
    tokens = list(range(1, len(vals) + 1))
    _xs, ys = clean_curve(tokens, vals)
    assert all(b >= a for a, b in itertools.pairwise(ys))
    assert all(y <= v + 1e-12 for y, v in zip(ys, vals, strict=True))
    assert ys[-1] == vals[-1]


def test_interp_matches_placement_semantics() -> None:
    from placement.model import LatencyCurve

    curve = LatencyCurve(tokens=[16, 64, 128], micros=[20.0, 30.0, 50.0])
    at = np.array([0, 1, 16, 40, 128, 200])
    assert interp(curve.tokens, curve.micros, at).tolist() == pytest.approx(curve.time(at).tolist())


def test_speed_factors_weighted_by_typical_load() -> None:
    tokens = [16, 256, 4096]
    curves = [[20.0, 40.0, 400.0], [20.0, 40.0, 500.0]]  # GPU 1 slower only at large loads
    small = speed_factors(curves, load_weights(tokens, [10, 20, 16, 300]))
    large = speed_factors(curves, load_weights(tokens, [4000, 3500, 5000]))
    assert small[0] == pytest.approx(small[1], rel=0.15)
    assert large[0] / large[1] == pytest.approx(500 / 400, rel=1e-6)
    assert np.mean(speed_factors(curves, [1, 1, 1])) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError):
        speed_factors(curves, [1, 1])


def test_load_weights() -> None:
    w = load_weights([16, 256, 4096], [15, 17, 250, 5000])
    assert w.tolist() == pytest.approx([0.5, 0.25, 0.25])
    np.testing.assert_allclose(load_weights([1, 2], None), [0.5, 0.5])
    np.testing.assert_allclose(load_weights([1, 2], [0, 0]), [0.5, 0.5])


def test_relative_spread() -> None:
    assert relative_spread([9.0, 10.0, 11.0]) == pytest.approx(0.2)
