"""DeepSeek's EPLB, exactly: the same phy2log, log2phy and logcnt as DeepSeek's eplb.py (which
SGLang ships as ``eplb_algorithms/deepseek.py``) for the same input, ties included; vLLM's
numpy port ``DefaultEplbPolicy`` gives the same phy2log on loads without ties (on ties it
orders equal loads as numpy's argsort does: the same replica counts and per-GPU loads, other
slots). Written from the published description (docs/anchors.md) in numpy.

Greedy in three steps, per layer:

1. pack the E/num_groups-expert groups onto nodes: groups sorted by load, heaviest first,
   each to the lightest node that still has room (every node gets num_groups/num_nodes);
2. within each node, add replicas one at a time to the expert with the largest load per copy
   until the node has P/num_nodes physical experts;
3. within each node, pack the physical experts onto its GPUs the same way as step 1, each copy
   weighing load/copies (every GPU gets P/G slots).

Exactness: DeepSeek computes in float32 (loads, load per copy) and sums the packs' loads in
float64; ties between equal loads go as torch on CPU leaves them: ``sort(descending=True)`` is
libstdc++'s introsort, not stable past 16 items (:mod:`placement.solvers.introsort` replays
it), the first maximum, the first lightest pack. We do the same. Group sums are rounded once
to float32 (torch may differ in the last bit for non-integer loads; token counts are integers).

Two copies of one expert on one GPU: step 3 does not prevent it, and the engines run such a
placement as it is (vLLM, SGLang's default dispatch). The ``eplb`` solvers return DeepSeek's
output unchanged, because the baseline must be what the engines run. The evaluator scores it as
the engines dispatch it: every copy gets load/copies (``even``), so a GPU with two copies of e
carries 2·load/copies of e; the second copy is a slot that balances nothing across GPUs.
``details['duplicates_on_gpu']`` counts such extra copies (see
:func:`placement.validate.duplicate_copies`).

Shapes: weight [L, E]; phy2log [L, P] (slot s on GPU s // (P/G)); replica rank [L, P];
log2phy [L, E, max logcnt] (-1 padded, by replica rank); logcnt [L, E].
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from placement.formats import log2phy_table
from placement.model import IntArray
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions, heuristic_solution, register
from placement.solvers.introsort import descending_order
from placement.validate import duplicate_copies

Float32Array = npt.NDArray[np.float32]


def balanced_packing(weight: npt.ArrayLike, num_packs: int) -> tuple[IntArray, IntArray]:
    """[X, n] item weights -> (pack [X, n], rank in pack [X, n]); n/num_packs items per pack,
    heaviest item first (ties: torch's sort order) onto the lightest pack that has room (ties:
    lowest pack). Weights are read as float32, the packs' loads summed in float64."""
    w = np.asarray(weight, dtype=np.float32)
    X, n = w.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n, dtype=np.int64), (X, 1)), np.zeros((X, n), dtype=np.int64)
    pack = np.zeros((X, n), dtype=np.int64)
    rank = np.zeros((X, n), dtype=np.int64)
    rows = np.arange(X)
    order = np.array([descending_order(row) for row in w.tolist()], dtype=np.int64)
    load = np.zeros((X, num_packs))
    count = np.zeros((X, num_packs), dtype=np.int64)
    for i in range(n):  # vectorised over the X rows
        item = order[:, i]
        p = np.argmin(np.where(count < per_pack, load, np.inf), axis=-1)
        pack[rows, item] = p
        rank[rows, item] = count[rows, p]
        load[rows, p] += w[rows, item].astype(np.float64)
        count[rows, p] += 1
    return pack, rank


def replicate_experts(weight: npt.ArrayLike, num_phy: int) -> tuple[IntArray, IntArray, IntArray]:
    """[X, n] loads -> (phy2log [X, num_phy], replica rank [X, num_phy], count [X, n]): the
    first n physical experts are the logical ones (rank 0), each further one copies the expert
    with the largest float32 load per copy (ties: lowest index) and gets the next rank."""
    w = np.asarray(weight, dtype=np.float32)
    X, n = w.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (X, 1))
    rank = np.zeros((X, num_phy), dtype=np.int64)
    count = np.ones((X, n), dtype=np.int64)
    rows = np.arange(X)
    for i in range(n, num_phy):
        hot = np.argmax(w / count.astype(np.float32), axis=-1)
        phy2log[:, i] = hot
        rank[:, i] = count[rows, hot]
        count[rows, hot] += 1
    return phy2log, rank, count


def _inverse(perm: IntArray) -> IntArray:
    inv = np.empty_like(perm)
    rows = np.arange(perm.shape[0])[:, None]
    inv[rows, perm] = np.arange(perm.shape[1])
    return inv


def _hierarchical(
    weight: Float32Array, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[IntArray, IntArray, IntArray]:
    """weight [L, E] float32 -> (phy2log [L, P], replica rank [L, P], logcnt [L, E])."""
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    E_node, P_node = E // num_nodes, num_phy // num_nodes
    # step 1: groups -> nodes; "mlog" numbers experts node by node
    group_load = weight.reshape(L, num_groups, group_size).sum(-1, dtype=np.float64)
    gpack, grank = balanced_packing(group_load.astype(np.float32), num_nodes)
    first = (gpack * groups_per_node + grank) * group_size  # [L, groups]
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # step 2: replicas within each node, [L * nodes, E_node]
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(L * num_nodes, E_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, P_node)
    # step 3: physical experts -> GPUs of the node, each copy weighing load/copies (float32)
    per_copy = np.take_along_axis(mlog_load / mlogcnt.astype(np.float32), phy2mlog, -1)
    pack, rank = balanced_packing(per_copy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    offset = (np.arange(num_nodes) * E_node)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, P_node) + offset).reshape(L, num_phy)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(L, num_phy)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, -1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: npt.ArrayLike,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    hierarchical: bool | None = None,
) -> tuple[IntArray, IntArray, IntArray]:
    """DeepSeek's ``rebalance_experts``: weight [L, E] -> (phy2log [L, P], log2phy [L, E, max
    logcnt] -1 padded by replica rank, logcnt [L, E]) with P = ``num_replicas``.

    ``hierarchical=None`` decides as DeepSeek's eplb.py and vLLM do: hierarchical when
    ``num_groups % num_nodes == 0``, else global (one group, one node); SGLang passes it
    explicitly. Bad shapes raise ValueError (DeepSeek asserts)."""
    phy2log, rank, logcnt = replicas_and_ranks(
        weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical
    )
    return phy2log, log2phy_table(phy2log, logcnt.shape[1], rank)[0], logcnt


def replicas_and_ranks(
    weight: npt.ArrayLike,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    hierarchical: bool | None = None,
) -> tuple[IntArray, IntArray, IntArray]:
    """As :func:`rebalance_experts`, returning (phy2log [L, P], replica rank [L, P], logcnt
    [L, E]): the ranks are what log2phy is ordered by."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {w.shape}")
    E = w.shape[1]
    if hierarchical is None:
        hierarchical = num_groups % num_nodes == 0
    if not hierarchical:
        num_groups = num_nodes = 1
    problems = [
        f"P={num_replicas} < E={E}" if num_replicas < E else "",
        f"P={num_replicas} % gpus={num_gpus} != 0" if num_replicas % num_gpus else "",
        f"gpus={num_gpus} % nodes={num_nodes} != 0" if num_gpus % num_nodes else "",
        f"E={E} % groups={num_groups} != 0" if E % num_groups else "",
        f"groups={num_groups} % nodes={num_nodes} != 0" if num_groups % num_nodes else "",
    ]
    if any(problems):
        raise ValueError("EPLB cannot place this: " + ", ".join(p for p in problems if p))
    return _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)


def _node_layout(problem: Problem) -> int:
    """Number of nodes if GPUs come in equal, contiguous blocks per node, else 1."""
    node = problem.cluster.node_of_gpu
    n = len(problem.cluster.nodes)
    G = problem.cluster.size
    if G % n or problem.num_slots % n:
        return 1
    blocks = np.repeat(np.arange(n), G // n)
    return n if np.array_equal(node, blocks) else 1


def _policy(problem: Problem, strategy: str) -> tuple[int, int]:
    """(num_groups, num_nodes) the ``eplb`` / ``eplb-global`` strategy runs with."""
    if strategy == "eplb-global":
        return 1, 1
    nodes = _node_layout(problem)
    return (nodes if problem.model.experts % nodes == 0 else 1), nodes


def replica_ranks(problem: Problem, strategy: str) -> IntArray | None:
    """[L, P] replica ranks of the ``eplb``/``eplb-global`` placement for ``problem`` (what
    DeepSeek orders log2phy by; pass them to ``formats.dumps(..., ranks=)``), None for other
    strategies. EPLB is deterministic: this re-runs it."""
    if strategy not in ("eplb", "eplb-global"):
        return None
    groups, nodes = _policy(problem, strategy)
    _, ranks, _ = replicas_and_ranks(
        problem.load, problem.num_slots, groups, nodes, problem.cluster.size
    )
    return ranks


def _solve(problem: Problem, strategy: str) -> Solution:
    start = time.perf_counter()
    G = problem.cluster.size
    groups, nodes = _policy(problem, strategy)
    phy2log, _, _ = replicas_and_ranks(problem.load, problem.num_slots, groups, nodes, G)
    details = {
        "nodes": float(nodes),
        "groups": float(groups),
        "duplicates_on_gpu": float(len(duplicate_copies(phy2log, G))),
    }
    return heuristic_solution(problem, phy2log, strategy, start, details)


@register("eplb", duplicates_on_gpu=True)
def solve_eplb(problem: Problem, options: SolveOptions) -> Solution:
    """DeepSeek's hierarchical EPLB on the problem's mean load, with groups = nodes when the
    experts divide (else its global policy). Output unchanged: it may hold two copies of an
    expert on one GPU (``details['duplicates_on_gpu']``), as the engines run it."""
    return _solve(problem, "eplb")


@register("eplb-global", duplicates_on_gpu=True)
def solve_eplb_global(problem: Problem, options: SolveOptions) -> Solution:
    """DeepSeek's global EPLB (one group, one node): what vLLM and SGLang run for models
    without expert groups (DeepSeek-V2-Lite, Qwen3-MoE, Mixtral). Output unchanged."""
    return _solve(problem, "eplb-global")
