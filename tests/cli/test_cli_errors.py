"""Bad input: exit code 2 and one line on stderr, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import Scenario, run, write_gpus, write_load


def _solve_args(s: Scenario, **over: str | Path) -> list[str | Path]:
    opts: dict[str, str | Path] = {"--load": s.load, "--gpus": s.gpus, "--out": s.tmp / "o.json"}
    opts.update({f"--{k.replace('_', '-')}": v for k, v in over.items()})
    return ["solve", *(x for kv in opts.items() for x in kv)]


def _bad_load_columns(s: Scenario) -> list[str | Path]:
    (s.tmp / "bad.csv").write_text("layer,expert,count\n1,0,5\n")
    return _solve_args(s, load=s.tmp / "bad.csv")


def _bad_gpu_columns(s: Scenario) -> list[str | Path]:
    (s.tmp / "bad.csv").write_text("gpu,speed\n0,1.0\n")
    return _solve_args(s, gpus=s.tmp / "bad.csv")


def _not_dividing(s: Scenario) -> list[str | Path]:
    return _solve_args(s, redundant="3")


def _too_many_slots(s: Scenario) -> list[str | Path]:
    gpus = write_gpus(s.tmp / "two.csv", [1.0, 1.0])
    return _solve_args(s, gpus=gpus, redundant="10")


def _unknown_strategy(s: Scenario) -> list[str | Path]:
    return _solve_args(s, strategy="magic")


def _missing_file(s: Scenario) -> list[str | Path]:
    return _solve_args(s, load=s.tmp / "absent.csv")


def _bad_transitions(s: Scenario) -> list[str | Path]:
    np.save(s.tmp / "t.npy", np.zeros((1, 8, 8)))
    return _solve_args(s, transitions=s.tmp / "t.npy")


def _bad_profile(s: Scenario) -> list[str | Path]:
    (s.tmp / "p.json").write_text('{"apiVersion": "moeplace.io/v1alpha1", "gpus": []}')
    return _solve_args(s, gpus=s.tmp / "p.json")


def _garbage_placement(s: Scenario) -> list[str | Path]:
    (s.tmp / "p.json").write_text("{not json")
    return ["evaluate", "--placement", s.tmp / "p.json", "--load", s.load, "--gpus", s.gpus]


def _unknown_placement_format(s: Scenario) -> list[str | Path]:
    (s.tmp / "p.json").write_text('{"slots": [[0, 1]]}')
    return ["evaluate", "--placement", s.tmp / "p.json", "--load", s.load, "--gpus", s.gpus]


def _placement_for_other_gpus(s: Scenario) -> list[str | Path]:
    out = s.tmp / "p.json"
    assert run(*_solve_args(s, strategy="linear", out=out)).exit_code == 0
    two = write_gpus(s.tmp / "two.csv", [1.0, 1.0])
    return ["evaluate", "--placement", out, "--load", s.load, "--gpus", two]


def _placement_for_other_load(s: Scenario) -> list[str | Path]:
    out = s.tmp / "p.json"
    assert run(*_solve_args(s, strategy="linear", out=out)).exit_code == 0
    other = write_load(s.tmp / "other.csv", np.ones((2, 8)))
    return ["evaluate", "--placement", out, "--load", other, "--gpus", s.gpus]


def _out_folder_missing(s: Scenario) -> list[str | Path]:
    return _solve_args(s, out=s.tmp / "no" / "such" / "p.json")


def _png_folder_missing(s: Scenario) -> list[str | Path]:
    return ["compare", "--load", s.load, "--gpus", s.gpus, "--png", s.tmp / "no" / "c.png"]


def _previous_other_slots(s: Scenario) -> list[str | Path]:
    four, eight = s.tmp / "r4.json", s.tmp / "r8.json"
    assert run(*_solve_args(s, strategy="linear", redundant="4", out=four)).exit_code == 0
    assert run(*_solve_args(s, strategy="linear", redundant="8", out=eight)).exit_code == 0
    return ["evaluate", "--placement", four, "--previous", eight, "--load", s.load,
            "--gpus", s.gpus]  # fmt: skip


def _transitions_not_numpy(s: Scenario) -> list[str | Path]:
    return _solve_args(s, transitions=s.profile)


def _transitions_csv_columns(s: Scenario) -> list[str | Path]:
    return _solve_args(s, transitions=s.load)  # a load CSV is not a transitions CSV


def _transitions_csv_layers(s: Scenario) -> list[str | Path]:
    path = s.tmp / "t.csv"
    path.write_text("moe_layer_index,src_expert,dst_expert,count\n1,0,1,5\n3,2,2,1\n")
    return _solve_args(s, transitions=path)


def _empty_strategy_list(s: Scenario) -> list[str | Path]:
    return ["compare", "--load", s.load, "--gpus", s.gpus, "--strategies", ","]


CASES: dict[str, tuple[Callable[[Scenario], list[str | Path]], str]] = {
    "load columns": (_bad_load_columns, "need columns"),
    "gpu columns": (_bad_gpu_columns, "missing column(s) node"),
    "not dividing": (_not_dividing, "do not divide over 4 GPUs"),
    "too many slots": (_too_many_slots, "duplicate copy"),
    "unknown strategy": (_unknown_strategy, "unknown strategy 'magic'"),
    "missing file": (_missing_file, "No such file"),
    "transitions shape": (_bad_transitions, "transitions"),
    "bad profile": (_bad_profile, "not a valid GPU profile"),
    "garbage placement": (_garbage_placement, "placement"),
    "unknown placement format": (_unknown_placement_format, "unknown format"),
    "placement gpus": (_placement_for_other_gpus, "placement"),
    "placement load": (_placement_for_other_load, "placement"),
    "empty strategies": (_empty_strategy_list, "--strategies is empty"),
    "out folder": (_out_folder_missing, "--out: folder"),
    "transitions not numpy": (_transitions_not_numpy, "profile.json"),
    "transitions csv columns": (_transitions_csv_columns, "need columns"),
    "transitions csv layers": (_transitions_csv_layers, "consecutive layer boundaries"),
    "png folder": (_png_folder_missing, "--png: folder"),
    "previous slots": (_previous_other_slots, "has 16 slots per layer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(scenario: Scenario, case: str) -> None:
    make_args, message = CASES[case]
    ran = run(*make_args(scenario))
    assert ran.exit_code == 2, (ran.stdout, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith("moeplace: error: ")
    assert message in lines[0]
    assert "Traceback" not in ran.stderr + ran.stdout


def test_unknown_format_is_a_usage_error(scenario: Scenario) -> None:
    ran = run(*_solve_args(scenario, format="xml"))
    assert ran.exit_code == 2
    assert "Traceback" not in ran.stderr
