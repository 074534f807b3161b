"""The run directory's files: ``config.json``, ``metrics.jsonl``, ``privacy.json``, ``model.safetensors``, the
checkpoint and plots.

Every file is rewritten atomically after each round, so a crash leaves the last completed round's report intact
(the resumable state itself is the checkpoint, :mod:`fedshield.server.checkpoint`).

A round's files are encoded in the server's thread and written by one background thread
(:meth:`RunWriter.round_files`), in the order they were given, while the next round runs: the writes are mostly
``fsync`` and ``rename`` waits (about 10 ms a round, a tenth of a simulated round of issue 13's job), and nothing
in the round loop reads them back. The writer is never more than one round behind: the next round's files wait
for the previous round's, whose error (a full disk) is raised there. A kill while a round's files are queued
leaves the previous round's checkpoint, as a kill just before them always did.
"""

from __future__ import annotations

import json
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


def render_privacy_json(document: dict[str, Any]) -> str:
    """``privacy.json``'s text: indented like every other report, but each client's entry on one line.

    Why: Python's JSON encoder is its slow pure-Python path whenever it indents, and this file is rewritten after
    every round with one entry per client (a 100-client run spent more time writing it than aggregating). One line
    per client is encoded by the C encoder and is as easy to read and grep. Any JSON reader sees the same document.
    """
    clients = document.get("clients")
    head = {k: v for k, v in document.items() if k != "clients"}
    text = json.dumps(head, indent=2, sort_keys=True, allow_nan=False)
    if clients is None:
        return text + "\n"
    rows = ",\n".join(f"    {json.dumps(name)}: {json.dumps(entry, sort_keys=True, allow_nan=False)}"
                      for name, entry in clients.items())
    block = f'"clients": {{\n{rows}\n  }}' if rows else '"clients": {}'
    return (text[:-2] + f",\n  {block}\n}}\n") if head else f"{{\n  {block}\n}}\n"


class RunWriter:
    """Owns the run directory; every write is atomic."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.rounds: list[dict[str, Any]] = []
        # Each row's line of metrics.jsonl, encoded once (rows are never changed once recorded), with the rows
        # they encode: a long run no longer encodes every past row again every round.
        self._lines: list[tuple[dict[str, Any], str]] = []
        self.epsilon_budget: float | None = None
        self._batch: list[tuple[Path, bytes]] | None = None
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
        finally:
            self._batch = None
        self._writer.submit(_write_all, batch)

    def flush(self) -> None:
        """Wait until every queued file is written; raise the error of a write that failed."""
        self._writer.wait()

    def close(self) -> None:
        """Flush, then let the background writer's thread go."""
        self._writer.close()

    def _put(self, name: str, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append((self.out / name, data))
        else:
            atomic_write_bytes(self.out / name, data)

    def prepare(self, config: RunConfig) -> None:
        self.epsilon_budget = config.epsilon if config.dp else None  # drawn on epsilon.png
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", config.to_flat_dict())

    def add_round(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        self.write_metrics()

    def write_metrics(self) -> None:
        """``metrics.jsonl``: one line per round in :attr:`rounds`."""
        kept = 0
        for (row, _line), current in zip(self._lines, self.rounds):
            if row is not current:
                break
            kept += 1
        del self._lines[kept:]
        self._lines.extend((r, json.dumps(r, sort_keys=True, allow_nan=False) + "\n") for r in self.rounds[kept:])
        self._put("metrics.jsonl", "".join(line for _row, line in self._lines).encode("utf-8"))

    def write_checkpoint(self, ckpt: Checkpoint) -> None:
        self._put(CHECKPOINT_FILE, encode_checkpoint(ckpt))

    def write_privacy(self, report: PrivacyReport | dict[str, Any]) -> None:
        """``report``: the report, or its ``to_json()`` when the caller already built it (built once a round)."""
        document = report if isinstance(report, dict) else report.to_json()
        self._put("privacy.json", render_privacy_json(document).encode("utf-8"))

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


def _write_all(files: list[tuple[Path, bytes]]) -> None:
    for path, data in files:
        atomic_write_bytes(path, data)
