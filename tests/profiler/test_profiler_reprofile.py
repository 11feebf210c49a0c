"""The profiler's side of drift recalibration: when a node asks for a new profile, and the
``--interval-seconds`` wait that polls for it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from moeplace_profiler import __main__ as cli
from moeplace_profiler.publish import reprofile_requested

from placement.names import PROFILED_AT_ANNOTATION, REPROFILE_ANNOTATION


def node(annotations: dict[str, str] | None) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(annotations=annotations))


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        (None, False),
        ({PROFILED_AT_ANNOTATION: "2026-12-01T08:00:00Z"}, False),
        ({REPROFILE_ANNOTATION: "2026-12-01T08:00:00Z"}, True),  # never profiled yet
        (
            {
                PROFILED_AT_ANNOTATION: "2026-12-01T08:00:00Z",
                REPROFILE_ANNOTATION: "2026-12-01T08:00:01Z",
            },
            True,
        ),
        (
            {
                PROFILED_AT_ANNOTATION: "2026-12-01T08:00:00Z",
                REPROFILE_ANNOTATION: "2026-12-01T08:00:00Z",
            },
            False,  # answered by the profile taken at that second
        ),
        (
            {
                PROFILED_AT_ANNOTATION: "2026-12-01T09:00:00Z",
                REPROFILE_ANNOTATION: "2026-12-01T08:00:00Z",
            },
            False,
        ),
        (
            {
                PROFILED_AT_ANNOTATION: "2026-12-01T09:00:00+02:00",  # 07:00 UTC
                REPROFILE_ANNOTATION: "2026-12-01T08:00:00Z",
            },
            True,
        ),
        ({REPROFILE_ANNOTATION: "soon"}, False),
        ({PROFILED_AT_ANNOTATION: "garbage", REPROFILE_ANNOTATION: "2026-12-01T08:00:00Z"}, True),
    ],
)
def test_reprofile_requested(annotations: dict[str, str] | None, expected: bool) -> None:
    assert reprofile_requested(node(annotations)) is expected


def test_the_operator_writes_what_the_profiler_reads() -> None:
    from datetime import UTC, datetime

    from moeplace_operator.build import rfc3339

    stamp = rfc3339(datetime(2026, 12, 1, 8, 0, 5, tzinfo=UTC))
    # the wire names, spelled out: both sides use placement.names
    ann = {
        "gpu.moeplace.io/profiled-at": "2026-12-01T08:00:04Z",
        "gpu.moeplace.io/reprofile-requested-at": stamp,
    }
    assert reprofile_requested(node(ann))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_wait_polls_and_returns_at_once_when_requested() -> None:
    clock = FakeClock()
    answers = iter([False, False, True])
    why = cli.wait_for_next(3600, lambda: next(answers), 30, clock.sleep, clock)
    assert why == "requested" and clock.sleeps == [30, 30, 30]


def test_wait_runs_out_on_schedule_and_without_a_poller() -> None:
    clock = FakeClock()
    assert cli.wait_for_next(70, lambda: False, 30, clock.sleep, clock) == "schedule"
    assert clock.sleeps == [30, 30, 10]
    clock = FakeClock()
    assert cli.wait_for_next(70, None, 30, clock.sleep, clock) == "schedule"
    assert clock.now == 70


def test_poller_failures_count_as_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeplace_profiler import publish

    class Api:
        def __init__(self, found: Any) -> None:
            self.found = found

        def read_node(self, name: str) -> Any:
            if isinstance(self.found, Exception):
                raise self.found
            return self.found

    asked = node({REPROFILE_ANNOTATION: "2026-12-01T08:00:00Z"})
    monkeypatch.setattr(publish, "core_api", lambda kubeconfig=None: Api(asked))
    assert cli.node_poller("n0", None)() is True
    monkeypatch.setattr(publish, "core_api", lambda kubeconfig=None: Api(OSError("refused")))
    assert cli.node_poller("n0", None)() is False


def test_main_reprofiles_when_the_node_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two profiles: the second starts after the poll said yes, long before the interval."""
    profiles: list[str] = []
    gpu = SimpleNamespace(gpu=0, speed=1.0)

    def fake_run_profile(*args: Any, **kwargs: Any) -> Any:
        profiles.append(kwargs["node"])
        if len(profiles) == 2:
            raise cli.ProfilerUnavailableError("stop the loop")
        return SimpleNamespace(gpus=[gpu])

    waits: list[tuple[float, bool]] = []

    def fake_wait(interval: float, requested: Any, poll_s: float) -> str:
        waits.append((interval, requested is not None))
        return "requested"

    monkeypatch.setattr(cli, "run_profile", fake_run_profile)
    monkeypatch.setattr(cli, "wait_for_next", fake_wait)
    monkeypatch.setattr(cli, "node_poller", lambda node, kubeconfig: lambda: True)
    code = cli.main(["--publish", "--node", "n0", "--interval-seconds", "86400"])
    assert code == 2 and profiles == ["n0", "n0"] and waits == [(86400, True)]
