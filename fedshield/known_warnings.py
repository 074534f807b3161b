"""Warnings from our dependencies that we know to be harmless, filtered narrowly so users never see them.

Each filter names the message, the category and the module that raises it, so a new warning (or the same text
from another place) still shows. Nothing here concerns privacy: warnings that do (``--no-dp``, secure RNG,
budget) are never filtered. Installed by :func:`ignore_known_harmless` when an entry point starts (the CLI, the
ServerApp), never on import.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

__all__ = ["KNOWN_HARMLESS", "KnownWarning", "ignore_known_harmless"]


class KnownWarning(NamedTuple):
    message: str  #: regex matched at the start of the warning's text
    category: type[Warning]
    module: str  #: regex matched against the module that raised it
    why: str


KNOWN_HARMLESS = (
    KnownWarning(
        "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices", FutureWarning,
        r"ray\._private\.worker",
        "Ray's notice of a future default, printed on every ray.init; fedshield sets each client's device itself",
    ),
    KnownWarning(
        r"GitWildMatchPattern \('gitwildmatch'\) is deprecated", DeprecationWarning, r"pathspec(\..*)?$",
        "Flower 1.39 builds its app bundle with pathspec's old pattern name; nothing to do on our side",
    ),
    KnownWarning(
        "Full backward hook is firing when gradients are computed with respect to module outputs", UserWarning,
        r"torch\.utils\.hooks",
        "Opacus' hooks on a first layer whose input needs no gradient (the data): expected, per-sample "
        "gradients are still exact",
    ),
)


def ignore_known_harmless() -> None:
    """Install the filters process-wide (idempotent: ``filterwarnings`` drops an identical earlier entry)."""
    for known in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
