from __future__ import annotations

import math

from moeplace_profiler.recalibrate import RecalibrationPolicy, decide, relative_drift

POL = RecalibrationPolicy(
    max_age_s=3600, threshold=0.1, window=10, min_observations=5, cooldown_s=60
)


def test_schedule_trigger() -> None:
    d = decide(now_s=4000, profiled_at_s=0, measured=[], predicted=[], policy=POL)
    assert d.reprofile and d.reason == "schedule" and math.isnan(d.drift)


def test_cooldown_beats_drift() -> None:
    d = decide(30, 0, [200.0] * 10, [100.0] * 10, POL)
    assert not d.reprofile and d.reason == "cooldown"


def test_persistent_drift_triggers_but_one_outlier_does_not() -> None:
    measured = [100.0] * 9 + [400.0]
    d = decide(600, 0, measured, [100.0] * 10, POL)
    assert not d.reprofile and d.reason == "ok" and d.drift == 0.0
    d = decide(600, 0, [115.0] * 10, [100.0] * 10, POL)
    assert d.reprofile and d.reason == "drift" and d.drift == 0.15
    d = decide(600, 0, [85.0] * 10, [100.0] * 10, POL)  # faster than predicted counts too
    assert d.reprofile


def test_only_the_recent_window_counts() -> None:
    measured = [150.0] * 50 + [101.0] * 10
    assert relative_drift(measured, [100.0] * 60, 10) == (0.01, 10)


def test_too_few_observations() -> None:
    d = decide(600, 0, [200.0, 200.0], [100.0, 100.0], POL)
    assert not d.reprofile and d.reason == "insufficient-data"


def test_invalid_pairs_are_ignored() -> None:
    drift, n = relative_drift([1.0, math.nan, 3.0], [1.0, 1.0, 0.0], 10)
    assert (drift, n) == (0.0, 1)
