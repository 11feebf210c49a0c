#!/usr/bin/env bash
# The engine-test environment: PyPI's torch (CPU use; its CUDA libraries come along, ~5 GB),
# the pinned SGLang and vLLM wheels without their heavy dependencies, and this checkout's
# this checkout's moeplace installed editable on top (with the plugins' entry points).
#
#   ${XDG_CACHE_HOME:-~/.cache}/moeplace/engines-torch-<version>/   shared, installed once
#   .venv-engines/                                                  per clone: moeplace itself
#
# The per-clone venv sees the cached one through a .pth file (site.addsitedir), so a fresh
# clone costs seconds once the cache is there. Usage: tools/engines-venv.sh (prints the python).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${MOEPLACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moeplace}"
TORCH_VERSION=2.14.1 # SGLang 0.5.23 pins 2.14.1, vLLM 0.33.0 pins 2.14.0: pure-Python paths only
BASE="$CACHE/engines-torch-$TORCH_VERSION"
PY="${PYTHON:-python3}"

# One installer at a time into the shared cache (several clones may run this at once).
mkdir -p "$CACHE"
exec 9>"$CACHE/engines.lock"
flock 9
if [[ ! -f "$BASE/.torch-installed" ]]; then
  rm -rf "$BASE"
  "$PY" -m venv "$BASE"
  "$BASE/bin/pip" install -q --upgrade pip
  "$BASE/bin/pip" install -q "torch==$TORCH_VERSION"
  touch "$BASE/.torch-installed"
fi
# Idempotent: pip returns at once when everything is there.
"$BASE/bin/pip" install -q -r "$ROOT/tools/engines/deps.txt"
"$BASE/bin/pip" install -q --no-deps -r "$ROOT/tools/engines/wheels.txt"

flock -u 9

VENV="$ROOT/.venv-engines"
SITE="lib/python$("$BASE/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$BASE/bin/python" -m venv "$VENV"
fi
echo "import site; site.addsitedir('$BASE/$SITE')" >"$VENV/$SITE/moeplace-engines-base.pth"
# moeplace's locked dependencies: pip sees the cached venv's packages and adds only the rest.
# Then the serving distribution pods install (its entry points register the plugins), without
# its [sglang]/[vllm] extras' dependency trees: the engines are already there.
"$VENV/bin/python" -m pip install -q --require-hashes -r "$ROOT/requirements-dev.lock"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT/serving"
echo "$VENV/bin/python"
