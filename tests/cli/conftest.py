"""Fixtures for the ``moeplace`` command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import Scenario, make_scenario


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    return make_scenario(tmp_path)
