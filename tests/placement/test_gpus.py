"""GPUs input: GPUS.csv, GPU-profile JSON, and the builders over the shared measurement sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from placement.gpus import (
    GPUInputError,
    GPUProfile,
    h200_profile,
    load_cluster,
    pal_cluster,
    read_gpus_csv,
    write_gpus_csv,
)
from placement.model import Cluster, LatencyCurve

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpu-variability"
PAL = SHARED / "pal-v100-rtx5000-a100" / "32gpu-variability.csv"
H200 = SHARED / "h200-pair" / "expert_ffn_latency_graphs.json"
needs_pal = pytest.mark.skipif(not PAL.is_file(), reason="shared PAL data absent")
needs_h200 = pytest.mark.skipif(not H200.is_file(), reason="shared H200 data absent")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_reads_in_index_order(tmp_path: Path) -> None:
    p = _write(tmp_path, "g.csv", "gpu,node,speed,extra\n1,b,0.5,x\n0,a,1.25,y\n")
    cluster = read_gpus_csv(p)
    assert [g.node for g in cluster.gpus] == ["a", "b"]
    assert cluster.speeds.tolist() == [1.25, 0.5]


def test_csv_round_trip(tmp_path: Path) -> None:
    cluster = Cluster.uniform(4, gpus_per_node=2, speeds=[1.0, 0.9, 1.1, 1.05])
    write_gpus_csv(cluster, tmp_path / "g.csv")
    assert load_cluster(tmp_path / "g.csv") == cluster


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpu,node\n0,a\n", "missing column(s) speed"),
        ("gpu,node,speed\n", "no GPUs listed"),
        ("gpu,node,speed\n0,a,fast\n", ":2: gpu must be an integer"),
        ("gpu,node,speed\n0,a,-1\n", "speed must be a positive number"),
        ("gpu,node,speed\n0,a,1\n2,a,1\n", "gpu indices must be 0..1"),
        ("gpu,node,speed\n0,,1\n", "empty node name"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(GPUInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_cluster(_write(tmp_path, "g.csv", text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GPUInputError, match="no such file"):
        load_cluster(tmp_path / "nope.csv")


def _profile() -> GPUProfile:
    curve = LatencyCurve(tokens=[8, 128, 1024], micros=[10.0, 20.0, 100.0])
    slow = LatencyCurve(tokens=[8, 128, 1024], micros=[11.0, 22.0, 110.0])
    cluster = Cluster.model_validate(
        {"gpus": [{"node": "n0", "curve": curve}, {"node": "n0", "curve": slow}]}
    )
    return GPUProfile.from_cluster(cluster)


def test_profile_round_trip(tmp_path: Path) -> None:
    profile = _profile()
    p = _write(tmp_path, "profile.json", profile.to_json())
    assert GPUProfile.model_validate_json(p.read_text()) == profile
    cluster = load_cluster(p)
    assert cluster.has_curves
    assert cluster.speeds[0] > cluster.speeds[1]


def test_profile_detected_without_json_suffix(tmp_path: Path) -> None:
    p = _write(tmp_path, "profile.txt", _profile().to_json())
    assert load_cluster(p).has_curves


def test_profile_camel_case_keys() -> None:
    text = _profile().to_json()
    assert '"apiVersion": "moeplace.io/v1alpha1"' in text
    assert '"kind": "GPUProfile"' in text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"kind": "GPUProfile", "gpus": []}', "gpus"),
        ('{"apiVersion": "v9", "gpus": [{"gpu": 0, "node": "a"}]}', "apiVersion"),
        ('{"gpus": [{"gpu": 1, "node": "a"}]}', "gpu indices must be 0..0"),
        ('{"gpus": [{"gpu": 0, "node": "a", "sped": 1}]}', "sped"),
        (
            '{"gpus": [{"gpu": 0, "node": "a", "curve": {"tokens": [1, 2], "micros": [1, 2]}},'
            ' {"gpu": 1, "node": "a"}]}',
            "every GPU has a latency curve",
        ),
        ("{not json", "not a valid GPU profile"),
    ],
)
def test_profile_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(GPUInputError, match=message):
        load_cluster(_write(tmp_path, "p.json", body))


@needs_pal
def test_pal_cluster() -> None:
    cluster = pal_cluster(PAL, "A")
    assert cluster.size == 32
    assert len(cluster.nodes) == 8
    assert 0.85 < cluster.speeds.min() < cluster.speeds.max() < 1.05
    assert pal_cluster(PAL, "B", num_gpus=8).size == 8
    with pytest.raises(GPUInputError, match="class"):
        pal_cluster(PAL, "Z")


@needs_h200
def test_h200_profile() -> None:
    profile = h200_profile(H200, "mixtral-8x7b", num_gpus=4, gpus_per_node=2)
    cluster = profile.to_cluster()
    assert cluster.size == 4
    assert cluster.nodes == ["node-0", "node-1"]
    assert cluster.has_curves
    times = cluster.times(np.full(4, 512.0))
    assert np.all((times > 50) & (times < 5000))
    assert times[0] == times[2]
    with pytest.raises(GPUInputError, match="expert shape"):
        h200_profile(H200, "gpt-9")


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    p = tmp_path / "g.csv"
    p.write_bytes(b"\xef\xbb\xbfgpu,node,speed\r\n0,a,1\r\n1,a,2\r\n")
    assert read_gpus_csv(p).speeds.tolist() == [1.0, 2.0]
