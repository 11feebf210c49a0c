"""Continuous batching, one step at a time (vLLM V1's scheduler, simplified): admit waiting
requests first come first served up to the sequence limit (and, with a KV-cache capacity, while
their prompts fit beside what the running requests hold and still have to prefill), give every
decoding request one token, fill the rest of the step's token budget with prompt chunks (chunked
prefill). When the decoding requests' next tokens do not fit the KV cache, the newest running
requests are preempted (recompute: their cache is dropped, they wait again and prefill prompt
plus what they generated). The step's tokens take the next tokens of the routing trace; its
time comes from the cost model. State is kept in arrays, so thousands of requests per step stay
cheap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moeplace_sim.costmodel import CostModel, StepCost
from moeplace_sim.data import RoutingTrace
from moeplace_sim.policies import Change, PolicyImpl
from moeplace_sim.workload import Requests
from placement.model import Cluster, FloatArray


@dataclass
class Batch:
    decode: np.ndarray  # request indices getting one token
    prefill: np.ndarray  # request indices getting a prompt chunk
    chunk: np.ndarray  # tokens of that chunk

    @property
    def tokens(self) -> int:
        return int(self.decode.size + self.chunk.sum())


@dataclass
class StepLog:
    end_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)  # requests served in the step
    step_us: list[float] = field(default_factory=list)
    straggler_us: list[float] = field(default_factory=list)
    expert_us: list[float] = field(default_factory=list)
    a2a_us: list[float] = field(default_factory=list)
    gpu_us: list[FloatArray] = field(default_factory=list)
    changes: list[tuple[float, str, float]] = field(default_factory=list)  # (at, reason, stall)

    def record(self, end_s: float, batch: Batch, cost: StepCost) -> None:
        self.end_s.append(end_s)
        self.tokens.append(batch.tokens)
        self.seqs.append(int(batch.decode.size + batch.prefill.size))
        self.step_us.append(cost.total_us)
        self.straggler_us.append(cost.straggler_us)
        self.expert_us.append(float(cost.expert_max_us.sum()))
        self.a2a_us.append(float(cost.a2a_us.sum()))
        self.gpu_us.append(cost.gpu_us)


@dataclass
class RequestLog:
    first_token_s: FloatArray
    finish_s: FloatArray
    routed_tokens: int = 0  # tokens that went through the experts (prefill + decode)
    preemptions: int = 0
    recomputed_tokens: int = 0  # cached tokens dropped by preemptions, routed again later
    max_kv_tokens: int = 0  # the most KV-cache tokens held after any step


class Engine:
    def __init__(
        self,
        requests: Requests,
        *,
        token_budget: int,
        max_seqs: int,
        trace: RoutingTrace,
        cost: CostModel,
        policy: PolicyImpl,
        cluster_at: Callable[[float], Cluster | None],
        on_change: Callable[[Change], None],
        start_token: int = 0,
        kv_capacity: int | None = None,
    ) -> None:
        self.requests = requests
        self.token_budget = token_budget
        self.max_seqs = max_seqs
        self.trace = trace
        self.cost = cost
        self.policy = policy
        self.cluster_at = cluster_at  # the GPUs as they are at t (None: unchanged)
        self.on_change = on_change
        self.cursor = start_token
        n = len(requests)
        largest = int((requests.prompt + requests.output).max()) if n else 0
        if kv_capacity is not None and kv_capacity < largest:
            raise ValueError(
                f"KV-cache capacity {kv_capacity} tokens is below one request's "
                f"{largest} (prompt + output): it could never finish"
            )
        self.kv_capacity = kv_capacity
        # tokens to prefill: the prompt, plus what it had generated once a request is preempted
        self.context = requests.prompt.astype(np.int64)
        self.kv = np.zeros(n, dtype=np.int64)  # KV-cache tokens each request holds
        self.kv_held = 0  # their sum
        self.prefilled = np.zeros(n, dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.admitted = np.zeros(n, dtype=bool)
        self.done = np.zeros(n, dtype=bool)
        self.log = RequestLog(np.full(n, np.nan), np.full(n, np.nan))
        self.steps = StepLog()
        self.cluster: Cluster | None = None

    def schedule(self, head: int, arrived: int) -> Batch:
        window = slice(head, arrived)
        running = self.admitted[window] & ~self.done[window]
        context = self.context[window]
        if self.kv_capacity is not None:
            self._preempt_for_decode(head, running)
        free = self.max_seqs - int(running.sum())
        if free > 0:
            waiting = np.flatnonzero(~self.admitted[window] & ~self.done[window])[:free]
            waiting = waiting[: self._fitting(window, running, context[waiting])]
            self.admitted[head + waiting] = True
            running[waiting] = True
        decoding = np.flatnonzero(running & (self.prefilled[window] >= context))
        decode = decoding[: self.token_budget]
        left = self.token_budget - decode.size
        prefill = np.flatnonzero(running & (self.prefilled[window] < context))
        need = context[prefill] - self.prefilled[window][prefill]
        before = np.cumsum(need) - need
        chunk = np.clip(left - before, 0, need)
        keep = chunk > 0
        return Batch(head + decode, head + prefill[keep], chunk[keep])

    def _fitting(self, window: slice, running: np.ndarray, contexts: np.ndarray) -> int:
        """How many of the waiting requests (``contexts``: their tokens to prefill, in order)
        fit the KV cache beside what the running requests need this step and later."""
        if self.kv_capacity is None:
            return contexts.size
        room = self.kv_capacity - self._kv_needed(window, running)
        return int(np.searchsorted(np.cumsum(contexts), room, side="right"))

    def _kv_needed(self, window: slice, running: np.ndarray) -> int:
        """KV-cache tokens the ``running`` requests of the window hold, have left to prefill,
        and take for this step's decode tokens."""
        left = self.context[window] - self.prefilled[window]
        decoding = int((left[running] <= 0).sum())
        return int(self.kv[window][running].sum() + left[running].clip(min=0).sum()) + decoding

    def _preempt_for_decode(self, head: int, running: np.ndarray) -> None:
        """Preempt the newest running requests until the rest fit the KV cache with their next
        tokens (vLLM's recompute preemption); ``running`` (of the window) is updated."""
        assert self.kv_capacity is not None
        window = slice(head, head + running.size)
        for i in np.flatnonzero(running)[::-1]:
            if self._kv_needed(window, running) <= self.kv_capacity:
                return
            r = head + i
            self.log.preemptions += 1
            self.log.recomputed_tokens += int(self.kv[r])
            self.kv_held -= int(self.kv[r])
            self.admitted[r] = running[i] = False
            self.context[r] = self.requests.prompt[r] + self.generated[r]
            self.prefilled[r] = self.kv[r] = 0

    def advance(self, batch: Batch, now: float) -> None:
        """Tokens produced at the end of the step ending at ``now``."""
        self.generated[batch.decode] += 1
        self.prefilled[batch.prefill] += batch.chunk
        self.kv[batch.decode] += 1
        self.kv[batch.prefill] += batch.chunk
        self.kv_held += batch.tokens
        complete = batch.prefill[self.prefilled[batch.prefill] >= self.context[batch.prefill]]
        self.generated[complete] += 1  # a prefill step yields the next token (the first one)
        first = complete[np.isnan(self.log.first_token_s[complete])]
        self.log.first_token_s[first] = now
        touched = np.concatenate([batch.decode, complete])
        finished = touched[self.generated[touched] >= self.requests.output[touched]]
        self.done[finished] = True
        self.log.finish_s[finished] = now
        self.kv_held -= int(self.kv[finished].sum())  # a finished request frees its cache
        self.kv[finished] = 0
        self.log.max_kv_tokens = max(self.log.max_kv_tokens, self.kv_held)

    def run(self, max_time_s: float) -> None:
        arrival = self.requests.arrival_s
        n = arrival.size
        now, head, arrived = 0.0, 0, 0
        while head < n and now <= max_time_s:
            arrived += int(np.searchsorted(arrival[arrived:], now, side="right"))
            while head < arrived and self.done[head]:
                head += 1
            if head == arrived:  # idle until the next arrival
                if arrived >= n:
                    break
                now = float(arrival[arrived])
                continue
            cluster = self.cluster_at(now)
            if cluster is not None:
                self.cluster = cluster
            batch = self.schedule(head, arrived)
            tokens = batch.tokens
            load = self.trace.counts(self.cursor, tokens) * 1.0
            self.cursor += tokens
            self.log.routed_tokens += tokens
            cost = self.cost.step(load, tokens)
            now += cost.total_us * 1e-6
            self.advance(batch, now)
            self.steps.record(now, batch, cost)
            assert self.cluster is not None
            change = self.policy.observe(now, load, tokens, self.cluster)
            if change is not None:
                self.on_change(change)
                now += change.stall_s
                self.steps.changes.append((now, change.reason, change.stall_s))
