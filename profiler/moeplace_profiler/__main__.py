"""``python -m moeplace_profiler``: what the Helm chart's profiler DaemonSet runs. Profiles
the local GPUs, publishes on this node (``--publish``; node from ``$NODE_NAME``), and with
``--interval-seconds`` repeats forever (recalibration on a schedule). While it waits, a
publishing profiler reads its Node every ``--poll-seconds`` and profiles at once when the
operator asked for it (``gpu.moeplace.io/reprofile-requested-at`` newer than
``gpu.moeplace.io/profiled-at``: a GPU's measured speed drifted from its label)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from moeplace_profiler.runner import ProfilerUnavailableError, run_profile

POLL_SECONDS = 30.0


def wait_for_next(
    interval_s: float,
    requested: Callable[[], bool] | None,
    poll_s: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Wait up to ``interval_s``, asking ``requested()`` every ``poll_s``; returns
    ``"requested"`` as soon as it says yes, else ``"schedule"`` when the interval is over."""
    deadline = clock() + interval_s
    while (left := deadline - clock()) > 0:
        sleep(min(poll_s, left))
        if requested is not None and requested():
            return "requested"
    return "schedule"


def node_poller(node: str | None, kubeconfig: str | None) -> Callable[[], bool]:
    """``requested()`` for :func:`wait_for_next`: reads this Node (the profiler may get it);
    any failure is printed and counts as "no request" (the schedule still holds)."""
    from moeplace_profiler.publish import core_api, node_name_from_env, reprofile_requested

    name = node or node_name_from_env()
    api: Any = None

    def requested() -> bool:
        nonlocal api
        try:
            api = api or core_api(kubeconfig)
            return reprofile_requested(api.read_node(name))
        except Exception as err:  # API trouble must not stop the profiler
            print(f"moeplace profiler: reading node {name}: {err}", file=sys.stderr, flush=True)
            return False

    return requested


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeplace_profiler", description=__doc__)
    ap.add_argument("--shape", default="deepseek-v2-lite")
    ap.add_argument("--out", help="also write the GPU-profile JSON here")
    ap.add_argument("--node", help="node name (default: $NODE_NAME)")
    ap.add_argument("--budget-seconds", type=float, default=60.0)
    ap.add_argument("--interval-seconds", type=float, default=0.0, help="0: profile once")
    ap.add_argument("--publish", action="store_true")
    ap.add_argument(
        "--poll-seconds",
        type=float,
        default=POLL_SECONDS,
        help="with --publish and --interval-seconds: how often to look for a re-profile request",
    )
    ap.add_argument("--kubeconfig")
    args = ap.parse_args(argv)
    while True:
        try:
            prof = run_profile(
                args.shape,
                out=args.out,
                node=args.node,
                budget_s=args.budget_seconds,
                publish_to_node=args.publish,
                kubeconfig=args.kubeconfig,
            )
        except ProfilerUnavailableError as err:
            print(f"moeplace profiler: {err}", file=sys.stderr)
            return 2
        speeds = ", ".join(f"gpu{g.gpu}={g.speed:.4f}" for g in prof.gpus)
        print(f"profiled {len(prof.gpus)} GPU(s): {speeds}", flush=True)
        if args.interval_seconds <= 0:
            return 0
        poll = node_poller(args.node, args.kubeconfig) if args.publish else None
        why = wait_for_next(args.interval_seconds, poll, args.poll_seconds)
        if why == "requested":
            print("re-profile requested on the node: profiling now", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
