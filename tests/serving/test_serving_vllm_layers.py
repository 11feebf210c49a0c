"""The vLLM plugin's pure parts, in the dev venv (no torch, no vLLM): importing it needs
neither, and its MoE-row-to-decoder-layer reading."""

from types import SimpleNamespace

import pytest
from moeplace_serving.engines.vllm import hidden_layer_ids


def _model(*names: str) -> SimpleNamespace:
    return SimpleNamespace(moe_layers=[SimpleNamespace(layer_name=n) for n in names])


def test_moe_rows_map_to_their_decoder_layers() -> None:
    # DeepSeek-V2-Lite: layer 0 dense, vLLM's map rows are layers 1..
    model = _model("model.layers.1.mlp.experts", "model.layers.2.mlp.experts")
    assert hidden_layer_ids(model) == (1, 2)
    vlm = _model("language_model.model.layers.7.mlp.experts")
    assert hidden_layer_ids(vlm) == (7,)


def test_a_layer_name_without_an_index_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot read a decoder layer index from 'experts'"):
        hidden_layer_ids(_model("experts"))
