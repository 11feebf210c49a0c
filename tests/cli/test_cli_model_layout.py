"""``moeplace solve`` never guesses the dense layers before the first MoE layer: it takes them
from --model, --model-config, the load's moe_layer_index or --dense-layers, which must agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import EXPERTS, FIRST_LAYER, LAYERS, Scenario, run

# a DeepSeek-style config.json for the synthetic load: one dense layer, then LAYERS MoE layers
CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "num_hidden_layers": LAYERS + 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": EXPERTS,
    "num_experts_per_tok": 2,
}


def solve(scenario: Scenario, out: Path, *args: str | Path | int) -> tuple[int, str, str]:
    ran = run("solve", "--gpus", scenario.gpus, "--strategy", "round-robin", "--redundant", 4,
              "--out", out, *args)  # fmt: skip
    return ran.exit_code, ran.stdout, ran.stderr


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_engine_file_refused_when_dense_layers_unknown(scenario: Scenario, fmt: str) -> None:
    out = scenario.tmp / "engine.json"
    code, _, err = solve(scenario, out, "--samples", scenario.samples, "--window", 10,
                         "--format", fmt)  # fmt: skip
    assert code == 2
    assert "dense layers precede the first MoE layer is unknown" in err
    assert "--model PRESET" in err and "--dense-layers N" in err
    assert not out.exists()


def test_canonical_file_warns_when_dense_layers_unknown(scenario: Scenario) -> None:
    out = scenario.tmp / "p.json"
    code, _, err = solve(scenario, out, "--samples", scenario.samples, "--window", 10)
    assert code == 0, err
    assert "warning: dense layers before the first MoE layer unknown" in err


def test_explicit_zero_is_accepted(scenario: Scenario) -> None:
    out = scenario.tmp / "sglang.json"
    code, _, err = solve(scenario, out, "--samples", scenario.samples, "--window", 10,
                         "--format", "sglang", "--dense-layers", 0)  # fmt: skip
    assert code == 0, err
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == LAYERS


def test_npz_layer_index_gives_the_dense_layers(scenario: Scenario) -> None:
    indexed = scenario.tmp / "indexed.npz"
    with np.load(scenario.samples) as data:
        np.savez(indexed, counts=data["counts"], moe_layer_index=np.arange(2, 2 + LAYERS))
    out = scenario.tmp / "sglang.json"
    code, _, err = solve(scenario, out, "--samples", indexed, "--window", 10, "--format", "sglang")
    assert code == 0, err
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == 2 + LAYERS


def test_config_json_gives_rows_and_top_k(scenario: Scenario) -> None:
    config = scenario.tmp / "config.json"
    config.write_text(json.dumps(CONFIG))
    out = scenario.tmp / "sglang.json"
    code, stdout, err = solve(scenario, out, "--samples", scenario.samples, "--window", 10,
                              "--format", "sglang", "--model-config", config,
                              "--json")  # fmt: skip
    assert code == 0, err
    rows = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(rows) == LAYERS + 1 and rows[0] == [s % EXPERTS for s in range(EXPERTS + 4)]
    summary = json.loads(stdout)
    assert summary["hiddenLayers"] == LAYERS + 1
    assert summary["sglangFlags"] == "--ep-size 4 --ep-num-redundant-experts 4"
    assert json.loads(summary["engineFlags"]["vllmArgs"][-1]) == {"num_redundant_experts": 4}
    canonical = scenario.tmp / "p.json"
    code, _, err = solve(scenario, canonical, "--samples", scenario.samples, "--window", 10,
                         "--model-config", config)  # fmt: skip
    assert code == 0, err
    assert json.loads(canonical.read_text())["model"]["topK"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dense-layers", 3),
         f"the moe_layer_index of load.csv says {FIRST_LAYER}, --dense-layers says 3"),
        (("--model", "deepseek-v2-lite"),
         f"--model deepseek-v2-lite has 26 MoE layers x 64 experts, the load has {LAYERS} x "
         f"{EXPERTS}"),
        (("--model", "gpt-moe"), "unknown model preset 'gpt-moe'"),
        (("--top-k", 3, "--model-config", "CONFIG"), "top-k: --model-config"),
    ],
)  # fmt: skip
def test_disagreeing_sources_refused(
    scenario: Scenario, args: tuple[str | int, ...], message: str
) -> None:
    config = scenario.tmp / "config.json"
    config.write_text(json.dumps(CONFIG))
    given = [config if a == "CONFIG" else a for a in args]
    out = scenario.tmp / "sglang.json"
    code, _, err = solve(scenario, out, "--load", scenario.load, "--format", "sglang", *given)
    assert code == 2
    assert message in " ".join(err.split())
    assert not out.exists()


def test_interleaved_config_refused(scenario: Scenario) -> None:
    config = scenario.tmp / "config.json"
    config.write_text(json.dumps({**CONFIG, "num_hidden_layers": 6, "moe_layer_freq": 2}))
    code, _, err = solve(scenario, scenario.tmp / "p.json", "--load", scenario.load,
                         "--model-config", config)  # fmt: skip
    assert code == 2 and "lies between MoE layers" in err


def test_evaluate_refuses_an_engine_file_without_dense_layers(scenario: Scenario) -> None:
    out = scenario.tmp / "sglang.json"
    code, _, err = solve(scenario, out, "--load", scenario.load, "--format", "sglang")
    assert code == 0, err
    scored = run("evaluate", "--placement", out, "--samples", scenario.samples, "--window", 10,
                 "--gpus", scenario.gpus)  # fmt: skip
    assert scored.exit_code == 2 and "is a sglang file" in scored.stderr
    scored = run("evaluate", "--placement", out, "--samples", scenario.samples, "--window", 10,
                 "--gpus", scenario.gpus, "--dense-layers", FIRST_LAYER)  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
