"""Reference serving stand-in: a small but real expert-parallel MoE layer stack on CPU.

``python -m moeplace_serving.standin --ranks 4 --placement-dir DIR ...`` starts one process per
rank (real processes, ``--rank`` runs a single one, e.g. as a "pod"). Every rank:

* holds the experts of its slots as real SwiGLU FFNs in numpy (``--hidden``, ``--ffn``),
  loaded ("moved") before each placement switch;
* replays real top-6 routing of DeepSeek-V2-Lite (``--routing``, a prompt slice ``--prompts``;
  ``--shift-prompts`` emulates a load shift after ``--shift-after-steps`` or once
  ``--shift-file`` exists, agreed by all ranks at a step boundary): each step takes
  ``--tokens`` tokens; rank r owns tokens r, r+N, ... (counted in its routing metrics) and
  every (token, expert) pair is dispatched to a slot per the current placement (``--dispatch``
  even, speed-aware, or ``alternate``: even on even steps, speed-aware on odd ones, to compare
  both under the same traffic), as an all-to-all would;
* computes the pairs sent to its slots, checking each against the expert it holds (a pair for
  an expert it does not hold counts as misrouted);
* EMULATES GPU speed: a rank's layer time is its measured CPU time for the expert FFNs (least
  of 3 runs, robust to other work on the machine) divided by its speed factor (``--speeds``);
* at each step end all-reduces per-layer times (max: the straggler, as the EP combine waits for
  the slowest rank), pair counts (sum: none lost) and the placement version (all equal);
  ``moe_layer_compute_seconds_total`` counts the emulated GPU time;
* follows its placement directory with the watcher and switches in lock-step;
* serves ``/metrics`` on ``--metrics-port + rank``.

Rank 0 writes one JSON line per step to ``--report`` and prints a per-version summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

from moeplace_serving.collective import LoopbackCollective
from moeplace_serving.dispatch import MODES, Dispatcher, Mode
from moeplace_serving.metrics import ServingMetrics
from moeplace_serving.switch import LockStepSwitch
from moeplace_serving.watcher import PlacementWatcher, ServingShape
from placement import Cluster, MoEModelShape, Placement

log = logging.getLogger("moeplace_serving.standin")
_OLD_SPEED_AWARE = "speed"  # --dispatch's name for speed-aware before the rename

F32 = npt.NDArray[np.float32]
DEFAULT_ROUTING = (
    Path(__file__).resolve().parents[3]
    / "shared/data/routing/deepseek-v2-lite-chat/routing_topk6_prompts_0001_1000.npz"
)
EMULATION_NOTE = (
    "EMULATION: per-rank GPU time = measured CPU time of the rank's numpy SwiGLU experts (least "
    "of 3 runs) / the rank's speed factor; no GPU is used"
)


def parse_slice(text: str) -> tuple[int, int]:
    """``"1:200"`` -> prompts 1..199 (prompt ids as in the trace, half-open)."""
    lo, hi = (int(part) for part in text.split(":"))
    if hi <= lo:
        raise argparse.ArgumentTypeError(f"empty prompt slice {text!r}")
    return lo, hi


class Trace:
    """Replays recorded routing: ``expert_ids`` [tokens, L, k] of a prompt slice, in order."""

    def __init__(self, path: Path, prompts: tuple[int, int]) -> None:
        data = np.load(path)
        ids, prompt = data["expert_ids"], data["prompt_id"]
        keep = (prompt >= prompts[0]) & (prompt < prompts[1])
        if not keep.any():
            raise ValueError(f"no tokens for prompts {prompts} in {path}")
        self.ids: npt.NDArray[np.uint8] = np.ascontiguousarray(ids[keep])
        self.prompts = prompts

    @property
    def shape(self) -> tuple[int, int]:
        """(L, k) of the trace."""
        return self.ids.shape[1], self.ids.shape[2]

    def batch(self, step: int, tokens: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """Token indices [T] (wrapping around the slice) and their routing [T, L, k]."""
        index = (step * tokens + np.arange(tokens, dtype=np.int64)) % self.ids.shape[0]
        return index, self.ids[index]


class ExpertStore:
    """The SwiGLU experts of one rank's slots, per layer: ``held`` [L, S] logical expert per
    local slot, ``w_in`` [L, S, d, 2f] (gate and up projections fused), ``w_down`` [L, S, f, d].
    Weights are a deterministic function of (layer, expert), as if read from the checkpoint or
    copied from the GPU that holds them."""

    def __init__(self, rank: int, experts: int, hidden: int, ffn: int) -> None:
        self.rank, self.experts, self.hidden, self.ffn = rank, experts, hidden, ffn
        self.held = np.zeros((0, 0), dtype=np.int64)
        self.w_in: F32 = np.zeros((0, 0, hidden, 2 * ffn), dtype=np.float32)
        self.w_down: F32 = np.zeros((0, 0, ffn, hidden), dtype=np.float32)
        self.pending: tuple[npt.NDArray[np.int64], F32, F32] | None = None
        self.moved_bytes = 0

    def weights(self, layer: int, expert: int) -> tuple[F32, F32]:
        """(w_in [d, 2f], w_down [f, d]) of ``expert`` in ``layer``."""
        rng = np.random.default_rng(layer * self.experts + expert)
        d, f = self.hidden, self.ffn
        w_in = rng.standard_normal((d, 2 * f), dtype=np.float32) / np.float32(np.sqrt(d))
        w_down = rng.standard_normal((f, d), dtype=np.float32) / np.float32(np.sqrt(f))
        return w_in, w_down

    def prepare(self, old: Placement | None, new: Placement) -> None:
        """Load the experts this rank needs for ``new`` into ``pending``, reusing the copies it
        holds; called by the lock-step switch before the barrier, made live by :meth:`commit`."""
        S = new.slots_per_gpu
        held = new.table[:, self.rank * S : (self.rank + 1) * S]
        L = held.shape[0]
        w_in = np.empty((L, S, self.hidden, 2 * self.ffn), dtype=np.float32)
        w_down = np.empty((L, S, self.ffn, self.hidden), dtype=np.float32)
        for layer, row in enumerate(held.tolist()):
            have = self.held[layer].tolist() if layer < self.held.shape[0] else []
            for local, expert in enumerate(row):
                if expert in have:
                    src = have.index(expert)
                    w_in[layer, local], w_down[layer, local] = (
                        self.w_in[layer, src],
                        self.w_down[layer, src],
                    )
                else:
                    w_in[layer, local], w_down[layer, local] = self.weights(layer, expert)
                    self.moved_bytes += w_in[layer, local].nbytes + w_down[layer, local].nbytes
        self.pending = (np.asarray(held, dtype=np.int64), w_in, w_down)

    def commit(self) -> None:
        if self.pending is not None:
            self.held, self.w_in, self.w_down = self.pending
            self.pending = None


def swiglu(x: F32, w_in: F32, w_down: F32) -> F32:
    """Each pair through its own expert: ``x`` [n, d], ``w_in`` [n, d, 2f], ``w_down``
    [n, f, d] -> [n, d] = ``(silu(x W_gate) * (x W_up)) W_down``. Gathering the weights per
    pair makes the cost proportional to the pairs, like a grouped GEMM on a GPU."""
    gate, up = np.split(np.einsum("nd,ndf->nf", x, w_in), 2, axis=1)
    return np.asarray(
        np.einsum("nf,nfd->nd", gate / (1.0 + np.exp(-gate)) * up, w_down), dtype=np.float32
    )


@dataclass
class StepResult:
    """One rank's work in one step: per layer [L] CPU seconds and pairs, misrouted pairs."""

    cpu_s: npt.NDArray[np.float64]
    pairs: npt.NDArray[np.int64]
    misrouted: int = 0
    checksum: float = 0.0


def _timed_ffn(x: F32, w_in: F32, w_down: F32, repeats: int) -> tuple[F32, float]:
    """:func:`swiglu` and its least CPU time over ``repeats`` runs (the least is the robust
    estimate on a machine shared with other work: interference only adds time)."""
    best = np.inf
    for _ in range(repeats):
        start = time.thread_time()
        out = swiglu(x, w_in, w_down)
        best = min(best, time.thread_time() - start)
    return out, float(best)


def compute_step(
    store: ExpertStore,
    slots: npt.NDArray[np.int64],
    ids: npt.NDArray[np.uint8],
    hidden: F32,
    repeats: int = 3,
) -> StepResult:
    """Run this rank's experts on the pairs routed to its slots. ``slots``/``ids`` [T, L, k],
    ``hidden`` [T, d] token states. A pair whose slot here holds another expert is misrouted
    (counted, not computed). Each layer's time is the least of ``repeats`` runs."""
    L, S = store.held.shape
    result = StepResult(np.zeros(L), np.zeros(L, dtype=np.int64))
    local = slots - store.rank * S  # [T, L, k]
    mine = (local >= 0) & (local < S)
    for layer in range(L):
        tok, kk = np.nonzero(mine[:, layer, :])
        where = local[tok, layer, kk]
        ok = store.held[layer, where] == ids[tok, layer, kk]
        result.misrouted += int(ok.size - np.count_nonzero(ok))
        tok, where = tok[ok], where[ok]
        out, result.cpu_s[layer] = _timed_ffn(
            hidden[tok], store.w_in[layer, where], store.w_down[layer, where], repeats
        )
        result.pairs[layer] = tok.size
        result.checksum += float(out.sum())
    return result


@dataclass
class Options:
    rank: int
    ranks: int
    speeds: list[float]
    placement_dir: Path
    routing: Path
    prompts: tuple[int, int]
    shift_prompts: tuple[int, int] | None
    shift_after_steps: int
    shift_file: Path | None
    tokens: int
    steps: int
    dispatch: tuple[Mode, ...]
    experts: int
    slots_per_rank: int
    hidden: int
    ffn: int
    model: str
    collective_port: int
    metrics_port: int
    poll_interval: float
    step_interval: float
    report: Path | None


def initial_placement(model: MoEModelShape, ranks: int, slots_per_rank: int) -> Placement:
    """Version 0, used until every rank has a placement file: slot s holds expert s % E."""
    table = np.tile(np.arange(ranks * slots_per_rank) % model.experts, (model.moe_layers, 1))
    return Placement.from_table(table, model, ranks, "initial-round-robin", version=0)


class Rank:
    """One serving rank's loop (see the module docstring)."""

    def __init__(self, opt: Options) -> None:
        self.opt = opt
        self.trace = Trace(opt.routing, opt.prompts)
        L, k = self.trace.shape
        self.model = MoEModelShape(name=opt.model, moe_layers=L, experts=opt.experts, top_k=k)
        self.cluster = Cluster.uniform(opt.ranks, speeds=opt.speeds)
        self.metrics = ServingMetrics(
            opt.model, L, opt.experts, rank=opt.rank, reporter=opt.rank == 0
        )
        if opt.metrics_port:
            self.metrics.serve(opt.metrics_port + opt.rank, addr="0.0.0.0")
        self.collective = LoopbackCollective(opt.rank, opt.ranks, opt.collective_port)
        self.watcher = PlacementWatcher(
            opt.placement_dir,
            ServingShape(L, opt.experts, opt.ranks),
            poll_interval_s=opt.poll_interval,
            metrics=self.metrics,
        )
        self.store = ExpertStore(opt.rank, opt.experts, opt.hidden, opt.ffn)
        initial = initial_placement(self.model, opt.ranks, opt.slots_per_rank)
        self.store.prepare(None, initial)
        self.store.commit()
        self.switch = LockStepSwitch(
            self.collective, self.watcher, self.store.prepare, initial, metrics=self.metrics
        )
        self.dispatchers = self._dispatchers(initial)
        self.active_hash = initial.content_hash()
        self.hidden = np.random.default_rng(7).standard_normal((4096, opt.hidden), np.float32)

    def run(self) -> None:
        self.watcher.start()
        try:
            step = 0
            while not self.opt.steps or step < self.opt.steps:
                started = time.monotonic()
                self.step(step)
                step += 1
                time.sleep(max(0.0, self.opt.step_interval - (time.monotonic() - started)))
        finally:
            self.watcher.stop()
            self.collective.close()

    def step(self, step: int) -> None:
        """One forward step: agree on the placement, route, compute, all-reduce, report."""
        opt = self.opt
        active, switched = self._agree(step)
        index, ids = self.trace.batch(step, opt.tokens)
        self.metrics.observe_routing(ids[opt.rank :: opt.ranks])
        mode = opt.dispatch[step % len(opt.dispatch)]
        slots = self.dispatchers[mode].route(ids)  # [T, L, k]
        work = compute_step(self.store, slots, ids, self.hidden[index % self.hidden.shape[0]])
        emulated_s = work.cpu_s / opt.speeds[opt.rank]
        L = emulated_s.size
        reduced = self.collective.all_reduce_max(
            [
                *(emulated_s * 1e9).astype(np.int64).tolist(),
                active,
                -active,
                self._wants_shift(step),
            ]
        )
        totals = self.collective.all_reduce_sum([int(work.pairs.sum()), work.misrouted])
        straggler_s = np.asarray(reduced[:L], dtype=np.float64) / 1e9
        self.metrics.observe_layers(emulated_s, work.pairs, straggler_s if opt.rank == 0 else None)
        if opt.rank == 0:
            self._report(
                {
                    "step": step,
                    "version": active,
                    "hash": self.active_hash,
                    "mixed_versions": reduced[L] != -reduced[L + 1],
                    "prompts": list(self.trace.prompts),
                    "dispatch": mode,
                    "straggler_us": float(straggler_s.sum() * 1e6),
                    "realized": float(self.dispatchers[mode].layer_times(slots).sum()),
                    "fluid": float(ids.size / sum(opt.speeds)),
                    "pairs": totals[0],
                    "expected_pairs": int(ids.size),
                    "misrouted": totals[1],
                    "switch": asdict(self.switch.events[-1]) if switched else None,
                }
            )
        if reduced[L + 2] and opt.shift_prompts and self.trace.prompts != opt.shift_prompts:
            self.trace = Trace(opt.routing, opt.shift_prompts)  # every rank, from the next step

    def _agree(self, step: int) -> tuple[int, bool]:
        """Lock-step switch at this step boundary; (version in use, whether it just changed)."""
        before = self.switch.active_version
        active = self.switch.at_step(step)
        assert active is not None
        if active.version == before:
            return before, False
        self.store.commit()
        self.dispatchers = self._dispatchers(active.placement)
        self.active_hash = active.placement.content_hash()
        return active.version, True

    def _wants_shift(self, step: int) -> int:
        """1 if this rank asks for the load shift (shift file present, or the step reached)."""
        opt = self.opt
        by_file = opt.shift_file is not None and opt.shift_file.exists()
        return int(by_file or 0 < opt.shift_after_steps <= step + 1)

    def _dispatchers(self, placement: Placement) -> dict[Mode, Dispatcher]:
        return {mode: Dispatcher(placement, self.cluster, mode) for mode in self.opt.dispatch}

    def _report(self, record: dict[str, Any]) -> None:
        if self.opt.report is not None:
            with self.opt.report.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (placement version, prompt slice, dispatch), in order of first use: steps,
    mean measured straggler (µs/step), mean realized straggler (the pairs each rank computed,
    under the time model) and fluid bound (token-times per step), lost and misrouted pairs,
    steps whose ranks used different versions."""
    rows: dict[tuple[int, tuple[int, ...], str], dict[str, Any]] = {}
    for rec in records:
        key = (rec["version"], tuple(rec["prompts"]), rec["dispatch"])
        row = rows.setdefault(
            key,
            dict.fromkeys(("steps", "straggler_us", "realized", "fluid", "lost", "misrouted"), 0)
            | {"version": key[0], "prompts": "{}:{}".format(*key[1]), "dispatch": key[2]}
            | {"mixed": 0},
        )
        row["steps"] += 1
        for name in ("straggler_us", "realized", "fluid"):
            row[name] += rec[name]
        row["lost"] += rec["expected_pairs"] - rec["pairs"]
        row["misrouted"] += rec["misrouted"]
        row["mixed"] += int(rec["mixed_versions"])
    for row in rows.values():
        for name in ("straggler_us", "realized", "fluid"):
            row[name] /= row["steps"]
    return list(rows.values())


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`summarize` as a text table."""
    head = "version  prompts   dispatch  steps  straggler_us/step  realized/step  fluid/step"
    lines = [head + "  lost  misrouted  mixed"]
    for r in rows:
        lines.append(
            f"{r['version']:>7}  {r['prompts']:<8}  {r['dispatch']:<8}  {r['steps']:>5}  "
            f"{r['straggler_us']:>17.0f}  {r['realized']:>13.0f}  {r['fluid']:>10.0f}  "
            f"{r['lost']:>4}  {r['misrouted']:>9}  {r['mixed']:>5}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moeplace_serving.standin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rank", type=int, default=None, help="run only this rank")
    p.add_argument("--speeds", default="", help="comma-separated speed factor per rank")
    p.add_argument(
        "--placement-dir",
        required=True,
        help="mounted ConfigMap dir; '{rank}' is replaced by the rank",
    )
    p.add_argument("--routing", type=Path, default=DEFAULT_ROUTING)
    p.add_argument("--prompts", type=parse_slice, default=(1, 201))
    p.add_argument("--shift-prompts", type=parse_slice, default=None)
    p.add_argument("--shift-after-steps", type=int, default=0, help="0: never (by steps)")
    p.add_argument("--shift-file", type=Path, default=None, help="shift once this file exists")
    p.add_argument("--tokens", type=int, default=128, help="tokens per step")
    p.add_argument("--steps", type=int, default=0, help="0: until killed")
    p.add_argument(
        "--dispatch",
        choices=[*MODES, "alternate", _OLD_SPEED_AWARE],
        default="speed-aware",
        help=f"'{_OLD_SPEED_AWARE}' is the deprecated spelling of speed-aware (pod args)",
    )
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer")
    p.add_argument("--slots-per-rank", type=int, default=0, help="initial placement; 0: E/ranks")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--ffn", type=int, default=32)
    p.add_argument("--model", default="deepseek-v2-lite")
    p.add_argument("--collective-port", type=int, default=29555)
    p.add_argument("--metrics-port", type=int, default=0, help="rank r serves BASE+r; 0: off")
    p.add_argument("--poll-interval", type=float, default=0.5, help="watcher poll, seconds")
    p.add_argument("--step-interval", type=float, default=0.0, help="minimum seconds per step")
    p.add_argument("--report", type=Path, default=None, help="rank 0: JSON line per step")
    return p


def dispatch_modes(arg: str) -> tuple[Mode, ...]:
    """The dispatch rules of ``--dispatch``: one, or both for ``alternate``. The old spelling
    ``speed`` may still be in a pod's args: accepted as ``speed-aware``, with a warning."""
    if arg == "alternate":
        return MODES
    if arg == _OLD_SPEED_AWARE:
        log.warning("--dispatch speed is deprecated, use --dispatch speed-aware")
        return ("speed-aware",)
    return (MODES[MODES.index(arg)],)


def options(args: argparse.Namespace, rank: int) -> Options:
    speeds = [float(s) for s in args.speeds.split(",")] if args.speeds else [1.0] * args.ranks
    if len(speeds) != args.ranks:
        raise SystemExit(f"--speeds has {len(speeds)} values for {args.ranks} ranks")
    return Options(
        rank=rank,
        ranks=args.ranks,
        speeds=speeds,
        placement_dir=Path(args.placement_dir.replace("{rank}", str(rank))),
        routing=args.routing,
        prompts=args.prompts,
        shift_prompts=args.shift_prompts,
        shift_after_steps=args.shift_after_steps,
        shift_file=args.shift_file,
        tokens=args.tokens,
        steps=args.steps,
        dispatch=dispatch_modes(args.dispatch),
        experts=args.experts,
        slots_per_rank=args.slots_per_rank or -(-args.experts // args.ranks),
        hidden=args.hidden,
        ffn=args.ffn,
        model=args.model,
        collective_port=args.collective_port,
        metrics_port=args.metrics_port,
        poll_interval=args.poll_interval,
        step_interval=args.step_interval,
        report=args.report,
    )


def launch(argv: Sequence[str], ranks: int, report: Path | None) -> int:
    """Start ``ranks`` rank processes of this module and wait for them."""
    print(EMULATION_NOTE, flush=True)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so ``finally`` stops the ranks
    if report is not None:
        report.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "moeplace_serving.standin", *argv, "--rank", str(r)], env=env
        )
        for r in range(ranks)
    ]
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
    if report is not None and report.exists():
        records = [json.loads(line) for line in report.read_text().splitlines()]
        print(format_summary(summarize(records)), flush=True)
    return max(codes)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(message)s")
    if args.rank is None:
        return launch(argv, args.ranks, args.report)
    Rank(options(args, args.rank)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
