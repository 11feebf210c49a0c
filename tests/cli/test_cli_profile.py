"""``moeplace profile`` wires the profiler; without torch/CUDA it says so in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from cli_helpers import run


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_profile_without_torch_is_one_clear_line(tmp_path: Path) -> None:
    ran = run("profile", "--out", tmp_path / "p.json", "--budget", "1")
    assert ran.exit_code == 2
    assert ran.stderr.startswith("moeplace: error:") and "torch" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_profile_rejects_unknown_shape() -> None:
    ran = run("profile", "--shape", "no-such-model")
    assert ran.exit_code == 2 and "no-such-model" in ran.stderr
