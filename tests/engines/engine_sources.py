"""Load single modules of the installed engine wheels by file, without running the packages'
``__init__`` (which import the engines' serving stacks: orjson, psutil, transformers, ...).
The code executed is the wheels' own, byte for byte."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def engine_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed in this venv")
    return Path(next(iter(spec.submodule_search_locations)))


def load_file(name: str, path: Path, package_dir: Path | None = None) -> ModuleType:
    """Execute ``path`` as module ``name``; ``package_dir`` makes ``name`` a package there
    (so the file's relative imports resolve to its siblings)."""
    locations = [str(package_dir)] if package_dir is not None else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sglang_deepseek() -> ModuleType:
    """SGLang 0.5.23's ``sglang/srt/eplb/eplb_algorithms/deepseek.py`` (imports torch only)."""
    path = engine_root("sglang") / "srt" / "eplb" / "eplb_algorithms" / "deepseek.py"
    return load_file("_sglang_eplb_deepseek", path)


def vllm_default_policy() -> type:
    """vLLM 0.33.0's ``DefaultEplbPolicy`` (policy/default.py with its sibling abstract.py)."""
    policy = engine_root("vllm") / "distributed" / "eplb" / "policy"
    package = "_vllm_eplb_policy"
    empty = Path(__file__).with_name("empty_package.py")
    load_file(package, empty, package_dir=policy)
    load_file(f"{package}.abstract", policy / "abstract.py")
    default = load_file(f"{package}.default", policy / "default.py")
    cls: type = default.DefaultEplbPolicy
    return cls
