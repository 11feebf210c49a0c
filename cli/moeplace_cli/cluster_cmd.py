"""``moeplace export`` and ``moeplace status``: read a placement back from the cluster.

They live in the operator package (``moeplace_operator.cli_commands``), which needs
``kubernetes``; it is imported only when one of these commands runs, so solving, evaluating
and comparing never touch Kubernetes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from moeplace_cli.errors import CliError

OPERATOR_MODULE = "moeplace_operator.cli_commands"


def operator_command(name: str) -> Callable[..., Any]:
    """The operator's implementation of ``moeplace <name>``, imported lazily."""
    try:
        module = importlib.import_module(OPERATOR_MODULE)
    except ImportError as err:
        raise CliError(
            f"'moeplace {name}' needs the operator package and kubernetes "
            f"({OPERATOR_MODULE}: {err})"
        ) from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CliError(f"'moeplace {name}' is not provided by {OPERATOR_MODULE}")
    return fn  # type: ignore[no-any-return]
