"""Errors the command line reports as one line on stderr with exit code 2 (bad input)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

USAGE_EXIT_CODE = 2
P = ParamSpec("P")
R = TypeVar("R")
err_console = Console(stderr=True)


class CliError(Exception):
    """Reported as ``moeplace: error: <message>``, no traceback; exit code 2 (bad input)
    unless another is given."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        text = f"{where}: {first['msg']}" if where else str(first["msg"])
    elif isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err)
    if "allow_pickle" in text:  # numpy's words for "this is not an .npy/.npz file"
        text = "not a NumPy .npy/.npz file"
    return " ".join(text.split())


@contextmanager
def bad_input(what: str, path: Path | None = None) -> Iterator[None]:
    """Turn the library's input errors (ValueError, OSError, KeyError) into a :class:`CliError`
    prefixed with ``what`` (and ``path`` when the message does not name the file)."""
    try:
        yield
    except CliError:
        raise
    except (ValueError, OSError, KeyError) as err:
        text = _one_line(err)
        if path is not None and path.name not in text:
            text = f"{path}: {text}"
        raise CliError(f"{what}: {text}") from err


def reports_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Bad input -> ``moeplace: error: ...`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CliError as err:
            typer.echo(f"moeplace: error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper
