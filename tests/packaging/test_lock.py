"""The lock files cover pyproject.toml: every declared dependency is pinned there, at a version
its specifier allows, with hashes; the runtime lock holds the dev lock's versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)", re.MULTILINE)


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def declared(*groups: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for group in groups:
        reqs += project["optional-dependencies"][group]
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_within_its_specifier() -> None:
    for lock, groups in (("requirements-dev.lock", ("dev",)), ("requirements.lock", ())):
        pinned = pins(lock)
        for req in declared(*groups):
            name = canonicalize_name(req.name)
            assert name in pinned, f"{req.name} is declared in pyproject.toml but not in {lock}"
            assert req.specifier.contains(pinned[name], prereleases=True), (
                f"{lock} pins {req.name}=={pinned[name]}, outside {req.specifier}"
            )


def test_runtime_lock_is_the_dev_lock_without_dev_tools() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert not {name for name in runtime if runtime[name] != dev.get(name)}
    assert "pytest" in dev and "pytest" not in runtime


def test_every_pin_has_a_hash() -> None:
    for lock in ("requirements.lock", "requirements-dev.lock"):
        entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", (ROOT / lock).read_text())
        unhashed = [e.split()[0] for e in entries if PIN.match(e) and "--hash=sha256:" not in e]
        assert not unhashed, f"{lock}: no hash for {unhashed}"
