"""Shared GPU pieces for profile_gpus.py and moe_stack.py (torch + cupy on the GPU machine).

- SwiGLU expert FFN, one expert (``ffn``) and all of a GPU's local experts at once
  (``grouped_ffn``, torch's CUTLASS grouped GEMM; a per-expert loop where that is missing):
  the profiler times exactly the code the MoE stack runs.
- ``CoTenant``: a controlled slowdown. A kernel of ``k`` spinning blocks, each with enough
  shared memory that no second block (and no GEMM block) fits beside it on its SM, so it holds
  ``k`` of the SMs; relaunched back to back from a thread on its own stream, optionally
  duty-cycled (``on_us`` holding, ``off_us`` released). Same process and context as the work it
  slows, so the GPU runs both at once (separate processes would be time-sliced instead).
  The ``hold`` variant (``k26-hold``) keeps the same ``k`` SMs for the whole ``with`` block (one
  long-running block per SM, stopped by a device flag) and tells torch's GEMMs to size their
  persistent grids for the ``132 - k`` SMs left (``sm_carveout``): a flat, known slowdown of
  about 132 / (132 - k) for a large GEMM, whatever its token count.
- Graph timing helpers (CUDA events around graph replays).

torch is imported inside functions so the module imports without it (for ruff and tests).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def ensure_safe_env() -> dict[str, str]:
    """Keep NVLink multicast off (device README): set the variables only where they are
    missing, never override what the machine set."""
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in SAFE_ENV}


def log(*args: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


# expert shapes (hidden, intermediate) of the profiler's curves and the MoE stack's experts; the
# stack's routing is always the DeepSeek-V2-Lite trace (26 MoE layers, 64 experts, top-6)
SHAPES: dict[str, tuple[int, int]] = {
    "deepseek-v2-lite": (2048, 1408),
    "mixtral-8x7b": (4096, 14336),
    "deepseek-v3": (7168, 2048),
}
DEFAULT_SHAPE = "deepseek-v2-lite"


def expert_bytes(shape: str) -> int:
    """Bytes of one bf16 SwiGLU expert (gate, up and down projections)."""
    hidden, inter = SHAPES[shape]
    return 3 * hidden * inter * 2


# --------------------------------------------------------------------------- expert FFNs


def make_expert(hidden: int, inter: int, device: Any, seed: int) -> tuple[Any, Any]:
    """One SwiGLU expert: fused gate+up ``w13`` [H, 2I] and down ``w2`` [I, H], bf16, scaled
    so activations stay O(1). Deterministic in ``seed`` (copies of one expert are identical)."""
    import torch

    g = torch.Generator(device=device).manual_seed(int(seed))
    w13 = torch.randn(hidden, 2 * inter, device=device, dtype=torch.bfloat16, generator=g)
    w13.mul_(hidden**-0.5)
    w2 = torch.randn(inter, hidden, device=device, dtype=torch.bfloat16, generator=g)
    w2.mul_(inter**-0.5)
    return w13, w2


def ffn(x: Any, w13: Any, w2: Any) -> Any:
    """SwiGLU FFN of one expert: (silu(x Wg) * x Wu) Wd."""
    import torch

    a = x @ w13
    inter = w2.shape[0]
    return (torch.nn.functional.silu(a[:, :inter]) * a[:, inter:]) @ w2


def grouped_mm_fn() -> Any:
    """torch's grouped GEMM (2D x 3D with offsets), or None where this torch has none."""
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None)
    if fn is None:
        fn = getattr(torch, "_grouped_mm", None)
    return fn


@dataclass
class GroupedImpl:
    name: str  # "grouped_mm" or "loop"
    fn: Any


def pick_grouped_impl(device: Any, force_loop: bool = False) -> GroupedImpl:
    """Use the grouped GEMM if it exists and gives the per-expert loop's answer on this GPU."""
    import torch

    fn = None if force_loop else grouped_mm_fn()
    if fn is None:
        return GroupedImpl("loop", None)
    try:
        hidden, inter, experts = 256, 128, 4
        w13 = torch.randn(experts, hidden, 2 * inter, device=device, dtype=torch.bfloat16) / 16
        w2 = torch.randn(experts, inter, hidden, device=device, dtype=torch.bfloat16) / 11
        counts = [5, 0, 37, 22]
        x = torch.randn(sum(counts), hidden, device=device, dtype=torch.bfloat16)
        offs = torch.tensor(counts, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = grouped_ffn(x, w13, w2, offs, counts, GroupedImpl("grouped_mm", fn))
        loop = GroupedImpl("loop", None)
        ref = grouped_ffn(x.float(), w13.float(), w2.float(), offs, counts, loop)
        err = float((out.float() - ref).norm() / ref.norm())
        if not err < 2e-2:
            log(f"grouped_mm disagrees with the loop (rel err {err:.3g}); using the loop")
            return GroupedImpl("loop", None)
        return GroupedImpl("grouped_mm", fn)
    except Exception as e:
        log(f"grouped_mm unusable ({type(e).__name__}: {e}); using the loop")
        return GroupedImpl("loop", None)


def grouped_ffn(x: Any, w13: Any, w2: Any, offs: Any, counts: list[int], impl: GroupedImpl) -> Any:
    """SwiGLU FFN of S experts over rows grouped by expert: ``x`` [T, H] sorted by expert,
    ``w13`` [S, H, 2I], ``w2`` [S, I, H], ``offs`` int32 [S] cumulative ends (device),
    ``counts`` the same on the host (the loop needs them; the grouped GEMM does not)."""
    import torch

    inter = w2.shape[1]
    if impl.name == "grouped_mm":
        a = impl.fn(x, w13, offs=offs)
        h = torch.nn.functional.silu(a[:, :inter]) * a[:, inter:]
        return impl.fn(h, w2, offs=offs)
    out = torch.empty(x.shape[0], w2.shape[2], device=x.device, dtype=x.dtype)
    start = 0
    for s, c in enumerate(counts):
        if c:
            out[start : start + c] = ffn(x[start : start + c], w13[s], w2[s])
        start += c
    return out


# --------------------------------------------------------------------------- timing


# --------------------------------------------------------------------------- co-tenant

_SPIN_SRC = r"""
extern "C" __global__ void moeplace_spin(unsigned long long ns, int* sink) {
  extern __shared__ int pad[];
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
  if (now == 0ull && threadIdx.x == 0) { pad[0] = 1; sink[0] = pad[0]; }  // never: keeps pad
}

// one block per held SM (the shared memory makes it so), one warp polling a stop flag with
// nanosleep between polls (little issue pressure); ends on the flag or after max_ns at most
__device__ void hold_body(unsigned long long max_ns, const volatile int* stop, int* smid) {
  extern __shared__ int pad[];
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  if (threadIdx.x == 0) {
    unsigned int id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    smid[blockIdx.x] = (int)id + 1;
  }
  do {
    if (stop[0]) break;
    asm volatile("nanosleep.u32 2000;");
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < max_ns);
  if (start == 0ull && threadIdx.x == 0) { pad[0] = 1; smid[0] = pad[0]; }  // never: keeps pad
}

extern "C" __global__ void moeplace_hold(unsigned long long max_ns, const volatile int* stop,
                                         int* smid) {
  hold_body(max_ns, stop, smid);
}

// the same in clusters of two: a cluster sits in one GPC, and GPCs have an even number of SMs
// (whole TPCs), so every GPC keeps an even number of free SMs and a GEMM of 2-SM clusters (torch's
// CUTLASS grouped GEMM) fits all of its (SMs - k) / 2 clusters at once
extern "C" __global__ void __cluster_dims__(2, 1, 1) moeplace_hold2(
    unsigned long long max_ns, const volatile int* stop, int* smid) {
  hold_body(max_ns, stop, smid);
}
"""
HOLD_SMEM = 120 * 1024  # > half of the 228 KB per SM: one such block per SM, no GEMM block beside
HOLD_CAP_US = 2e6  # a hold block ends after this at most (then the next, queued, takes over)


@dataclass(frozen=True)
class CoTenantSpec:
    """``k`` SMs held for ``on_us``, then released for ``off_us`` (0: always held).

    ``hold``: the same ``k`` SMs held for the whole ``with`` block (each block runs up to
    ``on_us``, ``HOLD_CAP_US`` by default, and ends early when the co-tenant stops), in clusters
    of two blocks (``k`` even; ``-solo``: single blocks, which leave odd numbers of free SMs in
    some GPCs, so the GEMM's 2-SM clusters do not all fit at once: a second wave); with
    ``carveout`` torch's GEMMs are told to use ``SMs - carve`` SMs meanwhile (``carve`` 0: ``k``;
    more than ``k`` leaves room for the grouped GEMM's 2-SM clusters, which need two free SMs of
    one GPC). Without it a persistent GEMM (torch's CUTLASS grouped GEMM launches one block per
    SM) would leave ``k`` of its blocks waiting for a held SM: a stall, not a slowdown
    (``-nocarve`` measures that on purpose)."""

    k: int
    on_us: float = 200.0
    off_us: float = 0.0
    hold: bool = False
    carveout: bool = True
    carve: int = 0
    solo: bool = False

    @property
    def name(self) -> str:
        if self.hold:
            return (
                f"k{self.k}-hold"
                + ("-solo" if self.solo else "")
                + ("" if self.carveout else "-nocarve")
                + (f"-carve{self.carve}" if self.carveout and self.carve else "")
                + ("" if self.on_us == HOLD_CAP_US else f"-on{self.on_us:g}")
            )
        return f"k{self.k}" + (f"-on{self.on_us:g}-off{self.off_us:g}" if self.off_us else "")

    @property
    def duty(self) -> float:
        return 1.0 if self.hold else self.on_us / (self.on_us + self.off_us)

    @property
    def carveout_sms(self) -> int | None:
        """SMs torch's GEMMs leave out while this co-tenant runs (None: no carve-out)."""
        if not (self.hold and self.carveout and self.k > 0):
            return None
        return self.carve or self.k

    def as_dict(self) -> dict[str, float | int | str | bool]:
        d: dict[str, float | int | str | bool] = {
            "name": self.name,
            "k": self.k,
            "onUs": self.on_us,
            "offUs": self.off_us,
        }
        if self.hold:
            d.update(hold=True, carveout=self.carveout, clusters=not self.solo)
            if self.carveout_sms is not None:
                d["carveoutSms"] = self.carveout_sms
        return d

    @classmethod
    def parse(cls, text: str) -> CoTenantSpec:
        """``k33``, ``k132-on50-off150``, ``k26-hold``, ``k26-hold-solo-carve34`` or
        ``k26-hold-nocarve-on2000``."""
        parts = text.strip().split("-")
        k = int(parts[0].lstrip("k"))
        hold = "hold" in parts[1:]
        on, off = (HOLD_CAP_US if hold else 200.0), 0.0
        carveout, carve, solo = True, 0, False
        for p in parts[1:]:
            if p.startswith("on"):
                on = float(p[2:])
            elif p.startswith("off"):
                off = float(p[3:])
            elif p == "nocarve":
                carveout = False
            elif p == "solo":
                solo = True
            elif p.startswith("carve"):
                carve = int(p[5:])
            elif p != "hold":
                raise ValueError(f"co-tenant {text!r}: unknown part {p!r}")
        if hold and off:
            raise ValueError(f"co-tenant {text!r}: a hold has no off time")
        if carve and not (hold and carveout):
            raise ValueError(f"co-tenant {text!r}: carveN goes with a hold that carves out")
        if solo and not hold:
            raise ValueError(f"co-tenant {text!r}: solo goes with a hold")
        if hold and not solo and k % 2:
            raise ValueError(f"co-tenant {text!r}: a hold in 2-block clusters needs an even k")
        if carve == k:
            carve = 0  # the default: one name per setting
        return cls(k, on, off, hold, carveout, carve, solo)


def _carveout_api() -> tuple[Any, Any]:
    import torch

    get = getattr(torch._C, "_get_sm_carveout_experimental", None)
    put = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if get is None or put is None:
        raise RuntimeError("no SM carve-out in this torch (torch._C._set_sm_carveout_experimental)")
    return get, put


@contextmanager
def sm_carveout(k: int | None) -> Iterator[None]:
    """torch's cuBLASLt and CUTLASS (grouped) GEMMs launched inside use ``SMs - k`` SMs (the
    process-wide carve-out torch keeps for compute/communication overlap); ``None``: unchanged.
    A CUDA graph keeps the grid it was captured with, so capture inside this to replay it so."""
    if k is None:
        yield
        return
    get, put = _carveout_api()
    prev = get()
    put(int(k))
    try:
        yield
    finally:
        put(prev)


class CoTenant:
    """Background SM-holding kernels on ``device_index`` while the ``with`` block runs."""

    def __init__(self, spec: CoTenantSpec, device_index: int, depth: int = 24) -> None:
        self.spec = spec
        self.device_index = device_index
        self.depth = 2 if spec.hold else depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._carve: Any = None
        self.launches = 0
        self.error: str | None = None
        self.held_sms: int | None = None  # hold: distinct SMs the first launch's blocks sit on

    def __enter__(self) -> CoTenant:
        if self.spec.k <= 0:
            return self
        import cupy as cp

        sys.setswitchinterval(5e-4)  # the launcher thread must not wait ms for the GIL
        with cp.cuda.Device(self.device_index):
            name = "moeplace_spin"
            if self.spec.hold:
                name = "moeplace_hold" if self.spec.solo else "moeplace_hold2"
            self._kernel = cp.RawKernel(_SPIN_SRC, name)
            self._kernel.max_dynamic_shared_size_bytes = HOLD_SMEM
            self._tick = cp.RawKernel(_SPIN_SRC, "moeplace_spin")
            self._sink = cp.zeros(1, dtype=cp.int32)
            self._flag = cp.zeros(2, dtype=cp.int32)  # [0]: stop; [1]: spare
            self._smid = cp.zeros(max(self.spec.k, 1), dtype=cp.int32)
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._ctl = cp.cuda.Stream(non_blocking=True)  # sets the flag while holds run
            with self._stream:
                self._tick((1,), (32,), (cp.uint64(1000), self._sink))
            self._stream.synchronize()
        if self.spec.carveout_sms is not None:
            self._carve = sm_carveout(self.spec.carveout_sms)
            self._carve.__enter__()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.2)
        if self.spec.hold:
            import numpy as np

            with cp.cuda.Device(self.device_index):
                got = np.empty(self._smid.size, dtype=np.int32)
                self._smid.get(stream=self._ctl, out=got)
                self._ctl.synchronize()
            self.held_sms = len({int(v) for v in got if v > 0})
            if self.held_sms != self.spec.k:
                log(f"co-tenant {self.spec.name}: {self.held_sms} of {self.spec.k} SMs held")
        return self

    def _run(self) -> None:
        import cupy as cp

        spec = self.spec
        try:
            with cp.cuda.Device(self.device_index), self._stream:
                on = cp.uint64(int(spec.on_us * 1000))
                off = cp.uint64(int(spec.off_us * 1000))
                pending: list[Any] = []
                while not self._stop.is_set():
                    if spec.hold:
                        self._kernel(
                            (spec.k,), (32,), (on, self._flag, self._smid), shared_mem=HOLD_SMEM
                        )
                    else:
                        self._kernel((spec.k,), (128,), (on, self._sink), shared_mem=HOLD_SMEM)
                    if spec.off_us > 0:  # one small block marks time while the SMs are free
                        self._tick((1,), (32,), (off, self._sink))
                    ev = cp.cuda.Event(block=False, disable_timing=True)
                    ev.record(self._stream)
                    pending.append(ev)
                    self.launches += 1
                    if len(pending) >= self.depth:
                        if spec.hold:  # seconds-long holds: poll, never block holding the GIL
                            while not pending[0].done and not self._stop.is_set():
                                time.sleep(0.002)
                        pending.pop(0).synchronize()
                self._stream.synchronize()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            if self.spec.hold:  # running and queued holds see the flag and end at once
                import cupy as cp
                import numpy as np

                with cp.cuda.Device(self.device_index):
                    self._flag[:1].set(np.ones(1, dtype=np.int32), stream=self._ctl)
                    self._ctl.synchronize()
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                self.error = (self.error or "") + " launcher thread did not stop in 30 s"
            self._thread = None
        if self._carve is not None:
            self._carve.__exit__(None, None, None)
            self._carve = None
        sys.setswitchinterval(5e-3)


def smi() -> list[str]:
    """nvidia-smi clocks, power and temperature per GPU (read only)."""
    import subprocess

    q = "index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"
    try:
        r = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout.strip().splitlines()
    except Exception as e:
        return [f"nvidia-smi failed: {e}"]
