from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from moeplace_profiler.document import (
    GPUMeasurement,
    build_profile,
    profile_from_dict,
    read_profile,
    write_profile,
)

from placement.gpus import ExpertShape, GPUInputError, load_cluster

TOKENS = [1, 16, 64, 128, 256]


def measurement(gpu: int, scale: float, node: str = "n0") -> GPUMeasurement:
    base = [20.0, 20.5, 22.0, 21.5, 40.0]  # 128 faster than 64: a tile effect
    passes = [[v * scale * (1 + 0.01 * p) for v in base] for p in range(5)]
    return GPUMeasurement(gpu=gpu, node=node, tokens=TOKENS, passes=passes)


def test_build_profile_curves_and_speeds() -> None:
    prof = build_profile(
        [measurement(0, 1.0), measurement(1, 1.1)],
        expert_shape=ExpertShape(name="x", hidden=8, intermediate=16),
        taken_at=datetime(2026, 11, 22, 6, 0, tzinfo=UTC),
    )
    g0, g1 = prof.gpus
    assert g0.curve is not None and g1.curve is not None
    assert g0.curve.tokens == TOKENS
    assert g0.curve.micros == sorted(g0.curve.micros)  # monotone after clean-up
    assert g0.curve.micros[2] == pytest.approx(21.5 * 1.02)  # 64 tokens padded to 128's time
    assert g0.speed > 1.0 > g1.speed
    assert g0.speed / g1.speed == pytest.approx(1.1, rel=1e-3)


def test_round_trip_through_file_and_placement_loader(tmp_path: Path) -> None:
    prof = build_profile([measurement(0, 1.0), measurement(1, 1.05)])
    path = write_profile(prof, tmp_path / "p.json")
    back = read_profile(path)
    assert back == prof
    doc = json.loads(path.read_text())
    assert doc["apiVersion"] == "moeplace.io/v1alpha1" and doc["kind"] == "GPUProfile"
    assert set(doc["gpus"][0]) == {"gpu", "node", "speed", "curve"}
    cluster = load_cluster(path)  # what `moeplace solve --gpus` reads
    assert cluster.size == 2 and cluster.has_curves
    assert profile_from_dict(doc) == prof


def test_invalid_documents_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_profile([])
    with pytest.raises(ValueError):
        build_profile([measurement(0, 1.0), GPUMeasurement(1, "n0", [1, 2], [[1.0, 2.0]])])
    with pytest.raises(ValueError):
        GPUMeasurement(0, "n0", TOKENS, [[1.0]]).medians()
    bad = tmp_path / "bad.json"
    bad.write_text('{"apiVersion": "moeplace.io/v1alpha1", "kind": "GPUProfile", "gpus": []}')
    with pytest.raises(GPUInputError):
        read_profile(bad)


def test_gpu_script_output_validates() -> None:
    """The document gpu/profile_gpus.py writes (plain dicts) is a valid GPUProfile."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gpu"))
    import profile_gpus

    passes = [
        {"0": {str(t): 20.0 + t / 10 for t in TOKENS}, "1": {str(t): 21.0 + t / 9 for t in TOKENS}}
        for _ in range(3)
    ]
    summary = profile_gpus.summarise(passes, TOKENS, None)
    doc = profile_gpus.profile_doc(
        summary,
        {"name": "x", "hidden": 8, "intermediate": 16, "dtype": "bf16"},
        "n0",
        "2026-11-22T06:00:00Z",
    )
    prof = profile_from_dict(doc)
    assert [g.gpu for g in prof.gpus] == [0, 1]
    assert prof.gpus[0].speed > prof.gpus[1].speed
