"""``moeplace export`` and ``moeplace status``: read a placement back from the cluster.

They live in the operator package (``moeplace_operator.cli_commands``: ``export(name,
namespace=...) -> str`` and ``status(name, namespace=...) -> str``, raising ``LookupError`` when
the objects are missing), which needs ``kubernetes``; it is imported only when one of these
commands runs, so solving, evaluating and comparing never touch Kubernetes.
"""

from __future__ import annotations

from collections.abc import Callable

from moeplace_cli.errors import CliError

OperatorCommand = Callable[..., str]


def operator_command(name: str) -> OperatorCommand:
    """The operator's implementation of ``moeplace <name>``. Imported here, not at the top:
    ``kubernetes`` at the top would add 15-25% to the start of every other command."""
    try:
        from moeplace_operator.cli_commands import export, status
    except ImportError as err:
        raise CliError(
            f"'moeplace {name}' needs the operator package and kubernetes "
            f"(moeplace_operator.cli_commands: {err})"
        ) from err
    commands: dict[str, OperatorCommand] = {"export": export, "status": status}
    return commands[name]


def run_operator_command(name: str, resource: str, namespace: str | None) -> str:
    """Text of ``moeplace <name> <resource>``. A missing object is bad input (exit 2); a
    cluster that cannot be reached or refuses is reported on one line with exit code 1."""
    fn = operator_command(name)
    kwargs = {} if namespace is None else {"namespace": namespace}
    try:
        text = fn(resource, **kwargs)
    except LookupError as err:
        raise CliError(str(err).strip("'\"")) from err
    except Exception as err:
        raise CliError(f"{type(err).__name__}: {' '.join(str(err).split())}", 1) from err
    return str(text)
