"""``python -m moeplace_profiler``: what the Helm chart's profiler DaemonSet runs. Profiles
the local GPUs, publishes on this node (``--publish``; node from ``$NODE_NAME``), and with
``--interval-seconds`` repeats forever (recalibration on a schedule)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from moeplace_profiler.runner import ProfilerUnavailableError, run_profile


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeplace_profiler", description=__doc__)
    ap.add_argument("--shape", default="deepseek-v2-lite")
    ap.add_argument("--out", help="also write the GPU-profile JSON here")
    ap.add_argument("--node", help="node name (default: $NODE_NAME)")
    ap.add_argument("--budget-seconds", type=float, default=60.0)
    ap.add_argument("--interval-seconds", type=float, default=0.0, help="0: profile once")
    ap.add_argument("--publish", action="store_true")
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
        time.sleep(args.interval_seconds)


if __name__ == "__main__":
    raise SystemExit(main())
