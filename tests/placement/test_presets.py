"""Model layouts: the preset table, Hugging Face config.json shapes, agreement of sources."""

from __future__ import annotations

from typing import Any

import pytest

from placement.presets import (
    PRESETS,
    LayoutError,
    ModelLayout,
    agreed,
    check_shape,
    layout_from_config,
    preset_layout,
)

# the layout keys of the models' published config.json files (other keys left out)
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
}
QWEN15_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "num_hidden_layers": 24,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "shared_expert_intermediate_size": 5632,
}
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_hidden_layers": 48,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_experts": 128,
    "num_experts_per_tok": 8,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "num_hidden_layers": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


@pytest.mark.parametrize(
    ("config", "preset"),
    [
        (DEEPSEEK_V2_LITE, "deepseek-v2-lite"),
        (DEEPSEEK_V3, "deepseek-v3"),
        (QWEN15_MOE, "qwen1.5-moe-a2.7b"),
        (QWEN3_30B, "qwen3-30b-a3b"),
        (MIXTRAL_8X7B, "mixtral-8x7b"),
    ],
)
def test_config_json_gives_the_presets_layout(config: dict[str, Any], preset: str) -> None:
    assert layout_from_config(config) == preset_layout(preset)


def test_presets_published_numbers() -> None:
    lite = preset_layout("deepseek-v2-lite")
    assert (lite.hidden_layers, lite.dense_layers_before, lite.moe_layers) == (27, 1, 26)
    assert (lite.experts, lite.top_k) == (64, 6)
    v3 = preset_layout("deepseek-v3")
    assert (v3.hidden_layers, v3.dense_layers_before, v3.experts, v3.top_k) == (61, 3, 256, 8)
    assert preset_layout("deepseek-r1") == v3
    for name, preset in PRESETS.items():
        layout = preset.layout
        assert layout.dense_layers_before + layout.moe_layers == layout.hidden_layers, name
        assert "config.json" in preset.source, name


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(LayoutError, match=r"unknown model preset 'gpt-4'.*deepseek-v2-lite"):
        preset_layout("gpt-4")


def test_qwen_dense_layers_first_and_last_are_expressible() -> None:
    first_two = layout_from_config({**QWEN15_MOE, "mlp_only_layers": [0, 1]})
    assert (first_two.dense_layers_before, first_two.moe_layers) == (2, 22)
    last = layout_from_config({**QWEN15_MOE, "mlp_only_layers": [23]})
    assert (last.dense_layers_before, last.moe_layers, last.hidden_layers) == (0, 23, 24)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**DEEPSEEK_V2_LITE, "moe_layer_freq": 2}, "layer 3 lies between MoE layers 2 and 26"),
        ({**QWEN15_MOE, "decoder_sparse_step": 2}, "layer 2 lies between MoE layers 1 and 23"),
        ({**QWEN15_MOE, "mlp_only_layers": [5]}, "dense layer 5 lies between"),
        ({"num_hidden_layers": 4, "num_experts_per_tok": 2}, "no routed expert count"),
        ({**MIXTRAL_8X7B, "num_hidden_layers": "32"}, "num_hidden_layers must be an integer"),
        ({**MIXTRAL_8X7B, "num_experts_per_tok": 9}, "top_k=9 exceeds experts=8"),
        ({**DEEPSEEK_V2_LITE, "first_k_dense_replace": 27}, "no MoE layer"),
    ],
)  # fmt: skip
def test_config_layouts_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        layout_from_config(config)


def test_agreement_names_both_sources() -> None:
    assert agreed("dense layers", []) is None
    assert agreed("dense layers", [("--model x", 1), ("the CSV", 1)]) == 1
    with pytest.raises(LayoutError, match="dense layers: --model x says 1, --dense-layers says 0"):
        agreed("dense layers", [("--model x", 1), ("the CSV", 1), ("--dense-layers", 0)])


def test_shape_must_match_the_load() -> None:
    layout = preset_layout("deepseek-v2-lite")
    check_shape(layout, "--model deepseek-v2-lite", 26, 64)
    with pytest.raises(LayoutError, match="26 MoE layers x 64 experts, the load has 3 x 8"):
        check_shape(layout, "--model deepseek-v2-lite", 3, 8)


def test_layout_refuses_more_layers_than_hidden() -> None:
    with pytest.raises(ValueError, match="exceed 4 hidden layers"):
        ModelLayout(hidden_layers=4, dense_layers_before=2, moe_layers=3, experts=8, top_k=2)
