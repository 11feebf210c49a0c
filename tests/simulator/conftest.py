"""The real data folder the simulator tests read (they skip when it is absent)."""

from pathlib import Path

import pytest
from sim_helpers import SHARED


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data" / "routing").is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED
