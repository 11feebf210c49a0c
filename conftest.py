"""Hypothesis profiles for every test directory. ``repeatable`` (the default, what CI runs):
derandomized, so a fresh clone runs the same examples every time and a red run is not luck.
``explore`` (``HYPOTHESIS_PROFILE=explore``): random examples, to look for new failures; pin
what it finds as an explicit case beside the property."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
