"""Serving-side library of moeplace: placement hot-reload in lock-step, routing metrics,
speed-aware dispatch over expert copies, engine adapters, and a reference serving stand-in.

Depends on numpy, pydantic, prometheus_client and the pure ``placement`` library only; the
torch.distributed backend imports torch lazily.
"""

from moeplace_serving.adapters import write_sglang, write_vllm
from moeplace_serving.collective import Collective, LoopbackCollective
from moeplace_serving.configdir import write_atomic
from moeplace_serving.dispatch import Dispatcher
from moeplace_serving.metrics import ServingMetrics
from moeplace_serving.switch import LockStepSwitch, Move, SwitchEvent, plan_moves
from moeplace_serving.watcher import PlacementVersion, PlacementWatcher, ServingShape

__all__ = [
    "Collective",
    "Dispatcher",
    "LockStepSwitch",
    "LoopbackCollective",
    "Move",
    "PlacementVersion",
    "PlacementWatcher",
    "ServingMetrics",
    "ServingShape",
    "SwitchEvent",
    "plan_moves",
    "write_atomic",
    "write_sglang",
    "write_vllm",
]
