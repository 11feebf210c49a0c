"""Closed loop through the real SGLang plugin: SGLang ranks -> Prometheus -> operator -> ConfigMap
-> SGLang's ExpertLocationUpdater, end to end.

The variant of e2e/test_closed_loop.py whose ranks run the SGLang plugin's real code path instead
of the stand-in's: 4 rank processes (gloo, CPU), each with SGLang 0.5.23's runtime context (EP
size 4, 8 redundant slots, static dispatch, DP attention: each rank holds its own tokens) and a
tiny model of DeepSeek-V2-Lite's expert layout (27 layers, the first dense, 64 experts; each
slot's weight tensor filled with the expert it holds; tests/engines/sglang_runtime.py; the rank
processes: e2e/sglang_ranks.py). Per
step, a rank replays its share of real DeepSeek-V2-Lite routing (the stand-in's trace), maps it
to physical slots with SGLang's static dispatch (``topk_ids_logical_to_physical``) and feeds it to
SGLang's expert distribution recorder as its select-experts hook does, then runs the plugin's
``LivePlacement.on_forward_pass_end`` (what the registered ``ModelRunner.forward`` hook calls):
routing counts into ``moe_expert_tokens_total`` on the rank's /metrics, the watcher, the lock-step
switch, and SGLang's updater moving the weights. The real local cluster, Prometheus and operator
(greedy, Prometheus load, 20 s window) and test_closed_loop's Syncer (kubelet-style ConfigMap
copies, rank r 0.5 s after rank r-1) close the loop.

Asserted: routing reached Prometheus and every token the ranks replayed was counted; all ranks
switched to the operator's version at the same step, none refused it; each slot's weight tensor
holds the expert the published placement names, and SGLang's dispatch sends every expert to a slot
holding it. Printed: the time from the ConfigMap write to the switch.

Run: ``.venv-engines/bin/python -m pytest -m engines e2e/test_closed_loop_engines.py -s``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

import sglang_ranks  # noqa: E402
from conftest import Cluster, wait_for  # noqa: E402
from moeplace_serving.standin import DEFAULT_ROUTING, Trace  # noqa: E402
from sglang_ranks import RankRun, TinySGLang  # noqa: E402
from test_closed_loop import (  # noqa: E402
    GPUS,
    KUBELET_LAG_S,
    NODES,
    REDUNDANT,
    TOKENS,
    Syncer,
    manifest,
    operator_scenario,
    placement_version,
)

from placement import Placement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.engines,
    pytest.mark.skipif(not DEFAULT_ROUTING.exists(), reason="../shared/data is absent"),
]

RANKS = NODES * GPUS
SGLANG = TinySGLang(
    hidden_layers=27, dense_layers=1, experts=64, redundant=REDUNDANT, ep_size=RANKS
)
PROMPTS = (1, 51)  # the replayed prompt slice
WINDOW_S = 20  # operator's load window (2 sub-windows of 10 s)
CHECK_EVERY = 4  # forward passes between the ranks' version agreements
STEP_S = 0.1


@pytest.fixture
def loop(cluster: Cluster, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Namespace, kwok nodes, operator, SGLang ranks scraped by Prometheus, syncer."""
    with operator_scenario(cluster, tmp_path, "sgl") as scenario:
        namespace, model, ports = scenario.namespace, scenario.model, scenario.ports
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        run = RankRun(
            SGLANG, PROMPTS, TOKENS, CHECK_EVERY, STEP_S, ports + RANKS, ports, model, str(tmp_path)
        )
        ranks = torch.multiprocessing.spawn(
            sglang_ranks.main,
            args=(run,),
            nprocs=RANKS,
            join=False,
        )
        job = f"sglang-{namespace}"
        cluster.add_scrape_target(job, [f"127.0.0.1:{ports + r}" for r in range(RANKS)])
        dirs = [tmp_path / f"rank-{rank}" for rank in range(RANKS)]
        syncer = Syncer(cluster, namespace, "lite-placement", dirs)
        syncer.start()
        try:
            yield {
                "namespace": namespace, "model": model, "tmp": tmp_path, "ranks": ranks,
                "syncer": syncer,
            }  # fmt: skip
        finally:
            syncer.stop.set()
            (tmp_path / "stop").touch()
            _join(ranks, timeout=60)
            cluster.remove_scrape_target(job)
    tail = scenario.operator.log.read_text(errors="replace").splitlines()[-15:]
    print("--- operator.log (tail)\n" + "\n".join(tail))


def _join(ranks: Any, timeout: float) -> None:
    """Wait for the rank processes; terminate those still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    try:
        while not ranks.join(timeout=1):
            if time.monotonic() > deadline:
                raise AssertionError(f"the SGLang ranks did not stop within {timeout} s")
    finally:
        for proc in ranks.processes:
            if proc.is_alive():
                proc.terminate()


def test_closed_loop_through_the_sglang_plugin(cluster: Cluster, loop: dict[str, Any]) -> None:
    namespace, model, tmp, ranks = loop["namespace"], loop["model"], loop["tmp"], loop["ranks"]
    started = time.monotonic()
    # 1. the ranks' routing, counted by SGLang's recorder, reaches Prometheus; the window fills
    routed = f'sum(rate(moe_expert_tokens_total{{model="{model}"}}[5s])) > 0'
    # (join(0) raises at once if a rank process failed)
    wait_for("routing in Prometheus", lambda: not ranks.join(0) and cluster.prom_query(routed), 120)
    time.sleep(WINDOW_S)
    # 2. the operator solves on it and publishes; the syncer delivers it to every rank
    spec = manifest(namespace, model, cluster.prometheus_url)
    spec["spec"]["load"]["prometheus"]["window"] = f"{WINDOW_S}s"
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(spec))
    first, _ = wait_for("a placement", lambda: placement_version(cluster, namespace), 120)
    written = time.time()  # the ConfigMap's write, seen by a kubectl poll every 0.2 s
    syncer = loop["syncer"]
    wait_for("the syncer's copies", lambda: syncer.seen, 10)
    time.sleep(RANKS * KUBELET_LAG_S + 2 * CHECK_EVERY * STEP_S + 1)  # copies, then agreements
    syncer.stop.set()
    syncer.join()
    delivered = list(syncer.seen.values())[-1]  # the last version every rank got
    version = int(delivered["version"])
    published = Placement.model_validate_json(delivered["placement.json"])
    time.sleep(2 * CHECK_EVERY * STEP_S + 1)
    (tmp / "stop").touch()
    _join(ranks, timeout=60)
    results = [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(RANKS)]
    # 3. all ranks on the operator's version, switched at the same pass, nothing refused
    events = [[(e["step"], e["new_version"]) for e in res["events"]] for res in results]
    print(f"\nswitches per rank (pass, version): {events}")
    assert all(res["versions"][-1] == version for res in results)
    assert all(ev == events[0] for ev in events) and events[0][-1][1] == version
    assert all(res["hash"] == published.content_hash() for res in results)
    assert [res["invalid"] for res in results] == pytest.approx([0.0] * RANKS)
    # 4. SGLang's updater put each expert in the slots the placement names; dispatch agrees
    start = np.asarray(SGLANG.trivial_rows())[SGLANG.dense_layers :]
    moved = int((published.table != start).sum())
    assert moved > 0  # the weights had to move: the placement is not SGLang's trivial start
    S = SGLANG.slots_per_rank
    for rank, res in enumerate(results):
        mine = published.table[:, rank * S : (rank + 1) * S]
        for row, hidden in enumerate(SGLANG.moe_layers):
            weights, ids = res["weights"][str(hidden)]
            assert np.array_equal(np.asarray(weights), np.repeat(mine[row][:, None], 4, axis=1))
            assert ids == mine[row].tolist()
        p2l, dispatch = np.asarray(res["p2l"]), np.asarray(res["dispatch"])
        assert np.array_equal(p2l[SGLANG.dense_layers :], published.table)
        for hidden in SGLANG.moe_layers:
            assert np.array_equal(p2l[hidden, dispatch[hidden]], np.arange(SGLANG.experts))
    # 5. every replayed (token, expert) pair was counted once, across the ranks
    passes = len(results[0]["versions"])
    top_k = Trace(DEFAULT_ROUTING, PROMPTS).shape[1]
    counted = sum(res["counted"] for res in results)
    assert counted == passes * TOKENS * len(SGLANG.moe_layers) * top_k
    switches = [res["switched_at"].get(str(first)) for res in results]
    latency = f"{max(switches) - written:.1f} s" if all(switches) else "not measured (skipped)"
    print(
        f"operator's v{first}: from the ConfigMap write to the switch of all {RANKS} ranks "
        f"{latency} (kubelet lag {RANKS - 1} x {KUBELET_LAG_S} s, agreement every "
        f"{CHECK_EVERY} passes of {STEP_S} s; SGLang's updater "
        f"{max(res['events'][-1]['move_s'] for res in results) * 1e3:.0f} ms for {moved} "
        f"moved slots); ranks end on v{version} ({published.strategy}); {passes} passes, "
        f"{counted} routed pairs counted; {time.monotonic() - started:.0f} s"
    )
