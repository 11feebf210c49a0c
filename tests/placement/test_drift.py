from __future__ import annotations

import numpy as np
import pytest

from placement.drift import speed_drift


def test_a_gpu_slower_than_its_label_drifts_negative() -> None:
    # both labelled 1.0; 80 s and 120 s for the same 96,000 tokens -> throughputs 0.8 : 1.2
    found = speed_drift([1.0, 1.0], seconds=[120.0, 80.0], tokens=[96_000, 96_000])
    assert found is not None
    assert found.drift == pytest.approx([-0.2, 0.2])
    assert found.measured == pytest.approx([0.8, 1.2])
    assert found.beyond(0.1) == [0, 1] and found.beyond(0.25) == []
    assert abs(found.largest) == pytest.approx(0.2)


def test_labels_that_match_the_throughputs_mean_no_drift() -> None:
    labels = [1.0, 0.6, 1.4]  # tokens / seconds in the same ratios, at any scale
    found = speed_drift(labels, seconds=[10.0, 10.0, 10.0], tokens=[5000, 3000, 7000])
    assert found is not None
    assert found.drift == pytest.approx([0.0, 0.0, 0.0])
    assert found.beyond(0.1) == [] and found.largest == pytest.approx(0.0)
    # a uniform slowdown of every GPU is not drift either
    slower = speed_drift(labels, seconds=[20.0, 20.0, 20.0], tokens=[5000, 3000, 7000])
    assert slower is not None and slower.beyond(0.01) == []


def test_one_gpu_label_says_one_but_measures_point_eight() -> None:
    # labels mean 1 already; measured throughputs 0.8, 0.8, 1.4 (mean 1)
    found = speed_drift([1.0, 0.6, 1.4], seconds=[1.0, 1.0, 1.0], tokens=[8000, 8000, 14000])
    assert found is not None
    assert found.drift[0] == pytest.approx(-0.2)
    assert found.drift[1] == pytest.approx(0.8 / 0.6 - 1)
    assert found.drift[2] == pytest.approx(0.0)
    assert found.beyond(0.1) == [1, 0]  # worst first


def test_ranks_without_enough_data_are_left_out_not_guessed() -> None:
    # rank 2 reported nothing: the other two are compared over themselves
    found = speed_drift([1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [9000, 11000, 0])
    assert found is not None and found.valid.tolist() == [True, True, False]
    assert found.drift[:2] == pytest.approx([-0.1, 0.1]) and np.isnan(found.drift[2])
    assert found.beyond(0.05) == [0, 1] or found.beyond(0.05) == [1, 0]
    # fewer than two usable ranks: no claim
    assert speed_drift([1.0, 1.0], [1.0, 0.0], [5000, 5000]) is None
    assert speed_drift([1.0, 1.0], [1.0, 1.0], [5000, 10]) is None  # below min_tokens
    assert speed_drift([1.0, 1.0], [float("nan"), 1.0], [5000, 5000]) is None
    assert speed_drift([], [], []) is None
    with pytest.raises(ValueError, match="one length"):
        speed_drift([1.0], [1.0, 1.0], [1.0, 1.0])


def test_threshold_zero_disables() -> None:
    found = speed_drift([1.0, 1.0], [1.0, 2.0], [5000, 5000])
    assert found is not None and found.beyond(0.0) == []
