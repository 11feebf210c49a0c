"""SGLang 0.5.23's runtime context for one rank process on CPU, and a tiny MoE model, as the
SGLang plugin's tests (tests/engines/test_sglang_plugin.py) and the closed-loop e2e with the
plugin (e2e/test_closed_loop_engines.py) set them up.

The context is set as SGLang's own tests do (``get_context().override_server_args``, a dummy
ServerArgs with our fields; ``get_parallel().override_permanently`` for the rank). The one
stand-in is the model: ``ModelConfigForExpertLocation.from_model_config`` (which would import
the model's architecture class and its GPU kernels) returns SGLang's own
``ModelConfigForExpertLocation`` of the given shape, and the model is an object holding
``routed_experts_weights_of_layer`` like SGLang's MoE models do, each expert's weights a tensor
filled with its expert id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TinySGLang:
    """``hidden_layers`` decoder layers, the first ``dense_layers`` dense, ``experts`` routed
    experts per MoE layer, EP size ``ep_size`` with ``redundant`` extra slots."""

    hidden_layers: int
    dense_layers: int
    experts: int
    redundant: int
    ep_size: int

    @property
    def slots_per_rank(self) -> int:
        return (self.experts + self.redundant) // self.ep_size

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.dense_layers, self.hidden_layers))

    def install(
        self, rank: int = 0, a2a: str = "none", dp_attention: bool = False, **server_args: Any
    ) -> None:
        """SGLang's runtime context on CPU, this process as ``rank``. ``dp_attention``: every
        rank is attention-TP rank 0 of its own group (it holds its own tokens, as with
        ``--enable-dp-attention``); else all ranks form one attention-TP group."""
        from sglang.srt.eplb import expert_location
        from sglang.srt.runtime_context import get_context, get_parallel

        get_context().override_server_args(
            tp_size=self.ep_size,
            ep_size=self.ep_size,
            ep_num_redundant_experts=self.redundant,
            device="cpu",
            ep_dispatch_algorithm="static",
            moe_a2a_backend=a2a,
            **server_args,
        ).install()
        get_parallel().override_permanently(
            tp_rank=rank, attn_tp_rank=0 if dp_attention else rank, moe_ep_rank=rank
        )
        config = expert_location.ModelConfigForExpertLocation(
            num_layers=self.hidden_layers, num_logical_experts=self.experts
        )
        expert_location.ModelConfigForExpertLocation.from_model_config = staticmethod(  # type: ignore[method-assign]
            lambda _model_config: config
        )

    def model(self, rank: int) -> TinyMoE:
        """The rank's model at SGLang's trivial start (slot s holds expert s % experts)."""
        return TinyMoE(self, rank)

    def trivial_rows(self) -> list[list[int]]:
        """SGLang's default physical-to-logical map, [hidden layers][slots]."""
        return [[s % self.experts for s in range(self.experts + self.redundant)]] * (
            self.hidden_layers
        )


class TinyMoE:
    """What SGLang's updater moves: {hidden layer: [weights [slots, 4], ids [slots]]}."""

    def __init__(self, shape: TinySGLang, rank: int) -> None:
        import torch

        S = shape.slots_per_rank
        experts = torch.tensor([s % shape.experts for s in range(rank * S, (rank + 1) * S)])
        self.routed_experts_weights_of_layer = {
            h: [experts[:, None].repeat(1, 4).float(), experts.clone()] for h in shape.moe_layers
        }

    def snapshot(self) -> dict[int, list[list[Any]]]:
        """The weights as lists, per hidden layer (to compare across processes)."""
        return {
            h: [t.tolist() for t in ts] for h, ts in self.routed_experts_weights_of_layer.items()
        }
