"""Command-line conventions shared by every ringbench entry point.

Bad input raises :class:`UserError`; :func:`run_main` turns it (and the usual file errors) into
one line on stderr and exit code 2. ``--debug`` keeps the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from ringbench.errors import UserError


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every entry point has: ``--debug`` (tracebacks, debug logging)."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")


def parse_args_strictly(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` for a library call: a bad argument raises :class:`UserError` with argparse's
    message, where argparse would print its usage and exit."""

    def error(message: str) -> NoReturn:
        raise UserError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; map user errors to a one-line message and exit code 2.

    Exceptions other than :class:`UserError` (and missing files / bad values, which are nearly
    always the user's) are bugs: they keep their traceback and exit 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = main(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (``--print-config | head``): not an error; stop writing quietly
        _silence_stdout()
        return 0
    except (UserError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that one cleanup path
    serves both (a terminal's Ctrl-C reaches the whole process group; ``kill`` reaches one process)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def resolve_device(device: str, flag: str = "--device") -> str:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine
    before any work starts; anything else is a :class:`UserError`."""
    import torch

    text = str(device).strip()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{flag} {device!r}: not a device; use auto, cpu, cuda or cuda:N") from exc
    if parsed.type == "cpu":
        return text
    if parsed.type != "cuda":
        raise UserError(f"{flag} {device!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: CUDA is not available on this machine")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return text


def _one_line(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split()) or type(exc).__name__
