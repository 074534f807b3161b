"""The run directory's files: ``config.json``, ``metrics.jsonl``, ``privacy.json``, ``model.safetensors`` and plots.

Every file is rewritten atomically after each round, so a crash leaves the last completed round's report intact
(the resumable state itself is the checkpoint, :mod:`fedshield.server.checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..config import RunConfig
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
        self.epsilon_budget: float | None = None

    def prepare(self, config: RunConfig) -> None:
        self.epsilon_budget = config.epsilon if config.dp else None  # drawn on epsilon.png
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", config.to_flat_dict())

    def add_round(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in self.rounds)
        atomic_write_text(self.out / "metrics.jsonl", text)

    def write_privacy(self, report: PrivacyReport | dict[str, Any]) -> None:
        """``report``: the report, or its ``to_json()`` when the caller already built it (built once a round)."""
        document = report if isinstance(report, dict) else report.to_json()
        atomic_write_text(self.out / "privacy.json", render_privacy_json(document))

    def write_model(self, state_dict: dict[str, Any], metadata: dict[str, str]) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        atomic_write_bytes(self.out / "model.safetensors", save(tensors, metadata=metadata))

    def write_plots(self) -> None:
        from .plots import FIGURES, draw_figure, render_png

        for name, key, label in FIGURES:
            budget = self.epsilon_budget if key == "epsilon_max" else None
            atomic_write_bytes(self.out / name, render_png(draw_figure(self.rounds, key, label, budget=budget)))
