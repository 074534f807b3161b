"""Simulated runs of many test modules in ONE Flower simulation per client count (one engine start, one set of
workers that import torch once), instead of one simulation per module.

A test module registers its runs when it is imported (collection imports every module before any test runs) and
reads them through a module-scoped fixture:

    sim_batch.register("in_clear/plain", lambda root: RunConfig(num_clients=3, ..., out=root / "in_clear-plain"))

    @pytest.fixture(scope="module")
    def batch(tmp_path_factory):
        return sim_batch.results(tmp_path_factory, clients=3)

    def test_x(batch):
        config = batch.config("in_clear/plain")  # raises the run's own error if that run failed

The first fixture to ask for a client count runs every run registered for that count (``tests/_multirun.py``
``run_many``: each run has its own config, run directory, strategy and client ledgers; they share the simulated
SuperNodes, hence one batch per ``num_clients``). A failing run fails only the tests that read it. Running one test
file runs only that file's runs. The modules of one batch share one xdist group (:func:`batch_groups`), so the
batch runs once per session, on one worker; different batches may run on different workers.

A run may bring a ``client_hook(msg, context, reply) -> reply`` (a hostile site for tests of what the server does
with it): then every run of that batch runs on a test ClientApp that calls fedshield's real handlers and applies the
hook of the run the message belongs to (found by its run directory, which every round's settings name), so the
other runs stay honest.

User task modules (``module:factory`` tasks) are written by ``register(..., files=...)`` into the batch's root, which
is on ``sys.path`` for the session and on ``PYTHONPATH`` while the simulation starts (it reaches the workers).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedshield.config import RunConfig

__all__ = ["Batch", "register", "results", "TIMEOUT", "task_package", "batch_groups"]

#: The first consumer's set-up runs the whole batch (minutes under load): its timeout must cover it.
TIMEOUT = pytest.mark.timeout(1500)


@dataclass(frozen=True)
class _Spec:
    build: Callable[[Path], RunConfig]
    clients: int
    wrap_grid: Callable[[Any], Any] | None
    files: Callable[[Path], object] | None
    client_hook: Callable[[Any, Any, Any], Any] | None


@dataclass
class Batch:
    """The finished runs of one client count: ``name -> config`` (its ``out`` holds the run directory)."""

    configs: dict[str, RunConfig]
    failures: dict[str, BaseException] = field(default_factory=dict)
    root: Path = Path()

    def config(self, name: str) -> RunConfig:
        """``name``'s config once its run has finished; raises (from the run's own error) if it failed."""
        if name in self.failures:
            raise RuntimeError(f"simulated run {name!r} of the shared batch failed") from self.failures[name]
        return self.configs[name]

    def view(self, prefix: str) -> Mapping[str, RunConfig]:
        """The runs named ``prefix + key`` as ``key -> config``; reading a failed run raises its error."""
        return _View(self, prefix)


class _View(Mapping[str, RunConfig]):
    def __init__(self, batch: Batch, prefix: str) -> None:
        self._batch, self._prefix = batch, prefix

    def __getitem__(self, key: str) -> RunConfig:
        return self._batch.config(self._prefix + key)

    def __iter__(self) -> Iterator[str]:
        names = [*self._batch.configs, *self._batch.failures]
        return (name[len(self._prefix):] for name in names if name.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


_REGISTRY: dict[str, _Spec] = {}
_DONE: dict[int, Batch | BaseException] = {}
_COUNTS_OF_MODULE: dict[str, set[int]] = {}


def register(
    name: str, build: Callable[[Path], RunConfig], *, clients: int, wrap_grid: Callable[[Any], Any] | None = None,
    files: Callable[[Path], object] | None = None, client_hook: Callable[[Any, Any, Any], Any] | None = None,
) -> None:
    """Add a run to the batch of ``clients`` clients. ``build(root)`` returns its config (``out`` under ``root``);
    ``wrap_grid`` wraps the server's grid for this run only; ``files(root)`` writes what the run needs first
    (a user task package, a data file); ``client_hook(msg, context, reply)`` rewrites this run's train replies."""
    if name in _REGISTRY:
        raise ValueError(f"simulated run {name!r} is registered twice")
    _REGISTRY[name] = _Spec(build, clients, wrap_grid, files, client_hook)
    module = Path(sys._getframe(1).f_globals.get("__file__", "?")).name  # the registering test module
    _COUNTS_OF_MODULE.setdefault(module, set()).add(clients)


def batch_groups() -> dict[str, str]:
    """``test module file name -> xdist group`` for every module that registered runs: modules sharing a batch
    (a client count), directly or through another module, share one group, so each batch runs once per session on
    one worker while different batches may run on different workers (``_schedule.assign_groups``)."""
    component: dict[int, set[int]] = {}
    for counts in _COUNTS_OF_MODULE.values():  # union of the client counts one module ties together
        merged = set(counts).union(*(component.get(c, set()) for c in counts))
        for count in merged:
            component[count] = merged
    return {module: "simbatch-" + "-".join(map(str, sorted(component[min(counts)])))
            for module, counts in _COUNTS_OF_MODULE.items()}


def results(tmp_path_factory: pytest.TempPathFactory, *, clients: int) -> Batch:
    """Every run registered for ``clients`` clients, run once (in one simulation) on first use."""
    if clients not in _DONE:
        try:
            _DONE[clients] = _run(tmp_path_factory.mktemp(f"simbatch{clients}"), clients)
        except BaseException as exc:  # the simulation itself failed: every later consumer fails, none reruns it
            _DONE[clients] = exc
            raise
    done = _DONE[clients]
    if isinstance(done, BaseException):
        raise RuntimeError(f"the shared {clients}-client simulation failed (see the first test that ran it)") from done
    return done


def _run(root: Path, clients: int) -> Batch:
    from _multirun import run_many

    specs = {name: spec for name, spec in _REGISTRY.items() if spec.clients == clients}
    if not specs:
        raise LookupError(f"no simulated run is registered for {clients} clients")
    configs, broken = _build(root, specs, clients)
    specs = {name: specs[name] for name in configs}
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # user task packages, for the tests that load them after the batch
    failures: dict[int, BaseException] = {}
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.getcwd(), previous) if p)
    try:
        hooks = {configs[name].out.name: spec.client_hook for name, spec in specs.items() if spec.client_hook}
        if configs:  # else every run's set-up failed: nothing to simulate
            run_many(list(configs.values()), wrap_grids=[spec.wrap_grid for spec in specs.values()],
                     failures=failures, client_app=_hooked_app(hooks) if hooks else None)
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
    names = list(configs)
    return Batch(configs, {**broken, **{names[i]: exc for i, exc in failures.items()}}, root)


def _build(root: Path, specs: dict[str, _Spec], clients: int) -> tuple[dict[str, RunConfig], dict[str, BaseException]]:
    """Each run's files and config; a run whose set-up fails is left out (and its readers fail), not the batch."""
    configs: dict[str, RunConfig] = {}
    broken: dict[str, BaseException] = {}
    for name, spec in specs.items():
        try:
            if spec.files is not None:
                spec.files(root)
            config = spec.build(root)
            if config.num_clients != clients:
                raise ValueError(f"registered for {clients} clients but configures {config.num_clients}")
        except Exception as exc:
            broken[name] = exc
        else:
            configs[name] = config
    return configs, broken


def task_package(package: str, source: str) -> Callable[[Path], None]:
    """A ``files`` hook for ``register``: writes ``package/mytask.py`` holding ``source`` into the batch's root, so
    ``package.mytask:factory`` names a user task (use a package name no other test writes)."""

    def write(root: Path) -> None:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").write_text("")
        (root / package / "mytask.py").write_text(source)

    return write


def _hooked_app(hooks: dict[str, Callable[[Any, Any, Any], Any]]) -> Any:
    """fedshield's train and evaluate handlers (with the mods a site runs in simulation); a train reply of a run in
    ``hooks`` (run directory name -> hook) goes through its hook before SecAgg+ masks it, where a site that controls
    its own code could rewrite it. The hooks travel to the workers with the app."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedshield import protocol as P
    from fedshield.client import app as fedshield_app
    from fedshield.config import RoundSettings

    app = ClientApp()

    @app.train(mods=[fedshield_app.packed_wire, fedshield_app.refuse_plain_updates,
                     fedshield_app.secagg_when_requested])
    def _train(msg: Message, context: Context) -> Message:
        reply = fedshield_app.train(msg, context)
        settings = RoundSettings.from_record_dict(dict(msg.content[P.CONFIG]))
        hook = hooks.get(Path(settings.sim_state_root).parent.name)
        return reply if hook is None else hook(msg, context, reply)

    @app.evaluate(mods=[fedshield_app.packed_wire])
    def _evaluate(msg: Message, context: Context) -> Message:
        return fedshield_app.evaluate(msg, context)

    return app
