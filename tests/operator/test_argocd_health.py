"""The Argo CD health check (docs/argocd/moedeployment-health.lua) under Lua 5.1, the dialect of
Argo CD's gopher-lua, on statuses built with the operator's own status models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
from moeplace_operator.spec import (
    Condition,
    ConditionStatus,
    ConditionType,
    MoEDeploymentStatus,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "argocd" / "moedeployment-health.lua"


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the script as Argo CD does: a chunk with the resource bound to ``obj``."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj)\n{SCRIPT.read_text()}\nend")
    result = check(lua.table_from(obj, recursive=True))
    return {k: result[k] for k in ("status", "message")}


def condition(kind: ConditionType, status: bool, reason: str, message: str = "") -> Condition:
    return Condition(
        type=kind,
        status=ConditionStatus.TRUE if status else ConditionStatus.FALSE,
        reason=reason,
        message=message,
        last_transition_time="2026-12-01T07:00:00Z",
        observed_generation=3,
    )


def resource(
    conditions: list[Condition], observed: int | None = 3, generation: int = 3
) -> dict[str, Any]:
    status = MoEDeploymentStatus(observed_generation=observed, conditions=conditions)
    return {
        "metadata": {"name": "ds", "generation": generation},
        "status": status.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def test_no_status_yet_is_progressing() -> None:
    assert health({"metadata": {"generation": 1}}) == {
        "status": "Progressing",
        "message": "Waiting for the operator",
    }


def test_ready_is_healthy() -> None:
    obj = resource([condition(ConditionType.READY, True, "RolledOut", "placement v4 rolled out")])
    assert health(obj) == {"status": "Healthy", "message": "placement v4 rolled out"}


def test_a_spec_change_not_yet_reconciled_is_progressing_even_when_ready() -> None:
    obj = resource([condition(ConditionType.READY, True, "RolledOut")], observed=2, generation=3)
    assert health(obj) == {"status": "Progressing", "message": "Spec change not yet reconciled"}


def test_degraded_wins_over_ready_and_says_why() -> None:
    obj = resource(
        [
            condition(ConditionType.READY, True, "RolledOut"),
            condition(
                ConditionType.DEGRADED, True, "PrometheusUnreachable", "keeping placement ab12"
            ),
        ]
    )
    assert health(obj) == {
        "status": "Degraded",
        "message": "PrometheusUnreachable: keeping placement ab12",
    }


def test_not_ready_is_progressing_with_the_reason() -> None:
    obj = resource(
        [
            condition(ConditionType.DEGRADED, False, "AsExpected"),
            condition(ConditionType.READY, False, "Solving"),  # message left empty
        ]
    )
    assert health(obj) == {"status": "Progressing", "message": "Solving: "}


def test_the_operator_docs_point_at_the_tested_script() -> None:
    docs = (REPO / "docs" / "operator.md").read_text()
    assert "docs/argocd/moedeployment-health.lua" in docs
    assert not re.search(r"^\s*hs = \{status", docs, re.MULTILINE), "a stale copy in the docs"
