"""Crash injection: the named point SIGKILLs the process, any other point does nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from moeplace_operator import faultpoints

pytestmark = pytest.mark.faults

PROGRAM = """
from moeplace_operator.faultpoints import crash_point
crash_point("after-solve")
print("passed after-solve", flush=True)
crash_point("before-status")
print("passed before-status", flush=True)
"""


def run_with(crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faultpoints.ENV}
    if crash_at is not None:
        env[faultpoints.ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_named_point_kills_the_process_there() -> None:
    result = run_with("before-status")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.splitlines() == ["passed after-solve"]


def test_without_the_variable_every_point_passes() -> None:
    result = run_with(None)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["passed after-solve", "passed before-status"]


def test_an_unknown_point_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"after-solv.*not one of after-solve"):
        faultpoints.configured({faultpoints.ENV: "after-solv"})
    assert faultpoints.configured({faultpoints.ENV: "after-configmap-write"})
    assert faultpoints.configured({}) == ""
