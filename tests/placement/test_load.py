"""Load model: counts CSV, per-prompt windows, decay smoothing, samples, transitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from placement.load import (
    LoadFileError,
    LoadModelConfig,
    decay_weights,
    estimate,
    parse_transitions_csv,
    read_counts_csv,
    read_per_prompt,
    read_transitions,
    windows,
)


def test_counts_csv_maps_layers(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("moe_layer_index,expert_id,count\n3,0,5\n3,1,7\n1,1,2\n")
    load, ids = read_counts_csv(f)
    assert ids == [1, 3]
    assert load.tolist() == [[0.0, 2.0], [5.0, 7.0]]
    load4, _ = read_counts_csv(f, experts=4)
    assert load4.shape == (2, 4)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("layer,expert,count\n1,0,5\n", "columns"),
        ("moe_layer_index,expert_id,count\n1,0,x\n", ":2"),
        ("moe_layer_index,expert_id,count\n1,0,5\n1,0,6\n", "twice"),
        ("moe_layer_index,expert_id,count\n1,0,-5\n", ">= 0"),
        ("moe_layer_index,expert_id,count\n", "no rows"),
    ],
)
def test_counts_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "c.csv"
    f.write_text(text)
    with pytest.raises(LoadFileError, match=match):
        read_counts_csv(f)


def test_windows_and_npz(tmp_path: Path) -> None:
    counts = np.arange(7 * 2 * 3).reshape(7, 2, 3)
    np.savez(tmp_path / "p.npz", counts=counts)
    arr = read_per_prompt(tmp_path / "p.npz")
    w = windows(arr, 3)
    assert w.shape == (2, 2, 3)
    assert np.array_equal(w[1], counts[3:6].sum(0))
    assert windows(arr, 2, start=1, stop=5).shape == (2, 2, 3)
    with pytest.raises(ValueError):
        windows(arr, 8)
    with pytest.raises(LoadFileError):
        read_per_prompt(tmp_path / "p.npz", key="nope")


def test_decay_and_estimate() -> None:
    w = decay_weights(3, half_life=1.0)
    assert w.tolist() == pytest.approx([0.25 / 1.75, 0.5 / 1.75, 1.0 / 1.75])
    assert decay_weights(4, None).tolist() == [0.25] * 4
    hist = np.stack([np.full((1, 2), 1.0), np.full((1, 2), 3.0)])  # [K=2, L=1, E=2]
    est = estimate(hist)
    assert est.mean.tolist() == [[2.0, 2.0]]
    assert est.effective_windows == pytest.approx(2.0)
    # window std sqrt(2) (ddof 1), stderr sqrt(2)/sqrt(2) = 1, relative to mean 2
    assert est.rel_stderr[0, 0] == pytest.approx(0.5)
    recent = estimate(hist, LoadModelConfig(half_life=0.1, max_samples=1))
    assert recent.mean[0, 0] > 2.9 and recent.samples.shape == (1, 1, 2)
    assert recent.effective_windows < 1.01
    assert recent.rel_stderr[0, 0] == pytest.approx(
        np.sqrt(2 / recent.effective_windows) / recent.mean[0, 0]
    )
    flat = np.stack([np.full((1, 2), v) for v in (1.0, 3.0, 1.0, 3.0)])
    sure, unsure = estimate(flat), estimate(flat, LoadModelConfig(half_life=0.5))
    assert unsure.uncertainty > sure.uncertainty
    assert np.isinf(estimate(hist[:1]).rel_stderr).all()


def test_transitions(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.ones((2, 3, 3), dtype=np.int64))
    assert read_transitions(tmp_path / "t.npy").shape == (2, 3, 3)
    np.save(tmp_path / "bad.npy", np.ones((2, 3, 4)))
    with pytest.raises(LoadFileError):
        read_transitions(tmp_path / "bad.npy")
    np.save(tmp_path / "neg.npy", -np.ones((2, 3, 3)))
    with pytest.raises(LoadFileError, match=">= 0"):
        read_transitions(tmp_path / "neg.npy")
    with (tmp_path / "t.npy").open("rb") as f:  # an open file (a ConfigMap's bytes) works too
        assert read_transitions(f).sum() == 18


def test_transitions_csv_maps_layers_and_pairs() -> None:
    text = "moe_layer_index,src_expert,dst_expert,count\n2,0,1,5\n1,2,0,3.5\n1,0,0,1\n"
    counts, ids = parse_transitions_csv(text, experts=3)
    assert ids == [1, 2] and counts.shape == (2, 3, 3)
    assert counts[0, 2, 0] == 3.5 and counts[0, 0, 0] == 1 and counts[1, 0, 1] == 5
    assert counts.sum() == 9.5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("layer,src,dst,count\n1,0,0,1\n", "columns"),
        ("moe_layer_index,src_expert,dst_expert,count\n", "no rows"),
        ("moe_layer_index,src_expert,dst_expert,count\n1,0,x,1\n", "t:2"),
        ("moe_layer_index,src_expert,dst_expert,count\n1,0,0,1\n1,0,3,1\n", "t:3.*0..2"),
        ("moe_layer_index,src_expert,dst_expert,count\n1,0,0,-1\n", ">= 0"),
        ("moe_layer_index,src_expert,dst_expert,count\n1,0,0,nan\n", "finite"),
        ("moe_layer_index,src_expert,dst_expert,count\n1,0,2,1\n1,0,2,4\n", "twice"),
    ],
)
def test_transitions_csv_errors(text: str, match: str) -> None:
    with pytest.raises(LoadFileError, match=match):
        parse_transitions_csv(text, experts=3, origin="t")
