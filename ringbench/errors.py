"""The error type for bad input, raised by library code and reported by the command-line layer."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(ValueError):
    """Bad input (a file, a flag, a config value): library code raises it like any ``ValueError``;
    :func:`ringbench.cli.run_main` reports it in one line with exit code 2."""


def preview(keys: Sequence[str], n: int = 8) -> str:
    """The first ``n`` of a list of keys for an error message: ``[a, b, ...]``."""
    keys = list(keys)
    return f"[{', '.join(keys[:n])}{', ...' if len(keys) > n else ''}]"
