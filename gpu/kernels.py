"""Shared GPU pieces for profile_gpus.py and moe_stack.py (torch + cupy on the GPU machine).

- SwiGLU expert FFN, one expert (``ffn``) and all of a GPU's local experts at once
  (``grouped_ffn``, torch's CUTLASS grouped GEMM; a per-expert loop where that is missing):
  the profiler times exactly the code the MoE stack runs.
- ``CoTenant``: a controlled slowdown. A kernel of ``k`` spinning blocks, each with enough
  shared memory that no second block (and no GEMM block) fits beside it on its SM, so it holds
  ``k`` of the SMs; relaunched back to back from a thread on its own stream, optionally
  duty-cycled (``on_us`` holding, ``off_us`` released). Same process and context as the work it
  slows, so the GPU runs both at once (separate processes would be time-sliced instead).
- Graph timing helpers (CUDA events around graph replays).

torch is imported inside functions so the module imports without it (for ruff and tests).
"""

from __future__ import annotations

import os
import sys
import threading
import time
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
"""
HOLD_SMEM = 120 * 1024  # > half of the 228 KB per SM: one such block per SM, no GEMM block beside


@dataclass(frozen=True)
class CoTenantSpec:
    """``k`` SMs held for ``on_us``, then released for ``off_us`` (0: always held)."""

    k: int
    on_us: float = 200.0
    off_us: float = 0.0

    @property
    def name(self) -> str:
        return f"k{self.k}" + (f"-on{self.on_us:g}-off{self.off_us:g}" if self.off_us else "")

    @property
    def duty(self) -> float:
        return self.on_us / (self.on_us + self.off_us)

    def as_dict(self) -> dict[str, float | int | str]:
        return {"name": self.name, "k": self.k, "onUs": self.on_us, "offUs": self.off_us}

    @classmethod
    def parse(cls, text: str) -> CoTenantSpec:
        """``k33`` or ``k132-on50-off150``."""
        parts = text.strip().split("-")
        k = int(parts[0].lstrip("k"))
        on, off = 200.0, 0.0
        for p in parts[1:]:
            if p.startswith("on"):
                on = float(p[2:])
            elif p.startswith("off"):
                off = float(p[3:])
        return cls(k, on, off)


class CoTenant:
    """Background SM-holding kernels on ``device_index`` while the ``with`` block runs."""

    def __init__(self, spec: CoTenantSpec, device_index: int, depth: int = 24) -> None:
        self.spec = spec
        self.device_index = device_index
        self.depth = depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.launches = 0
        self.error: str | None = None

    def __enter__(self) -> CoTenant:
        if self.spec.k <= 0:
            return self
        import cupy as cp

        sys.setswitchinterval(5e-4)  # the launcher thread must not wait ms for the GIL
        with cp.cuda.Device(self.device_index):
            self._kernel = cp.RawKernel(_SPIN_SRC, "moeplace_spin")
            self._kernel.max_dynamic_shared_size_bytes = HOLD_SMEM
            self._sink = cp.zeros(1, dtype=cp.int32)
            self._stream = cp.cuda.Stream(non_blocking=True)
            with self._stream:
                self._kernel((1,), (32,), (cp.uint64(1000), self._sink))
            self._stream.synchronize()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.2)
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
                    self._kernel((spec.k,), (128,), (on, self._sink), shared_mem=HOLD_SMEM)
                    if spec.off_us > 0:  # one small block marks time while the SMs are free
                        self._kernel((1,), (32,), (off, self._sink))
                    ev = cp.cuda.Event(block=False, disable_timing=True)
                    ev.record(self._stream)
                    pending.append(ev)
                    self.launches += 1
                    if len(pending) >= self.depth:
                        pending.pop(0).synchronize()
                self._stream.synchronize()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None
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
