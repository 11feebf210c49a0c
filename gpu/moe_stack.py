"""GPU call 2: a real expert-parallel MoE layer stack over N GPUs (one process per GPU, NCCL),
executing the placements that make_placements.py computed from call 1's profile.

Per MoE layer on every rank (DeepSeek-V2-Lite routing: 26 MoE layers, 64 routed experts, top-6;
SwiGLU experts in bf16 of the plan's expert shape, 2048x1408 by default, or a heavier one such as
mixtral-8x7b 4096x14336 (``--expert-shape``); the rank holds the experts of its S slots):
  rms_norm -> gather rows by destination -> all_to_all_single (dispatch) -> rows grouped by
  local slot -> grouped SwiGLU FFN of the S local experts (the kernel the profiler timed) ->
  all_to_all_single (combine) -> weighted sum into the residual stream.
Routing is replayed from the held-out part of the real trace (gpu/carry/routing.npz); each
batch of B tokens is split evenly over the ranks; a logical expert's tokens are split evenly
over its copies (round-robin by token order), which is what the placement library predicts.
Every rank named in plan.json's slowRanks (older plans: slowRank) runs a co-tenant (k SMs held,
see kernels.CoTenant) in the "slowed" scenario.

Expert weights: per layer and expert (copies of an expert identical) where they fit; otherwise
(``--shared-weights auto``: over 80 GiB per rank for all placements, e.g. mixtral-8x7b: 26 layers
x 36 slots x 352 MB) ONE set of S slot weights per rank serves every layer and every placement.
Timing is unchanged by that (each layer still streams all its S experts' weights from HBM, far
more than L2), and the layer-0 check then compares against the weights of the slot each
token-expert pair was sent to.

Timing: CUDA events on each rank around dispatch, expert compute and combine of every layer,
and around each step (all 26 layers); a layer's time is the max over ranks. Placements of one
scenario are all resident at once and interleaved pass by pass, so drift hits them alike.

  python3 gpu/moe_stack.py --out "$OUT"        (reads gpu/placements/plan.json)
Writes $OUT/moe_stack.json (rank 0; rewritten after every scenario).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kernels import (  # noqa: E402
    DEFAULT_SHAPE,
    SHAPES,
    CoTenant,
    CoTenantSpec,
    ensure_safe_env,
    expert_bytes,
    ffn,
    grouped_ffn,
    log,
    make_expert,
    pick_grouped_impl,
    smi,
)

TOPK = 6
LAYERS = 26  # the routing trace's MoE layers (what the plan's placements hold)
SHARED_SEED = 10_000_000  # shared slot weights: slot g (global index) has seed SHARED_SEED + g
SHARED_ABOVE_BYTES = 80 * 2**30  # --shared-weights auto: share above this per rank


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- dispatch plan


def copies_table(row: list[int], experts: int) -> tuple[np.ndarray, np.ndarray]:
    """[E, maxc] slots holding each expert (in slot order) and [E] copy counts."""
    slots: list[list[int]] = [[] for _ in range(experts)]
    for s, e in enumerate(row):
        slots[e].append(s)
    counts = np.array([len(x) for x in slots], dtype=np.int64)
    if (counts == 0).any():
        raise ValueError(f"experts without a copy: {np.flatnonzero(counts == 0)[:8]}")
    table = np.zeros((experts, counts.max()), dtype=np.int64)
    for e, x in enumerate(slots):
        table[e, : len(x)] = x
    return table, counts


def assign_slots(ids: np.ndarray, row: list[int], experts: int) -> np.ndarray:
    """[B*K] global slot of every token-expert pair of ``ids`` [B, K]: the j-th assignment of
    expert e (token order) goes to its copy j mod c_e."""
    flat = ids.reshape(-1).astype(np.int64)
    table, ncopy = copies_table(row, experts)
    order = np.argsort(flat, kind="stable")
    sorted_e = flat[order]
    first = np.searchsorted(sorted_e, np.arange(experts))
    occ = np.empty_like(flat)
    occ[order] = np.arange(flat.size) - first[sorted_e]
    return np.asarray(table[flat, occ % ncopy[flat]], dtype=np.int64)


def layer_dispatch(
    ids: np.ndarray, row: list[int], world: int, slots_per_gpu: int, experts: int
) -> list[dict[str, Any]]:
    """One layer of one batch: for every rank its send/receive bookkeeping.

    ``ids`` [B, K] expert ids of the batch's tokens (rank r owns tokens r*B/W .. ). The j-th
    assignment of expert e (token order) goes to copy j mod c_e. Returns per rank: ``send_tok``
    (local token of each row sent, rows ordered by destination then local slot),
    ``send_splits``, ``recv_splits``, ``perm`` (received rows -> grouped by local slot),
    ``counts`` (rows per local slot) and ``load`` (rows this rank computes).
    """
    B, K = ids.shape
    if B % world:
        raise ValueError(f"batch of {B} tokens does not split over {world} ranks")
    flat = ids.reshape(-1).astype(np.int64)
    slot = assign_slots(ids, row, experts)
    dest = slot // slots_per_gpu
    local = slot % slots_per_gpu
    per_rank = flat.size // world
    out: list[dict[str, Any]] = []
    sends = []
    for r in range(world):
        a = np.arange(r * per_rank, (r + 1) * per_rank)
        key = dest[a] * slots_per_gpu + local[a]
        o = np.argsort(key, kind="stable")
        sel = a[o]
        sends.append(sel)
        out.append(
            {
                "send_tok": (sel - r * per_rank) // K,
                "send_splits": np.bincount(dest[sel], minlength=world).tolist(),
            }
        )
    for d in range(world):
        recv_local = np.concatenate([local[s[dest[s] == d]] for s in sends])
        perm = np.argsort(recv_local, kind="stable")
        out[d]["recv_splits"] = [int((dest[s] == d).sum()) for s in sends]
        out[d]["perm"] = perm
        out[d]["counts"] = np.bincount(recv_local, minlength=slots_per_gpu).tolist()
        out[d]["load"] = int(recv_local.size)
    return out


# --------------------------------------------------------------------------- worker


def slot_weights(rank: int, slots: int, hidden: int, inter: int, dev: Any) -> tuple[Any, Any]:
    """One set of this rank's S slot weights ([S, H, 2I], [S, I, H]) for every layer and
    placement; slot s of rank r is global slot g = r*S + s, seeded SHARED_SEED + g."""
    import torch

    w13 = torch.empty(slots, hidden, 2 * inter, device=dev, dtype=torch.bfloat16)
    w2 = torch.empty(slots, inter, hidden, device=dev, dtype=torch.bfloat16)
    for s in range(slots):
        a, b = make_expert(hidden, inter, dev, seed=SHARED_SEED + rank * slots + s)
        w13[s].copy_(a)
        w2[s].copy_(b)
    return w13, w2


class Stack:
    """One placement's experts and dispatch indices on this rank. ``shared``: the rank's one
    set of slot weights for all layers (see ``slot_weights``); None: weights per layer."""

    def __init__(
        self,
        rank: int,
        world: int,
        placement: dict[str, Any],
        eval_ids: np.ndarray,
        hidden: int,
        inter: int,
        shared: tuple[Any, Any] | None = None,
    ):
        import torch

        self.rank = rank
        dev = torch.device("cuda", rank)
        self.S = int(placement["slotsPerGpu"])
        table = placement["phy2log"]
        self.L = len(table)
        self.table0 = list(table[0])
        self.hidden, self.inter = hidden, inter
        experts = int(placement["model"]["experts"])
        self.experts = experts
        if int(placement["numGpus"]) != world:
            raise ValueError(f"placement for {placement['numGpus']} GPUs, running on {world}")
        mine = [row[rank * self.S : (rank + 1) * self.S] for row in table]
        self.shared = shared is not None
        if shared is not None:
            self.w13, self.w2 = shared
            if int(self.w13.shape[0]) != self.S:
                raise ValueError(f"shared weights hold {self.w13.shape[0]} slots, need {self.S}")
        else:
            self.w13 = torch.empty(
                self.L, self.S, hidden, 2 * inter, device=dev, dtype=torch.bfloat16
            )
            self.w2 = torch.empty(self.L, self.S, inter, hidden, device=dev, dtype=torch.bfloat16)
            for layer in range(self.L):
                for s, e in enumerate(mine[layer]):
                    a, b = make_expert(hidden, inter, dev, seed=layer * 1000 + e)
                    self.w13[layer, s].copy_(a)
                    self.w2[layer, s].copy_(b)
        self.plans: list[list[dict[str, Any]]] = []  # [batch][layer]
        for b in range(eval_ids.shape[0]):
            per_layer = []
            for layer in range(self.L):
                d = layer_dispatch(eval_ids[b, :, layer, :], table[layer], world, self.S, experts)[
                    rank
                ]
                per_layer.append(
                    {
                        "send_tok": torch.from_numpy(d["send_tok"]).to(dev),
                        "perm": torch.from_numpy(d["perm"]).to(dev),
                        "offs": torch.tensor(d["counts"], dtype=torch.int32)
                        .cumsum(0, dtype=torch.int32)
                        .to(dev),
                        "counts": d["counts"],
                        "send_splits": d["send_splits"],
                        "recv_splits": d["recv_splits"],
                        "load": d["load"],
                    }
                )
            self.plans.append(per_layer)

    def weights(self, layer: int) -> tuple[Any, Any]:
        if self.shared:
            return self.w13, self.w2
        return self.w13[layer], self.w2[layer]


def moe_layer(x: Any, st: Stack, layer: int, p: dict[str, Any], impl: Any, ev: list[Any]) -> Any:
    """One MoE layer's output for ``x`` [tokens, H]; records 4 events into ``ev``."""
    import torch
    import torch.distributed as dist

    ev[0].record()
    h = torch.nn.functional.rms_norm(x, (st.hidden,))
    send = h.index_select(0, p["send_tok"])
    recv = torch.empty(sum(p["recv_splits"]), st.hidden, device=x.device, dtype=x.dtype)
    dist.all_to_all_single(recv, send, p["recv_splits"], p["send_splits"])
    xs = recv.index_select(0, p["perm"])
    ev[1].record()
    w13, w2 = st.weights(layer)
    ys = grouped_ffn(xs, w13, w2, p["offs"], p["counts"], impl)
    ev[2].record()
    back = torch.empty_like(recv)
    back.index_copy_(0, p["perm"], ys)
    ret = torch.empty_like(send)
    dist.all_to_all_single(ret, back, p["send_splits"], p["recv_splits"])
    y = torch.zeros_like(x).index_add_(0, p["send_tok"], ret, alpha=1.0 / TOPK)
    ev[3].record()
    return y


def check_layer(rank: int, st: Stack, x: Any, eval_ids: np.ndarray, impl: Any) -> float:
    """Relative error of layer 0's MoE output for this rank's first 64 tokens against a float32
    reference computed locally from regenerated expert weights (shared slot weights: those of
    the slot each token-expert pair was sent to)."""
    import torch

    dev = x.device
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    y = moe_layer(x, st, 0, st.plans[0][0], impl, events).float()
    torch.cuda.synchronize(dev)
    B = eval_ids.shape[1]
    world = B // x.shape[0]
    first = rank * (B // world)
    ids = eval_ids[0, first : first + 64, 0, :]
    if st.shared:
        slot = assign_slots(eval_ids[0, :, 0, :], st.table0, st.experts)
        keys = slot.reshape(B, -1)[first : first + 64]
        seeds = {int(g): SHARED_SEED + int(g) for g in np.unique(keys)}
    else:
        keys = ids
        seeds = {int(e): 0 * 1000 + int(e) for e in np.unique(ids)}
    h = torch.nn.functional.rms_norm(x[:64], (st.hidden,)).float()
    ref = torch.zeros(64, st.hidden, device=dev)
    for key, seed in seeds.items():
        w13, w2 = make_expert(st.hidden, st.inter, dev, seed=seed)
        rows = np.flatnonzero((keys == key).any(axis=1))
        idx = torch.from_numpy(rows).to(dev)
        ref.index_add_(0, idx, ffn(h[idx], w13.float(), w2.float()) / TOPK)
    err = float((y[:64] - ref).norm() / ref.norm())
    return err


def worker(rank: int, world: int, cfg: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{cfg['port']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=cfg["nccl_timeout_s"]),
        device_id=dev,
    )
    t_end = time.monotonic() + cfg["budget_s"]
    plan = json.loads(Path(cfg["plan"]).read_text())
    with np.load(cfg["routing"]) as z:
        eval_ids = z["eval_ids"][: cfg["batches"]]
    profiled_impl = plan.get("impl", {}).get(str(rank), "grouped_mm")
    impl = pick_grouped_impl(dev, force_loop=cfg["loop"] or profiled_impl == "loop")
    if impl.name != profiled_impl:
        log(f"rank {rank}: WARNING: stack runs {impl.name}, the profile timed {profiled_impl}")
    hidden, inter = SHAPES[cfg["shape"]]
    results: dict[str, Any] = {
        "startedAt": now_iso(),
        "world": world,
        "expertShape": {"name": cfg["shape"], "hidden": hidden, "intermediate": inter},
        "sharedWeights": cfg["shared"],
        "impl": impl.name,
        "gpus": [torch.cuda.get_device_name(i) for i in range(world)],
        "torch": torch.__version__,
        "env": {
            k: os.environ.get(k)
            for k in (
                "NCCL_NVLS_ENABLE",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                "NVSHMEM_DISABLE_NVLS",
            )
        },
        "batchTokens": int(eval_ids.shape[1]),
        "batches": int(eval_ids.shape[0]),
        "scenarios": [],
    }
    # every rank in slowRanks runs the co-tenant; plans from before slowRanks name one slowRank
    slow_ranks = {int(r) for r in plan.get("slowRanks") or [plan.get("slowRank", 1)]}
    tokens_per_rank = eval_ids.shape[1] // world
    shared = None
    if cfg["shared"]:
        t0 = time.monotonic()
        shared = slot_weights(rank, cfg["slots"], hidden, inter, dev)
        torch.cuda.synchronize(dev)
        log(
            f"rank {rank}: one set of {cfg['slots']} {cfg['shape']} slot weights for every layer "
            f"and placement ({shared[0].nbytes * 1.5 / 2**30:.1f} GiB, "
            f"{time.monotonic() - t0:.1f}s)"
        )

    def agree(ok: bool) -> bool:
        t = torch.tensor([1 if ok else 0], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    for scen in plan["scenarios"]:
        if cfg["scenarios"] and scen["name"] not in cfg["scenarios"]:
            continue
        if not agree(time.monotonic() < t_end - 30):
            log(f"rank {rank}: out of time before scenario {scen['name']}")
            break
        sres: dict[str, Any] = {"name": scen["name"], "cotenant": None, "strategies": {}}
        t0 = time.monotonic()
        stacks: dict[str, Stack] = {}
        try:
            for strat, rel in scen["placements"].items():
                placement = json.loads((HERE / rel).read_text())
                stacks[strat] = Stack(rank, world, placement, eval_ids, hidden, inter, shared)
            ok = True
        except Exception:
            sres["error"] = traceback.format_exc()
            log(f"rank {rank}: setup failed\n{sres['error']}")
            ok = False
        if not agree(ok):
            results["scenarios"].append(sres)
            continue
        torch.cuda.synchronize(dev)
        log(
            f"rank {rank}: {scen['name']}: {len(stacks)} placements loaded "
            f"in {time.monotonic() - t0:.1f}s"
        )
        gen = torch.Generator(device=dev).manual_seed(100 + rank)
        xs = [
            torch.randn(tokens_per_rank, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
            for _ in range(eval_ids.shape[0])
        ]
        # correctness of the distributed layer against a local reference
        sres["checkRelErr"] = {
            s: check_layer(rank, st, xs[0], eval_ids, impl) for s, st in stacks.items()
        }
        log(f"rank {rank}: layer-0 check rel err {sres['checkRelErr']}")
        L = next(iter(stacks.values())).L
        ev = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(L)]
        step_ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        rec: dict[str, dict[str, list[Any]]] = {
            s: {"phases": [], "step": [], "wall": []} for s in stacks
        }
        spec = scen.get("cotenant") and plan.get("cotenant")
        tenant = (
            CoTenant(CoTenantSpec.parse(spec["name"]), rank)
            if spec and rank in slow_ranks
            else None
        )
        try:
            if tenant is not None:
                try:
                    tenant.__enter__()
                    sres["cotenant"] = {
                        "rank": rank,
                        **tenant.spec.as_dict(),
                        "heldSms": tenant.held_sms,
                    }
                except Exception as e:  # run on unslowed, and say so in the results
                    tenant.error = f"co-tenant did not start: {type(e).__name__}: {e}"
                    log(f"rank {rank}: {tenant.error}")
            order = list(stacks)
            for rep in range(-1, cfg["reps"]):  # rep -1: warm-up, not recorded
                if not agree(time.monotonic() < t_end - 20):
                    log(f"rank {rank}: out of time at pass {rep}")
                    break
                for strat in order[rep % len(order) :] + order[: rep % len(order)]:
                    st = stacks[strat]
                    for b in range(eval_ids.shape[0]):
                        x = xs[b]
                        dist.barrier(device_ids=[rank])
                        stream = torch.cuda.current_stream(dev)  # not the device: a hold
                        stream.synchronize()  # co-tenant's seconds-long kernels run beside
                        w0 = time.perf_counter()
                        step_ev[0].record()
                        for layer in range(L):
                            x = x + moe_layer(x, st, layer, st.plans[b][layer], impl, ev[layer])
                        step_ev[1].record()
                        stream.synchronize()
                        wall = (time.perf_counter() - w0) * 1e6
                        if rep >= 0:
                            rec[strat]["phases"].append(
                                [
                                    [
                                        e[0].elapsed_time(e[1]) * 1e3,
                                        e[1].elapsed_time(e[2]) * 1e3,
                                        e[2].elapsed_time(e[3]) * 1e3,
                                        e[0].elapsed_time(e[3]) * 1e3,
                                    ]
                                    for e in ev
                                ]
                            )
                            rec[strat]["step"].append(step_ev[0].elapsed_time(step_ev[1]) * 1e3)
                            rec[strat]["wall"].append(wall)
                            rec[strat].setdefault("batch", []).append(b)
                            rec[strat].setdefault("rep", []).append(rep)
        finally:
            if tenant is not None:
                tenant.__exit__(None, None, None)
                sres["cotenantError"] = tenant.error
                sres["cotenantLaunches"] = tenant.launches
        # gather every rank's records on rank 0
        mine = {
            s: {**r, "loads": [[p["load"] for p in bl] for bl in stacks[s].plans]}
            for s, r in rec.items()
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(
            gathered,
            {
                "rank": rank,
                "rec": mine,
                "cot": sres.get("cotenant"),
                "cotErr": sres.get("cotenantError"),
                "check": sres["checkRelErr"],
            },
        )
        if rank == 0:
            for s in stacks:
                per_rank = [g["rec"][s] for g in gathered]
                phases = np.array([r["phases"] for r in per_rank])  # [rank, run, layer, 4]
                layer_max = phases[..., 3].max(axis=0)  # [run, layer]
                compute_max = phases[..., 1].max(axis=0)
                sres["strategies"][s] = {
                    "batch": per_rank[0].get("batch", []),
                    "rep": per_rank[0].get("rep", []),
                    "layerMicros": layer_max.round(2).tolist(),
                    "computeMaxMicros": compute_max.round(2).tolist(),
                    "phasesPerRank": phases.round(
                        2
                    ).tolist(),  # [rank][run][layer][disp,comp,comb,total]
                    "stepMicros": np.max([r["step"] for r in per_rank], axis=0).round(1).tolist(),
                    "wallMicros": np.max([r["wall"] for r in per_rank], axis=0).round(1).tolist(),
                    "loads": [r["loads"] for r in per_rank],  # [rank][batch][layer]
                }
                if layer_max.size:
                    log(
                        f"{scen['name']}/{s}: step "
                        f"{np.median(sres['strategies'][s]['stepMicros']):.0f} µs, "
                        f"layer median {np.median(layer_max):.0f} µs, compute straggler median "
                        f"{np.median(compute_max):.0f} µs"
                    )
            # the co-tenant runs on the slowed ranks only; rank 0 reports for the group
            # ("cotenant": the first slowed rank's, "cotenantRanks": every rank that ran one)
            sres["cotenant"] = next((g["cot"] for g in gathered if g["cot"]), None)
            sres["cotenantRanks"] = [g["rank"] for g in gathered if g["cot"]]
            sres["perRank"] = [
                {
                    "rank": g["rank"],
                    "cotenant": g["cot"],
                    "cotenantError": g["cotErr"],
                    "check": g["check"],
                }
                for g in gathered
            ]
            sres["wall_s"] = time.monotonic() - t0
            sres["smi"] = smi()
            results["scenarios"].append(sres)
            results["finishedAt"] = now_iso()
            out = Path(cfg["out"]) / "moe_stack.json"
            out.write_text(json.dumps(results))
        st = x = None  # type: ignore[assignment]
        del stacks, xs, st, x
        torch.cuda.empty_cache()
    dist.barrier(device_ids=[rank])
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--plan", type=Path, default=HERE / "placements" / "plan.json")
    ap.add_argument("--routing", type=Path, default=HERE / "carry" / "routing.npz")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--scenarios", default="", help="comma list; default all in plan.json")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--nccl-timeout-s", type=float, default=180.0)
    ap.add_argument("--loop", action="store_true", help="per-expert loop instead of grouped GEMM")
    ap.add_argument(
        "--expert-shape",
        choices=sorted(SHAPES),
        help="expert shape (default: plan.json's expertShape, else deepseek-v2-lite); must match "
        "the plan's, whose predictions come from that shape's layer curve",
    )
    ap.add_argument(
        "--shared-weights",
        choices=("auto", "yes", "no"),
        default="auto",
        help="one set of slot weights for every layer and placement (auto: where per-layer "
        f"weights of all placements would exceed {SHARED_ABOVE_BYTES / 2**30:.0f} GiB per rank)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = ensure_safe_env()
    log(f"safe env {env}")
    for p in (args.plan, args.routing):
        if not p.is_file():
            log(f"missing {p}: run gpu/make_placements.py here and carry gpu/carry")
            return 2
    import torch
    import torch.multiprocessing as mp

    plan = json.loads(args.plan.read_text())
    world = torch.cuda.device_count()
    need = slots = None
    placements = 0
    for scen in plan["scenarios"]:
        placements = max(placements, len(scen["placements"]))
        for rel in scen["placements"].values():
            pl = json.loads((HERE / rel).read_text())
            need, slots = pl["numGpus"], int(pl["slotsPerGpu"])
    if need is None or slots is None or world < need:
        log(f"need {need} GPUs, have {world}")
        return 2
    planned = (plan.get("expertShape") or {}).get("name", DEFAULT_SHAPE)
    shape = args.expert_shape or planned
    if shape != planned:
        log(f"--expert-shape {shape}, but the plan was solved for {planned}: solve again")
        return 2
    per_layer_bytes = LAYERS * slots * expert_bytes(shape) * placements
    shared = args.shared_weights == "yes" or (
        args.shared_weights == "auto" and per_layer_bytes > SHARED_ABOVE_BYTES
    )
    log(
        f"expert shape {shape} {SHAPES[shape]}; per-layer weights of {placements} placements "
        f"would take {per_layer_bytes / 2**30:.1f} GiB per rank: "
        + ("ONE set of slot weights serves every layer and placement" if shared else "per layer")
    )
    cfg = {
        "port": free_port(),
        "plan": str(args.plan),
        "routing": str(args.routing),
        "reps": args.reps,
        "batches": args.batches,
        "scenarios": [s for s in args.scenarios.split(",") if s],
        "budget_s": args.budget_s,
        "nccl_timeout_s": args.nccl_timeout_s,
        "out": str(args.out),
        "loop": args.loop,
        "shape": shape,
        "shared": shared,
        "slots": slots,
    }
    log(f"spawning {need} ranks; smi {smi()}")
    try:
        mp.spawn(worker, args=(need, cfg), nprocs=need, join=True)
    except Exception:
        log(f"ranks failed:\n{traceback.format_exc()}")
        return 1
    log(f"done; wrote {sorted(p.name for p in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
