"""``python -m moeplace_cli``: the same as the ``moeplace`` script."""

from moeplace_cli.main import app

app(prog_name="moeplace")
