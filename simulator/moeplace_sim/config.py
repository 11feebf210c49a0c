"""What one simulated run is: the GPUs, the workload, the policy, the links, the SLOs.
Pydantic models, so a scenario file (JSON) is validated before anything runs."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from placement.evaluate import Dispatch

SHARED = Path("../shared")
# the H200 grouped-GEMM curve of 18 DeepSeek-V2-Lite experts, measured on 4x H200 (issue 7)
H200_LAYER_PROFILE = Path("docs/gpu-x4/call1/layer_profile.json")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoTenant(Strict):
    """A co-tenant arrives at ``at_s``: the listed GPUs run ``slowdown`` times slower."""

    at_s: float = Field(ge=0)
    gpus: list[int] = Field(min_length=1)
    slowdown: float = Field(gt=1.0)


class GPUSetup(Strict):
    num_gpus: int = Field(ge=2, le=4096)
    gpus_per_node: int = Field(default=8, ge=1)
    slots_per_gpu: int = Field(ge=1, description="expert slots per GPU (copies included)")
    # speeds drawn from the 392 Longhorn V100s' SGEMM medians (PAL's data set); ``spread``
    # scales each draw's distance from 1 (0: identical GPUs, 2: twice the measured spread)
    spread: float = Field(default=1.0, ge=0, le=4)
    cotenants: list[CoTenant] = Field(default_factory=list)
    # a bigger expert than DeepSeek-V2-Lite's: its FLOPs per token over V2-Lite's (Mixtral
    # 20.4, DeepSeek-V3 5.1); x tokens take the measured curve's time at compute_scale x tokens
    compute_scale: float = Field(default=1.0, gt=0)
    # what the profiler publishes and the solvers place for: speed labels (time = tokens /
    # speed) or each GPU's latency curve (the curves annotation: the layer curve at this
    # GPU's speed, launch-bound part included)
    solver_sees: Literal["speeds", "curves"] = "speeds"

    @model_validator(mode="after")
    def _fits(self) -> GPUSetup:
        if self.num_gpus % self.gpus_per_node:
            raise ValueError("num_gpus must be a multiple of gpus_per_node")
        for event in self.cotenants:
            if any(not 0 <= g < self.num_gpus for g in event.gpus):
                raise ValueError(f"co-tenant GPU out of range 0..{self.num_gpus - 1}")
        return self


class Arrivals(StrEnum):
    POISSON = "poisson"
    BURSTY = "bursty"
    TRACE = "trace"


class Workload(Strict):
    arrivals: Arrivals = Arrivals.POISSON
    rate_per_gpu: float = Field(default=2.0, gt=0, description="requests/s per GPU (mean)")
    duration_s: float = Field(default=60.0, gt=0, description="arrivals stop after this")
    # bursty: rate x burst_factor for burst_s out of every period_s, lower rate between, same mean
    burst_factor: float = Field(default=3.0, ge=1)
    burst_s: float = Field(default=5.0, gt=0)
    period_s: float = Field(default=20.0, gt=0)
    trace_file: Path | None = None  # CSV arrival_s,prompt_tokens,output_tokens
    # the trace's prompts are short chat turns (94 tokens on average): scale them for
    # longer-context workloads
    prompt_scale: float = Field(default=1.0, gt=0)
    output_mean: float = Field(default=128.0, gt=1)
    output_max: int = Field(default=1024, ge=2)

    @model_validator(mode="after")
    def _consistent(self) -> Workload:
        if self.arrivals is Arrivals.TRACE and self.trace_file is None:
            raise ValueError("arrivals: trace needs trace_file")
        if self.burst_s * self.burst_factor > self.period_s:
            raise ValueError("burst_s x burst_factor must not exceed period_s (mean rate kept)")
        return self


class PolicyKind(StrEnum):
    STATIC = "static"  # one placement, solved once on the calibration load
    EPLB = "eplb"  # the engines' periodic EPLB (vLLM: window 1000, interval 3000 steps)
    OPERATOR = "operator"  # moeplace's re-solve with placement.policy's rollout rules


class Policy(Strict):
    kind: PolicyKind = PolicyKind.STATIC
    strategy: str = "cpsat"  # the solver of static and operator (eplb: always DeepSeek's)
    time_limit_s: float = Field(default=2.0, gt=0)
    # expert-time units per token pair changing GPU between layers (0: balance load only)
    traffic_weight: float = Field(default=0.0, ge=0)
    eplb_window_steps: int = Field(default=1000, ge=1)
    eplb_interval_steps: int = Field(default=3000, ge=1)
    # a rearrangement pauses serving: 0.65-1.7 s on 32 GB200, 15 s at EP=32 (engines' reports)
    eplb_stall_s: float = Field(default=1.0, ge=0)
    reconcile_s: float = Field(default=60.0, gt=0)
    window_prompts: int = Field(default=100, ge=1, description="operator calibration window")
    min_improvement_percent: float = Field(default=5.0, ge=0)
    cooldown_s: float = Field(default=600.0, ge=0)
    max_moved_experts: int | None = None
    migration_gbs: float = Field(default=25.0, gt=0, description="weight copy GB/s per GPU")
    migration_fixed_s: float = Field(default=0.2, ge=0)


class Links(Strict):
    """All-to-all per MoE layer (dispatch + combine). NVLink's effective bandwidth is fitted on
    the 4x H200 stack's unslowed run (NCCL all_to_all of 8192 tokens; the slowed run is the
    check): far below the link's 450 GB/s peak. The network's is assumed (400 Gb/s NICs)."""

    nvlink_gbs: float = Field(default=120.0, gt=0)
    network_gbs: float = Field(default=40.0, gt=0)
    latency_us: float = Field(default=10.0, ge=0)
    hidden: int = Field(default=2048, ge=1)  # bf16 activations of this width travel
    # "home": tokens go to their experts and back each layer (DP attention); "layer-to-layer":
    # only tokens whose GPU changes between consecutive layers travel (MoETuner's setting)
    pattern: Literal["home", "layer-to-layer"] = "home"


class SimConfig(Strict):
    name: str = "run"
    gpus: GPUSetup
    workload: Workload = Workload()
    policy: Policy = Policy()
    links: Links = Links()
    dispatch: Dispatch = "even"
    # vLLM V1's defaults for an API server on a large GPU, per DP rank
    token_budget_per_gpu: int = Field(default=8192, ge=16, description="tokens per step / GPU")
    max_seqs_per_gpu: int = Field(default=1024, ge=1)
    # KV-cache tokens per GPU (None: only max_seqs bounds a batch). Pooled over the GPUs, as
    # one scheduler sees them; vLLM-style recompute preemption when decoding runs out
    kv_tokens_per_gpu: int | None = Field(default=None, ge=1)
    # dense part per layer (attention, shared experts, norms): not measured here, assumed
    dense_fixed_us: float = Field(default=25.0, ge=0)
    dense_us_per_token: float = Field(default=0.04, ge=0)
    slo_ttft_s: float = Field(default=2.0, gt=0)
    slo_tpot_s: float = Field(default=0.1, gt=0)
    calibration_prompts: int = Field(default=100, ge=1, description="prompts the first solve sees")
    max_time_s: float | None = Field(default=None, gt=0, description="default 3 x duration")
    seed: int = 0
    shared: Path = SHARED
    profile: Path = H200_LAYER_PROFILE
