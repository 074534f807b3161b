"""Shared CLI plumbing: turning library errors into one-line messages, and quiet logging."""

from __future__ import annotations

import logging
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn, TypeVar

import typer

from ..errors import FedshieldError
from ..known_warnings import ignore_known_harmless

__all__ = ["fail", "errors_to_exit", "configure_logging", "printable", "sigterm_as_interrupt"]

#: Terminal escape sequences (CSI, OSC, single-character) and every other C0/C1 control character but tab.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?|[\x00-\x08\x0a-\x1f\x7f-\x9f]")

T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Library errors become ``error: ...`` on stderr and exit code 2; nothing else is swallowed."""
    try:
        yield
    except FedshieldError as exc:
        fail(str(exc))


def configure_logging(verbose: bool) -> None:
    from ..flower_internals.logs import set_flower_log_level

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("fedshield").setLevel(level)
    set_flower_log_level(level if verbose else logging.ERROR)
    ignore_known_harmless()  # narrow: message + category + module; privacy warnings always show


def run_guarded(fn: Callable[[], T]) -> T:
    with errors_to_exit():
        return fn()


def printable(text: str) -> str:
    """``text`` without escape codes or control characters: a reason a remote site wrote can neither recolour,
    move the cursor in, nor retitle the operator's terminal, nor forge extra lines in its log."""
    return _CONTROL.sub("", text)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, docker stop, kill) takes the same clean path as Ctrl-C: stop the run and our processes.

    SIGINT is made to raise ``KeyboardInterrupt`` here too, even when this process was started with it ignored: a
    shell without job control (a script's ``fedshield client ... &``, CI runners, some supervisors) starts
    background commands with SIGINT ignored, and Python then installs no handler, so Ctrl-C or ``kill -INT``
    would be silently dropped and the SuperNode left running (seen: the suite started from such a shell)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
