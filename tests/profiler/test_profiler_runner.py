from __future__ import annotations

import importlib.util

import pytest
from moeplace_profiler.runner import ProfilerUnavailableError, parse_shape, run_profile


def test_parse_shape() -> None:
    assert parse_shape("mixtral-8x7b").hidden == 4096
    s = parse_shape("1024x512")
    assert (s.hidden, s.intermediate) == (1024, 512)
    with pytest.raises(ValueError, match="unknown expert shape"):
        parse_shape("huge")
    with pytest.raises(ValueError):
        parse_shape("0x5")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_run_profile_says_clearly_that_it_needs_torch() -> None:
    with pytest.raises(ProfilerUnavailableError, match="PyTorch"):
        run_profile("deepseek-v2-lite")
