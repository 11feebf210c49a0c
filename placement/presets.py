"""Where the MoE layers sit among a model's hidden layers: presets, ``config.json``, agreement.

SGLang's ``--init-expert-location`` map has one row per hidden layer (dense layers included),
so a placement of L MoE layers must know how many dense layers come first. Guessing 0 applies
MoE layer 1's placement to the wrong layer; this module says where the count comes from:

- :data:`PRESETS`: published models, numbers from their Hugging Face ``config.json``;
- :func:`layout_from_config`: a model's ``config.json`` (DeepSeek, Qwen-MoE and Mixtral keys);
- :func:`agreed`: several sources of one number (a preset, a config, a routing file's layer
  index, the user) must agree, or the caller gets an error naming the two that differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LayoutError(ValueError):
    """A model layout that cannot be derived or does not fit; the message says why."""


class ModelLayout(BaseModel):
    """``hidden_layers`` decoder layers: ``dense_layers_before`` dense ones, then
    ``moe_layers`` MoE layers (any rest dense, after them); ``experts`` routed experts per MoE
    layer, ``top_k`` of them per token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_layers: int = Field(gt=0)
    dense_layers_before: int = Field(ge=0)
    moe_layers: int = Field(gt=0)
    experts: int = Field(gt=0)
    top_k: int = Field(gt=0)

    @model_validator(mode="after")
    def _fits(self) -> ModelLayout:
        if self.dense_layers_before + self.moe_layers > self.hidden_layers:
            raise ValueError(
                f"{self.dense_layers_before} dense + {self.moe_layers} MoE layers exceed "
                f"{self.hidden_layers} hidden layers"
            )
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class ModelPreset(BaseModel):
    """A published model's layout and the config it was read from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: ModelLayout
    source: str


def _preset(hidden: int, dense: int, experts: int, top_k: int, source: str) -> ModelPreset:
    layout = ModelLayout(
        hidden_layers=hidden,
        dense_layers_before=dense,
        moe_layers=hidden - dense,
        experts=experts,
        top_k=top_k,
    )
    return ModelPreset(layout=layout, source=source)


_DS = "num_hidden_layers, first_k_dense_replace, n_routed_experts, num_experts_per_tok"
_QWEN = (
    "num_hidden_layers, num_experts, num_experts_per_tok; decoder_sparse_step 1, no mlp_only_layers"
)
_MIXTRAL = "num_hidden_layers, num_local_experts, num_experts_per_tok"

# config.json values of the Hugging Face model repositories named in ``source``
PRESETS: dict[str, ModelPreset] = {
    "deepseek-v2": _preset(60, 1, 160, 6, f"deepseek-ai/DeepSeek-V2 config.json ({_DS})"),
    "deepseek-v2-lite": _preset(27, 1, 64, 6, f"deepseek-ai/DeepSeek-V2-Lite config.json ({_DS})"),
    "deepseek-v3": _preset(61, 3, 256, 8, f"deepseek-ai/DeepSeek-V3 config.json ({_DS})"),
    "deepseek-r1": _preset(61, 3, 256, 8, f"deepseek-ai/DeepSeek-R1 config.json ({_DS})"),
    "qwen1.5-moe-a2.7b": _preset(24, 0, 60, 4, f"Qwen/Qwen1.5-MoE-A2.7B config.json ({_QWEN})"),
    "qwen2-57b-a14b": _preset(28, 0, 64, 8, f"Qwen/Qwen2-57B-A14B config.json ({_QWEN})"),
    "qwen3-30b-a3b": _preset(48, 0, 128, 8, f"Qwen/Qwen3-30B-A3B config.json ({_QWEN})"),
    "qwen3-235b-a22b": _preset(94, 0, 128, 8, f"Qwen/Qwen3-235B-A22B config.json ({_QWEN})"),
    "mixtral-8x7b": _preset(32, 0, 8, 2, f"mistralai/Mixtral-8x7B-v0.1 config.json ({_MIXTRAL})"),
    "mixtral-8x22b": _preset(56, 0, 8, 2, f"mistralai/Mixtral-8x22B-v0.1 config.json ({_MIXTRAL})"),
}


def preset_layout(name: str) -> ModelLayout:
    """The layout of preset ``name``; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise LayoutError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].layout


_EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def _int_key(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayoutError(f"config.json: {key} must be an integer, got {value!r}")
    return value


def _moe_mask(config: Mapping[str, Any], hidden: int) -> list[bool]:
    """Which hidden layers are MoE layers, by the rule of the model family's own code."""
    if "first_k_dense_replace" in config or "moe_layer_freq" in config:  # DeepSeek-V2/V3
        first = _int_key(config, "first_k_dense_replace", 0)
        freq = _int_key(config, "moe_layer_freq", 1)
        if freq < 1:
            raise LayoutError(f"config.json: moe_layer_freq must be >= 1, got {freq}")
        return [i >= first and i % freq == 0 for i in range(hidden)]
    if "decoder_sparse_step" in config or "mlp_only_layers" in config:  # Qwen-MoE
        step = _int_key(config, "decoder_sparse_step", 1)
        dense = config.get("mlp_only_layers") or []
        if step < 1 or not all(isinstance(i, int) for i in dense):
            raise LayoutError("config.json: decoder_sparse_step >= 1 and integer mlp_only_layers")
        return [i not in dense and (i + 1) % step == 0 for i in range(hidden)]
    return [True] * hidden  # Mixtral: every layer is sparse


def layout_from_config(config: Mapping[str, Any]) -> ModelLayout:
    """A Hugging Face ``config.json`` (parsed) -> its layout. Refuses layouts whose MoE
    layers are not one consecutive block (dense layers between them): a count of dense layers
    before the first MoE layer cannot express them."""
    hidden = _int_key(config, "num_hidden_layers")
    key = next((k for k in _EXPERT_KEYS if config.get(k) is not None), None)
    if key is None:
        raise LayoutError(f"config.json: no routed expert count (one of {', '.join(_EXPERT_KEYS)})")
    mask = _moe_mask(config, hidden)
    moe = [i for i, sparse in enumerate(mask) if sparse]
    if not moe:
        raise LayoutError("config.json: no MoE layer among the hidden layers")
    if moe != list(range(moe[0], moe[0] + len(moe))):
        gap = next(i for i in range(moe[0], moe[-1]) if not mask[i])
        raise LayoutError(
            f"config.json: dense layer {gap} lies between MoE layers {moe[0]} and {moe[-1]}; "
            "only dense layers before (or after) one block of MoE layers are supported"
        )
    try:
        return ModelLayout(
            hidden_layers=hidden,
            dense_layers_before=moe[0],
            moe_layers=len(moe),
            experts=_int_key(config, key),
            top_k=_int_key(config, "num_experts_per_tok"),
        )
    except ValueError as exc:
        raise LayoutError(f"config.json: {exc}") from exc


def agreed(what: str, sources: Sequence[tuple[str, int]]) -> int | None:
    """The one value of ``what`` that all (source name, value) pairs give; None when there is
    no source; an error naming two sources that differ."""
    for name, value in sources[1:]:
        if value != sources[0][1]:
            first, first_value = sources[0]
            raise LayoutError(f"{what}: {first} says {first_value}, {name} says {value}")
    return sources[0][1] if sources else None


def check_shape(layout: ModelLayout, origin: str, moe_layers: int, experts: int) -> None:
    """Refuse a load whose [L, E] shape is not the layout's MoE shape."""
    if (layout.moe_layers, layout.experts) != (moe_layers, experts):
        raise LayoutError(
            f"{origin} has {layout.moe_layers} MoE layers x {layout.experts} experts, the load "
            f"has {moe_layers} x {experts}"
        )
