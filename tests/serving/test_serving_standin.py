"""The serving stand-in end to end on one machine: real rank processes, real routing replay,
placement files arriving at each rank at different times, a corrupt file, no lost or misrouted
pairs, and the straggler time before and after a speed-aware placement."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from moeplace_serving.configdir import write_atomic
from moeplace_serving.standin import DEFAULT_ROUTING, dispatch_modes, format_summary, summarize

from placement import Cluster, MoEModelShape, Placement, Problem
from placement.solvers import solve

RANKS = 3
SPEEDS = [1.0, 0.7, 1.2]
PROMPTS = (1, 101)

pytestmark = pytest.mark.skipif(not DEFAULT_ROUTING.exists(), reason="no routing data")


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _solved_placement(version: int) -> Placement:
    """Greedy, speed-aware placement for the replayed prompt slice (22 slots per rank)."""
    data = np.load(DEFAULT_ROUTING)
    ids = data["expert_ids"][(data["prompt_id"] >= PROMPTS[0]) & (data["prompt_id"] < PROMPTS[1])]
    load = np.stack([np.bincount(ids[:, layer].ravel(), minlength=64) for layer in range(26)])
    model = MoEModelShape(name="deepseek-v2-lite", moe_layers=26, experts=64, top_k=6)
    cluster = Cluster.uniform(RANKS, speeds=SPEEDS)
    problem = Problem.build(model, cluster, load.astype(np.float64), redundant=2)
    placement = solve(problem, "greedy").placement
    return placement.model_copy(update={"metadata": {"version": version}})


def _wait_until(
    report: Path, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
) -> None:
    """Wait until ``done`` holds for the report's records so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = report.read_text().splitlines() if report.exists() else []
        if done([json.loads(line) for line in lines]):
            return
        time.sleep(0.02)
    raise TimeoutError("the stand-in did not get there in time")


def _wait_steps(report: Path, steps: int) -> None:
    _wait_until(report, lambda recs: len(recs) >= steps)


def test_standin_switches_in_lockstep(tmp_path: Path) -> None:
    collective, metrics = _free_ports(2)
    report = tmp_path / "report.jsonl"
    cmd = [
        sys.executable, "-m", "moeplace_serving.standin", "--ranks", str(RANKS),
        "--speeds", ",".join(map(str, SPEEDS)), "--placement-dir", str(tmp_path / "rank-{rank}"),
        "--prompts", f"{PROMPTS[0]}:{PROMPTS[1]}", "--tokens", "64", "--steps", "0",
        "--slots-per-rank", "22", "--dispatch", "speed-aware", "--collective-port", str(collective),
        "--metrics-port", str(metrics), "--poll-interval", "0.02", "--step-interval", "0.04",
        "--report", str(report),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_steps(report, 5)
        solved = _solved_placement(1)
        for rank in range(RANKS):  # the kubelets of the three nodes, one after the other
            write_atomic(tmp_path / f"rank-{rank}", {"placement.json": solved.to_json()})
            time.sleep(0.15)
        _wait_until(report, lambda recs: sum(r["version"] == 1 for r in recs) >= 15)
        for rank in range(RANKS):
            write_atomic(tmp_path / f"rank-{rank}", {"placement.json": '{"phy2log": [[1, 2'})
        time.sleep(0.3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    records = [json.loads(line) for line in report.read_text().splitlines()]
    rows = summarize(records)
    print("\n" + format_summary(rows))
    assert "EMULATION" in out
    assert [row["version"] for row in rows] == [0, 1]
    assert all(row["lost"] == 0 and row["misrouted"] == 0 and row["mixed"] == 0 for row in rows)
    assert rows[1]["realized"] < rows[0]["realized"]
    assert (
        b'moe_placement_reloads_total{model="deepseek-v2-lite",rank="0",result="invalid"} 1.0'
        in body
    )
    assert b'moe_placement_version{model="deepseek-v2-lite",rank="0",state="active"} 1.0' in body
    switch = next(rec["switch"] for rec in records if rec["switch"] is not None)
    print(
        f"switch at step {switch['step']}: {switch['total_s'] * 1e3:.1f} ms (agree "
        f"{switch['agree_s'] * 1e3:.2f} ms, load weights {switch['move_s'] * 1e3:.1f} ms)"
    )


def test_old_speed_spelling_still_selects_speed_aware_dispatch() -> None:
    # a stand-in pod's args may still say --dispatch speed (the name before speed-aware)
    assert dispatch_modes("speed") == ("speed-aware",)
    assert dispatch_modes("even") == ("even",)
    assert dispatch_modes("alternate") == ("even", "speed-aware")
