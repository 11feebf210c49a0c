from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from moeplace_operator.nodes import node_gpus
from moeplace_profiler.publish import (
    PublishError,
    curves_annotation,
    node_name_from_env,
    patch_body,
    publish,
    speed_labels,
)

from placement.gpus import ExpertShape, GPUProfile, ProfiledGPU
from placement.model import LatencyCurve
from placement.names import CURVES_ANNOTATION, PROFILED_AT_ANNOTATION, SHAPE_ANNOTATION


def profile(points: int = 15) -> GPUProfile:
    tokens = [1 + 64 * i for i in range(points)]
    gpus = [
        ProfiledGPU(
            gpu=i,
            node="gpu-node-a" if i < 2 else "gpu-node-b",
            speed=[1.0213, 0.97871, 1.0, 0.5][i],
            curve=LatencyCurve(
                tokens=tokens, micros=[20.0 + 0.123456 * t * (1 + i) for t in tokens]
            ),
        )
        for i in range(4)
    ]
    return GPUProfile(
        taken_at=datetime(2026, 11, 22, 6, 1, 2, tzinfo=UTC),
        expert_shape=ExpertShape(name="deepseek-v2-lite", hidden=2048, intermediate=1408),
        gpus=gpus,
    )


def test_labels_are_decimal_strings_with_node_local_indices() -> None:
    assert speed_labels(profile(), "gpu-node-a") == {
        "gpu.moeplace.io/speed-0": "1.0213",
        "gpu.moeplace.io/speed-1": "0.9787",
    }
    assert speed_labels(profile(), "gpu-node-b") == {
        "gpu.moeplace.io/speed-0": "1.0000",
        "gpu.moeplace.io/speed-1": "0.5000",
    }


def test_body_is_what_the_operator_reads() -> None:
    body = patch_body(profile(), "gpu-node-a")
    labels = body["metadata"]["labels"]
    ann = body["metadata"]["annotations"]
    assert ann[PROFILED_AT_ANNOTATION] == "2026-11-22T06:01:02Z"
    assert ann[SHAPE_ANNOTATION] == "deepseek-v2-lite:2048x1408:bf16"
    seen = node_gpus("gpu-node-a", labels, ann)
    assert seen.speeds == {0: 1.0213, 1: 0.9787}
    assert set(seen.curves) == {0, 1}
    assert seen.curves[1].tokens == profile().gpus[1].curve.tokens  # type: ignore[union-attr]
    assert " " not in ann[CURVES_ANNOTATION]  # compact


def test_stale_speed_labels_are_removed_and_others_kept() -> None:
    existing = {
        "gpu.moeplace.io/speed-0": "1.1",
        "gpu.moeplace.io/speed-7": "0.9",
        "kubernetes.io/hostname": "gpu-node-a",
    }
    labels = patch_body(profile(), "gpu-node-a", existing)["metadata"]["labels"]
    assert labels["gpu.moeplace.io/speed-7"] is None
    assert labels["gpu.moeplace.io/speed-0"] == "1.0213"
    assert "kubernetes.io/hostname" not in labels  # a merge patch leaves it alone


def test_curves_fit_the_budget_by_rounding_then_thinning() -> None:
    big = profile(points=400)
    full = curves_annotation(big, "gpu-node-a", budget_bytes=10**6)
    assert full is not None
    small = curves_annotation(big, "gpu-node-a", budget_bytes=len(full) // 3)
    assert small is not None and len(small) <= len(full) // 3
    parsed = json.loads(small)
    t = parsed["0"]["tokens"]
    assert t[0] == 1 and t[-1] == 1 + 64 * 399  # ends are kept
    with pytest.raises(PublishError):
        curves_annotation(big, "gpu-node-a", budget_bytes=20)


def test_unknown_node_and_missing_env() -> None:
    with pytest.raises(PublishError, match="no GPU on node"):
        patch_body(profile(), "cpu-node")
    with pytest.raises(PublishError, match="NODE_NAME"):
        node_name_from_env({})
    assert node_name_from_env({"NODE_NAME": " gpu-node-a "}) == "gpu-node-a"


class FakeApi:
    def __init__(self) -> None:
        self.patched: list[tuple[str, dict[str, Any]]] = []

    def read_node(self, name: str) -> Any:
        from types import SimpleNamespace

        meta = SimpleNamespace(labels={"gpu.moeplace.io/speed-5": "1.0"})
        return SimpleNamespace(metadata=meta)

    def patch_node(self, name: str, body: dict[str, Any]) -> None:
        self.patched.append((name, body))


def test_publish_reads_then_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi()
    monkeypatch.setenv("NODE_NAME", "gpu-node-b")
    body = publish(profile(), api=api)
    assert api.patched == [("gpu-node-b", body)]
    assert body["metadata"]["labels"]["gpu.moeplace.io/speed-5"] is None
