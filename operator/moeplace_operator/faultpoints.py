"""Crash injection for the fault tests: with ``MOEPLACE_CRASH_AT=<point>`` the operator kills
itself (SIGKILL: no cleanup, no lease release, as a node failure or the OOM killer would) the
first time a pass reaches that point. The points are the steps of a rollout between which a
crash could leave a half-done state: after the solve (nothing written yet), after the placement
ConfigMap write (status not yet telling), and just before the status patch. Unset in
production; an unknown name is refused at start rather than silently never firing."""

from __future__ import annotations

import os
import signal
from typing import Literal, get_args

CrashPoint = Literal["after-solve", "after-configmap-write", "before-status"]
CRASH_POINTS: tuple[str, ...] = get_args(CrashPoint)
ENV = "MOEPLACE_CRASH_AT"


def configured(env: dict[str, str] | None = None) -> str:
    """The point named by the environment ("" when none); raises on an unknown name."""
    point = (os.environ if env is None else env).get(ENV, "")
    if point and point not in CRASH_POINTS:
        raise ValueError(f"{ENV}={point!r}: not one of {', '.join(CRASH_POINTS)}")
    return point


def crash_point(point: CrashPoint) -> None:
    """SIGKILL this process when the environment names ``point``."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
