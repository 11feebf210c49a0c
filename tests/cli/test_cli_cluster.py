"""``moeplace export`` / ``status``: wired lazily to ``moeplace_operator.cli_commands``; the
rest of the CLI never imports Kubernetes. A stand-in module replaces the operator's here."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from cli_helpers import run


class UnreachableError(Exception):
    pass


def _stand_in(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    calls: list[tuple[str, str, str]] = []
    module = types.ModuleType("moeplace_operator.cli_commands")

    def export(name: str, namespace: str = "default") -> str:
        calls.append(("export", name, namespace))
        if name == "missing":
            raise LookupError(f"no proposal or placement for MoEDeployment {namespace}/{name}")
        if name == "down":
            raise UnreachableError("connection refused\nretrying")
        return "kind: ConfigMap\n"

    def status(name: str, namespace: str = "default") -> str:
        calls.append(("status", name, namespace))
        return f"MoEDeployment {namespace}/{name}  mode=Auto"

    module.export = export  # type: ignore[attr-defined]
    module.status = status  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "moeplace_operator.cli_commands", module)
    return calls


def test_status_and_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _stand_in(monkeypatch)
    ran = run("status", "demo", "-n", "serving")
    assert ran.exit_code == 0 and "MoEDeployment serving/demo" in ran.stdout
    ran = run("export", "demo")
    assert ran.exit_code == 0 and ran.stdout == "kind: ConfigMap\n\n"
    ran = run("export", "demo", "--out", tmp_path / "pinned.yaml")
    assert ran.exit_code == 0
    assert (tmp_path / "pinned.yaml").read_text() == "kind: ConfigMap\n"
    assert calls == [("status", "demo", "serving")] + [("export", "demo", "default")] * 2


def test_missing_object_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(monkeypatch)
    ran = run("export", "missing")
    assert ran.exit_code == 2
    assert (
        ran.stderr
        == "moeplace: error: no proposal or placement for MoEDeployment default/missing\n"
    )


def test_cluster_failure_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(monkeypatch)
    ran = run("export", "down")
    assert ran.exit_code == 1
    assert ran.stderr == "moeplace: error: UnreachableError: connection refused retrying\n"


def test_without_operator_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "moeplace_operator.cli_commands", None)
    ran = run("status", "demo")
    assert ran.exit_code == 2
    assert "needs the operator package" in ran.stderr


def test_cli_does_not_import_kubernetes() -> None:
    code = (
        "import sys, moeplace_cli.main, moeplace_cli.gpus_cmd, moeplace_cli.plot; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kubernetes', 'kopf', 'moeplace_operator')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_command() -> None:
    ran = run("--help")
    assert ran.exit_code == 0
    for command in ("solve", "evaluate", "compare", "export", "status", "gpus"):
        assert command in ran.stdout


def test_python_dash_m() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moeplace_cli", "gpus", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "pal" in out.stdout
