"""Engine adapters: write the current placement in the files the engines read.

* SGLang: ``--init-expert-location FILE.json`` with ``physical_to_logical_map`` [hidden layers]
  [P] (dense-layer rows padded, see :func:`placement.formats.to_sglang`); read at start only, so
  the operator rolls the pods when it changes.
* vLLM: the per-layer slot map of :func:`placement.formats.to_vllm` (no upstream loader yet).

Files are written to a temporary name and renamed, so an engine never reads half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from placement import Placement
from placement.formats import to_sglang, to_vllm


def write_sglang(placement: Placement, path: Path, num_hidden_layers: int | None = None) -> Path:
    """Write SGLang's ``--init-expert-location`` JSON for ``placement`` to ``path``."""
    return _write_json(path, to_sglang(placement, num_hidden_layers))


def write_vllm(placement: Placement, path: Path) -> Path:
    """Write the vLLM per-layer slot map for ``placement`` to ``path``."""
    return _write_json(path, to_vllm(placement))


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    tmp.replace(path)
    return path
