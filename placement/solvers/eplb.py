"""DeepSeek's EPLB, written from its published description (docs/anchors.md), in numpy.

Greedy in three steps, per layer:

1. pack the E/num_groups-expert groups onto nodes: groups sorted by load, heaviest first,
   each to the lightest node that still has room (every node gets num_groups/num_nodes);
2. within each node, add replicas one at a time to the expert with the largest load per copy
   until the node has P/num_nodes physical experts;
3. within each node, pack the physical experts onto its GPUs the same way as step 1, each copy
   weighing load/copies (every GPU gets P/G slots).

``num_groups % num_nodes != 0`` falls back to the global policy (one group, one node). Ties are
broken by the lowest index (stable sorts), which reproduces the published worked example.

Shapes: weight [L, E]; phy2log [L, P] (slot s on GPU s // (P/G)); log2phy [L, E, P-E+1]
(-1 padded, copies in rank order); logcnt [L, E].
"""

from __future__ import annotations

import time

import numpy as np

from placement.model import FloatArray, IntArray
from placement.problem import Problem
from placement.solvers.base import Solution, SolveOptions, heuristic_solution, register


def balanced_packing(weight: FloatArray, num_packs: int) -> tuple[IntArray, IntArray]:
    """[X, n] item weights -> (pack [X, n], rank in pack [X, n]); n/num_packs items per pack,
    heaviest item first onto the lightest pack that has room."""
    X, n = weight.shape
    per_pack = n // num_packs
    pack = np.zeros((X, n), dtype=np.int64)
    rank = np.zeros((X, n), dtype=np.int64)
    if per_pack == 1:
        pack[:] = np.arange(n)
        return pack, rank
    rows = np.arange(X)
    order = np.argsort(-weight, axis=-1, kind="stable")  # heaviest first, ties by index
    load = np.zeros((X, num_packs))
    count = np.zeros((X, num_packs), dtype=np.int64)
    for i in range(n):  # vectorised over the X rows
        item = order[:, i]
        p = np.argmin(np.where(count < per_pack, load, np.inf), axis=-1)  # lowest index on ties
        pack[rows, item] = p
        rank[rows, item] = count[rows, p]
        load[rows, p] += weight[rows, item]
        count[rows, p] += 1
    return pack, rank


def replicate_experts(weight: FloatArray, num_phy: int) -> tuple[IntArray, IntArray, IntArray]:
    """[X, n] loads -> (phy2log [X, num_phy], replica rank [X, num_phy], count [X, n]): the
    first n physical experts are the logical ones, each further one copies the expert with the
    largest load per copy."""
    X, n = weight.shape
    phy2log = np.zeros((X, num_phy), dtype=np.int64)
    rank = np.zeros((X, num_phy), dtype=np.int64)
    count = np.ones((X, n), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    rows = np.arange(X)
    for i in range(n, num_phy):
        hot = np.argmax(weight / count, axis=-1)
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
    weight: FloatArray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[IntArray, IntArray, IntArray]:
    """Returns (phy2log [L, P], replica rank [L, P], logcnt [L, E])."""
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_phy // num_gpus
    E_node, P_node = E // num_nodes, num_phy // num_nodes
    # step 1: groups -> nodes; "mlog" numbers experts node by node
    group_load = weight.reshape(L, num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    first = (gpack * groups_per_node + grank) * group_size  # [L, groups]
    log2mlog = (first[:, :, None] + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # step 2: replicas within each node
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(L * num_nodes, E_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, P_node)
    # step 3: physical experts -> GPUs of the node
    per_copy = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, -1)
    pack, rank = balanced_packing(per_copy, num_gpus // num_nodes)
    phy2pphy = pack * per_gpu + rank
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    offset = (np.arange(num_nodes) * E_node)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, P_node) + offset).reshape(L, num_phy)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(L, num_phy)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, -1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: FloatArray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[IntArray, IntArray, IntArray]:
    """EPLB: weight [L, E] -> (phy2log [L, P], log2phy [L, E, P-E+1] -1 padded, logcnt [L, E])
    with P = ``num_replicas``. Hierarchical when ``num_groups % num_nodes == 0``, else global."""
    w = np.asarray(weight, dtype=np.float64)
    L, E = w.shape
    if num_replicas < E or num_replicas % num_gpus or num_gpus % num_nodes:
        raise ValueError(
            f"need E={E} <= P={num_replicas}, P % gpus == 0 and gpus % nodes == 0 "
            f"(gpus={num_gpus}, nodes={num_nodes})"
        )
    if num_groups % num_nodes == 0 and E % num_groups == 0:
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    maxcnt = num_replicas - E + 1
    log2phy = np.full((L, E * maxcnt), -1, dtype=np.int64)
    rows = np.arange(L)[:, None]
    log2phy[rows, phy2log * maxcnt + rank] = np.arange(num_replicas)
    return phy2log, log2phy.reshape(L, E, maxcnt), logcnt


def repair_duplicates(
    table: IntArray, num_gpus: int, load: FloatArray
) -> tuple[IntArray, int, int]:
    """Swap slots so that no GPU holds two copies of one expert; returns (table, swaps,
    replacements).

    ``table`` [L, P], ``load`` [L, E]. A duplicate copy of e on GPU g is swapped with a slot
    holding x on another GPU h where e is absent from h and x from g; among those, the one whose
    per-copy load is closest to e's (the GPUs' loads change least). When no swap exists (e has
    more copies than GPUs can hold apart), the duplicate slot is given to the expert with the
    largest per-copy load that g does not hold (a replacement: copy counts change).
    """
    out = table.copy()
    L, P = out.shape
    S = P // num_gpus
    E = load.shape[1]
    gpu_of = np.arange(P) // S
    swaps = replaced = 0
    for layer in range(L):
        row = out[layer]
        cnt = np.bincount(row, minlength=E)
        per_copy = load[layer] / np.maximum(cnt, 1)
        on = np.zeros((num_gpus, E), dtype=np.int64)  # copies of e on GPU g
        np.add.at(on, (gpu_of, row), 1)
        for s in range(P):
            g, e = int(gpu_of[s]), int(row[s])
            if on[g, e] < 2:
                continue
            # swap candidates: slot t on GPU h != g, h without e, g without row[t]
            ok = (gpu_of != g) & (on[gpu_of, e] == 0) & (on[g, row] == 0)
            if ok.any():
                cost = np.where(ok, np.abs(per_copy[row] - per_copy[e]), np.inf)
                t = int(np.argmin(cost))
                h, x = int(gpu_of[t]), int(row[t])
                row[s], row[t] = x, e
                on[g, e] -= 1
                on[g, x] += 1
                on[h, x] -= 1
                on[h, e] += 1
                swaps += 1
                continue
            # e has more copies than any swap can spread (EPLB does not cap copies at G):
            # give the slot to the expert with the largest per-copy load not on g
            x = int(np.argmax(np.where(on[g] > 0, -np.inf, per_copy)))
            cnt[e] -= 1
            cnt[x] += 1
            per_copy = load[layer] / np.maximum(cnt, 1)
            row[s] = x
            on[g, e] -= 1
            on[g, x] += 1
            replaced += 1
    return out, swaps, replaced


def _node_layout(problem: Problem) -> int:
    """Number of nodes if GPUs come in equal, contiguous blocks per node, else 1."""
    node = problem.cluster.node_of_gpu
    n = len(problem.cluster.nodes)
    G = problem.cluster.size
    if G % n or problem.num_slots % n:
        return 1
    blocks = np.repeat(np.arange(n), G // n)
    return n if np.array_equal(node, blocks) else 1


def _solve(problem: Problem, groups: int, nodes: int, name: str) -> Solution:
    start = time.perf_counter()
    G = problem.cluster.size
    phy2log, _, _ = rebalance_experts(problem.load, problem.num_slots, groups, nodes, G)
    table, swaps, replaced = repair_duplicates(phy2log, G, problem.load)
    details = {
        "duplicate_repairs": float(swaps),
        "duplicate_replacements": float(replaced),
        "nodes": float(nodes),
        "groups": float(groups),
    }
    return heuristic_solution(problem, table, name, start, details)


@register("eplb")
def solve_eplb(problem: Problem, options: SolveOptions) -> Solution:
    """EPLB on the problem's mean load, hierarchical with groups = nodes when the experts
    divide (else global). Duplicates on one GPU (which EPLB can produce) are repaired by swaps;
    ``details`` counts them."""
    nodes = _node_layout(problem)
    groups = nodes if problem.model.experts % nodes == 0 else 1
    return _solve(problem, groups, nodes, "eplb")


@register("eplb-global")
def solve_eplb_global(problem: Problem, options: SolveOptions) -> Solution:
    """EPLB's global policy (one group, one node): what vLLM and SGLang run for models without
    expert groups (DeepSeek-V2-Lite, Qwen3-MoE, Mixtral). Same duplicate repair as ``eplb``."""
    return _solve(problem, 1, 1, "eplb-global")
