"""The run directory's files: ``config.json``, ``metrics.jsonl``, ``privacy.json``, ``model.safetensors``, the
checkpoint and plots.

After each round the checkpoint, the model and ``privacy.json`` are replaced atomically and the round's row is
appended to ``metrics.jsonl``, so a crash leaves the last completed round's report intact (the resumable state
itself is the checkpoint, :mod:`fedshield.server.checkpoint`). Why append: rewriting every row every round made a
round's bookkeeping grow with the run (with the privacy report's own growth, 18 ms of the server thread's CPU at
round 1,000 of a 100-client run against 3-5 ms at round 20: benchmarks/bookkeeping.py); a checkpoint holds only the rows ``metrics.jsonl`` does not already hold on
disk (:attr:`RunWriter.rows_in_file`), and a resume rewrites ``metrics.jsonl`` from the checkpoint in one atomic
replace. An append is written and fsynced before the next round's checkpoint is: a power cut can tear only the
line of the round whose checkpoint carries it.

A round's files are encoded in the server's thread and written by one background thread
(:meth:`RunWriter.round_files`), in the order they were given, while the next round runs: the writes are mostly
``fsync`` and ``rename`` waits (about 10 ms a round, a tenth of a simulated round of issue 13's job), and nothing
in the round loop reads them back. The writer is never more than one round behind: the next round's files wait
for the previous round's, whose error (a full disk) is raised there. A kill while a round's files are queued
leaves the previous round's checkpoint, as a kill just before them always did.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import RunConfig
from .checkpoint import CHECKPOINT_FILE, Checkpoint, encode_checkpoint
from .one_behind import OneBehind
from .report import PrivacyReport

__all__ = ["RunWriter", "render_privacy_json"]


def render_privacy_json(document: dict[str, Any], lines: dict[str, tuple[dict[str, Any], str]] | None = None) -> str:
    """``privacy.json``'s text: indented like every other report, but each client's entry, and each client-level
    release, on one line.

    Why: Python's JSON encoder is its slow pure-Python path whenever it indents, and this file is rewritten after
    every round with one entry per client and one per release so far (a 100-client run spent more time writing it
    than aggregating; the releases made round 1,000 cost as much again). One line per entry is encoded by the C
    encoder and is as easy to read and grep. Any JSON reader sees the same document. ``lines``: each entry's text,
    kept between calls and reused while the report hands over the same entry object (it builds a new one when a
    round touches the client; a release never changes): a round encodes what it changed.
    """
    cache = lines if lines is not None else {}
    clients = document.get("clients")
    head = {k: v for k, v in document.items() if k != "clients"}
    level = head.get("client_level")
    releases = level.get("releases") if isinstance(level, dict) else None
    if isinstance(releases, list) and releases:
        head["client_level"] = {**level, "releases": _SPLICE}
    text = json.dumps(head, indent=2, sort_keys=True, allow_nan=False)
    if isinstance(releases, list) and releases:
        rows = [_line(cache, f"release/{i}", entry, "      ") for i, entry in enumerate(releases)]
        text = text.replace(json.dumps(_SPLICE), "[\n" + ",\n".join(rows) + "\n    ]", 1)
    if clients is None:
        return text + "\n"
    rows = [_line(cache, name, entry, f"    {json.dumps(name)}: ") for name, entry in clients.items()]
    body = ",\n".join(rows)
    block = f'"clients": {{\n{body}\n  }}' if rows else '"clients": {}'
    return (text[:-2] + f",\n  {block}\n}}\n") if head else f"{{\n  {block}\n}}\n"


_SPLICE = "\u0000fedshield:releases\u0000"  # a string no report holds: where the release lines go


def _line(cache: dict[str, tuple[Any, str]], key: str, entry: Any, prefix: str) -> str:
    cached = cache.get(key)
    if cached is None or cached[0] is not entry:
        cached = (entry, prefix + json.dumps(entry, sort_keys=True, allow_nan=False))
        cache[key] = cached
    return cached[1]


class RunWriter:
    """Owns the run directory; every write replaces its file atomically, but a round's row is appended."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.rounds: list[dict[str, Any]] = []
        # Each row's line of metrics.jsonl, encoded once (rows are never changed once recorded), with the rows
        # they encode: a long run no longer encodes every past row again every round.
        self._lines: list[tuple[dict[str, Any], str]] = []
        #: Leading rows of :attr:`rounds` that metrics.jsonl holds on disk once the queued writes are done (a
        #: checkpoint leaves them out); 0 after a failed write, until a full replace.
        self.rows_in_file = 0
        self._appending = False  # metrics.jsonl was last written by this writer: new rows can be appended
        self.epsilon_budget: float | None = None
        self._privacy_lines: dict[str, tuple[dict[str, Any], str]] = {}  # render_privacy_json's, between rounds
        self._batch: list[tuple[Path, bytes, bool]] | None = None
        self._writer = OneBehind("fedshield-run-files")

    @contextmanager
    def round_files(self) -> Iterator[None]:
        """Queue the writes made inside for the background writer, to be written in order once the previous
        round's are done (waited for here first, so the writer is at most one round behind and a failed write is
        raised by the next round). An error inside writes nothing of the batch."""
        self.flush()
        self._batch = batch = []
        try:
            yield
        except BaseException:
            self._forget_file()  # the rows queued here are not written: the next write replaces the file
            raise
        finally:
            self._batch = None
        self._writer.submit(_write_all, batch)

    def flush(self) -> None:
        """Wait until every queued file is written; raise the error of a write that failed."""
        try:
            self._writer.wait()
        except BaseException:
            self._forget_file()
            raise

    def _forget_file(self) -> None:
        """What metrics.jsonl holds is unknown after a failed write: no append, no row left to it, until a full
        replace (the next :meth:`write_metrics`) writes every row again."""
        self._appending, self.rows_in_file = False, 0

    def close(self) -> None:
        """Flush, then let the background writer's thread go."""
        self._writer.close()

    def _put(self, name: str, data: bytes, *, append: bool = False) -> None:
        if self._batch is not None:
            self._batch.append((self.out / name, data, append))
        else:
            _write(self.out / name, data, append)

    def prepare(self, config: RunConfig) -> None:
        self.epsilon_budget = config.epsilon if config.dp else None  # drawn on epsilon.png
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", config.to_flat_dict())

    def add_round(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        self.write_metrics()

    def write_metrics(self) -> None:
        """``metrics.jsonl``: one line per round in :attr:`rounds`; new rows are appended to what this writer
        wrote, anything else (the first write, rows replaced by a resume) replaces the file."""
        n = len(self._lines)
        if n and n <= len(self.rounds) and self.rounds[n - 1] is self._lines[-1][0]:
            kept = n  # rows are only ever appended (a resume replaces them all: new objects)
        else:
            kept = 0
            for (row, _line), current in zip(self._lines, self.rounds):
                if row is not current:
                    break
                kept += 1
        append = self._appending and kept == len(self._lines)
        del self._lines[kept:]
        self._lines.extend((r, json.dumps(r, sort_keys=True, allow_nan=False) + "\n") for r in self.rounds[kept:])
        lines = self._lines[kept:] if append else self._lines
        try:
            self._put("metrics.jsonl", "".join(line for _row, line in lines).encode("utf-8"), append=append)
        except BaseException:
            self._forget_file()
            raise
        self._appending, self.rows_in_file = True, len(self._lines)

    def write_checkpoint(self, ckpt: Checkpoint) -> None:
        """The checkpoint, with the rows metrics.jsonl holds on disk left to it (call before :meth:`write_metrics`
        in a round's files: those rows were written by an earlier round's, which are done)."""
        if self._batch is None:
            self.flush()  # rows_in_file counts rows queued for writing: on disk only once the queue is done
        self._put(CHECKPOINT_FILE, encode_checkpoint(ckpt, rows_in_file=min(self.rows_in_file, len(ckpt.rounds))))

    def write_privacy(self, report: PrivacyReport | dict[str, Any]) -> None:
        """``report``: the report, or its ``to_json()`` when the caller already built it (built once a round)."""
        document = report if isinstance(report, dict) else report.to_json()
        self._put("privacy.json", render_privacy_json(document, self._privacy_lines).encode("utf-8"))

    def write_model(self, state_dict: dict[str, Any], metadata: dict[str, str]) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        self._put("model.safetensors", save(tensors, metadata=metadata))

    def write_plots(self) -> None:
        from .plots import FIGURES, draw_figure, render_png

        self.flush()
        for name, key, label in FIGURES:
            budget = self.epsilon_budget if key == "epsilon_max" else None
            atomic_write_bytes(self.out / name, render_png(draw_figure(self.rounds, key, label, budget=budget)))


def _write_all(files: list[tuple[Path, bytes, bool]]) -> None:
    for path, data, append in files:
        _write(path, data, append)


def _write(path: Path, data: bytes, append: bool) -> None:
    """Replace ``path`` atomically, or append ``data`` to it and fsync before returning."""
    if not append:
        atomic_write_bytes(path, data)
        return
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
