"""``moeplace simulate``: a scenario file in, the summary out; a bad file is one line, exit 2."""

import json
from pathlib import Path

import pytest
from moeplace_cli.main import app
from sim_helpers import PROFILE
from typer.testing import CliRunner

pytestmark = pytest.mark.simulator
RUNNER = CliRunner()


def scenario(tmp_path: Path, shared: Path, **extra: object) -> Path:
    body = {
        "gpus": {"num_gpus": 8, "slots_per_gpu": 9},
        "workload": {"duration_s": 2.0, "rate_per_gpu": 20.0},
        "policy": {"kind": "static", "strategy": "greedy"},
        "shared": str(shared),
        "profile": str(PROFILE),
        **extra,
    }
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(body))
    return path


def test_summary_as_json(tmp_path: Path, shared: Path) -> None:
    result = RUNNER.invoke(app, ["simulate", str(scenario(tmp_path, shared)), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["finished"] == summary["requests"] > 0
    assert summary["policy"] == "static-greedy"
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p90"] <= summary["ttft_s"]["p99"]


def test_bad_scenario_is_one_line(tmp_path: Path, shared: Path) -> None:
    bad = scenario(tmp_path, shared, gpus={"num_gpus": 12, "slots_per_gpu": 6})
    result = RUNNER.invoke(app, ["simulate", str(bad)])
    assert result.exit_code == 2
    assert "num_gpus must be a multiple of gpus_per_node" in result.output
    assert "Traceback" not in result.output


def test_the_example_scenario_is_valid() -> None:
    from moeplace_sim.config import PolicyKind, SimConfig
    from sim_helpers import ROOT

    example = SimConfig.model_validate_json((ROOT / "examples" / "simulate-8gpu.json").read_text())
    assert example.policy.kind is PolicyKind.OPERATOR and example.gpus.cotenants


def test_a_kv_cache_too_small_for_one_request_is_one_line(tmp_path: Path, shared: Path) -> None:
    result = RUNNER.invoke(app, ["simulate", str(scenario(tmp_path, shared, kv_tokens_per_gpu=5))])
    assert result.exit_code == 2
    assert "KV-cache capacity 40 tokens is below one request's" in result.output
    assert "Traceback" not in result.output


def test_preemptions_are_reported_when_the_kv_cache_is_limited(
    tmp_path: Path, shared: Path
) -> None:
    result = RUNNER.invoke(
        app, ["simulate", str(scenario(tmp_path, shared, kv_tokens_per_gpu=700))]
    )
    assert result.exit_code == 0, result.output
    assert "preemptions (" in result.output and "tokens recomputed" in result.output
