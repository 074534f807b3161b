"""``flwr-clientapp`` for a fedshield site: Flower's own ClientApp runner, but only code installed on the site runs.

Why: Flower 1.39's ``run_clientapp`` (``flwr/supernode/runtime/run_clientapp.py``) unpacks the run's app bundle
(FAB) with ``install_from_fab`` and then imports whatever ClientApp the bundle names, from the bundle's own files.
Whoever submits a run (the coordinator) could therefore ship its own code to every site. On a fedshield site the
SuperNode launcher (:mod:`fedshield.deploy.supernode_main`) puts this module first on PATH as ``flwr-clientapp``;
it runs Flower's ``flwr_clientapp()`` unchanged except for three names in the runner's module:

* ``install_from_fab`` becomes :func:`verify_fab`, which NEVER unpacks or installs the bundle: it reads the zip's
  directory and its ``pyproject.toml`` in memory and accepts only a bundle that carries no file besides
  ``pyproject.toml`` (and Flower's ``.info/`` hash list) and names ``fedshield.client.app:app`` as its ClientApp.
  (The ServerApp named there runs on the coordinator; a site cannot check what really runs there.)
* the ClientApp loader returns the site's installed :data:`fedshield.client.app.app` (the bundle is never on
  ``sys.path``), or, for a refused bundle, a stand-in that answers every message with an error reply
  ``fedshield:code-refused: ...`` so the coordinator sees why; the refusal is logged to the SuperNode's log.
* runtime dependency installation (``uv sync`` of the bundle's dependencies, which would run the coordinator's
  build code) is always off, whatever the command line says.
"""

from __future__ import annotations

import functools
import io
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from ..protocol import CODE_REFUSAL, CODE_REFUSED_CODE

__all__ = ["CLIENTAPP_REF", "CODE_REFUSAL", "CODE_REFUSED_CODE", "FabRefused", "main", "verify_fab"]

#: The one ClientApp a fedshield site runs: its own installed one.
CLIENTAPP_REF = "fedshield.client.app:app"
_PYPROJECT = "pyproject.toml"
_INFO_DIR = ".info/"


class FabRefused(Exception):
    """The run's app bundle carries code or names a ClientApp other than the site's own."""


def verify_fab(content: bytes) -> None:
    """Accept only a code-free bundle naming fedshield's ClientApp; raise :class:`FabRefused` naming the problem."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = fab.namelist()
            extra = sorted(n for n in names if n != _PYPROJECT and not n.startswith(_INFO_DIR))
            if extra:
                shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
                raise FabRefused(f"the run's app bundle carries files besides pyproject.toml ({shown}); this site "
                                 "runs only its own installed fedshield code: submit the app with `fedshield server`")
            if _PYPROJECT not in names:
                raise FabRefused("the run's app bundle has no pyproject.toml")
            project = tomllib.loads(fab.read(_PYPROJECT).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError) as err:
        raise FabRefused(f"the run's app bundle cannot be read ({type(err).__name__}: {err})") from None
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    clientapp = components.get("clientapp") if isinstance(components, dict) else None
    if clientapp != CLIENTAPP_REF:
        raise FabRefused(f"the run's app bundle names ClientApp {clientapp!r}; this site runs only its own "
                         f"{CLIENTAPP_REF!r}: submit the app with `fedshield server`")


@dataclass
class _Verdict:
    """What :func:`verify_fab` said about this process's one bundle; read by the ClientApp loader."""

    refusal: str | None = None


class _Refuser:
    """Stands in for a ClientApp: answers the message with the refusal, runs nothing of the bundle's."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.app import Error, Message

        return Message(Error(code=CODE_REFUSED_CODE, reason=self.reason), reply_to=message)


def _install_hook(verdict: _Verdict) -> Any:
    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Path:
        from ..flower_internals.serverapp import log

        try:
            verify_fab(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes())
            verdict.refusal = None
        except FabRefused as refused:
            verdict.refusal = f"{CODE_REFUSAL}: {refused}"
            log(WARNING, "fedshield: refused the run's app bundle: %s", verdict.refusal)
        return Path("/nonexistent-fedshield-never-installs-a-fab")

    return install_from_fab


def _loader_factory(verdict: _Verdict) -> Any:
    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Any:
        def load(*_: Any) -> Any:
            if verdict.refusal is not None:
                return _Refuser(verdict.refusal)
            from fedshield.client.app import app

            return app

        return load

    return get_load_client_app_fn


def _no_dependency_install(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("fedshield: a site never installs an app bundle's dependencies")


def _without_dependency_install(run: Any, *args: Any, **kwargs: Any) -> None:
    kwargs["runtime_dependency_install"] = False
    run(*args, **kwargs)


def main() -> None:
    """Run Flower's ``flwr-clientapp`` with the site's own code only (see the module docstring)."""
    import importlib

    # The modules, not the functions of the same names that their packages re-export.
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    verdict = _Verdict(refusal=f"{CODE_REFUSAL}: the app bundle was not verified")
    runner.install_from_fab = _install_hook(verdict)  # type: ignore[attr-defined]
    runner.get_load_client_app_fn = _loader_factory(verdict)  # type: ignore[attr-defined]
    runner.install_app_dependencies = _no_dependency_install  # type: ignore[attr-defined]
    cli.run_clientapp = functools.partial(_without_dependency_install, runner.run_clientapp)  # type: ignore[attr-defined]
    from .supernode_main import quicken_clientapp_pulls

    quicken_clientapp_pulls()
    sys.argv[0] = "flwr-clientapp"
    cli.flwr_clientapp()


if __name__ == "__main__":
    main()
