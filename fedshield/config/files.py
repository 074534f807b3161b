"""``--config FILE``: a TOML file read into a :class:`~fedshield.config.run.RunConfig`, by its dataclass fields."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .run import RunConfig

__all__ = ["load_config_file"]


def load_config_file(path: Path, *, base: RunConfig | None = None) -> RunConfig:
    """Read ``--config FILE`` (TOML, keys as the CLI flags); the ``[fedshield]`` table if there is one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc}): check its permissions and encoding") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("fedshield", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [fedshield] must be a table of settings")
    return RunConfig.from_mapping(_strategy_table(data, dict(table)), base=base)


def _strategy_table(data: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """The strategy's settings live in a ``[strategy]`` table (optionally with ``name = "krum"``), its name may
    also be ``strategy = "krum"`` among the other settings."""
    tables = [t for t in (data.get("strategy"), table.get("strategy")) if isinstance(t, dict)]
    if not tables:
        return table
    if isinstance(table.get("strategy"), dict):
        del table["strategy"]
    merged = {k: v for t in tables for k, v in t.items()}
    name = merged.pop("name", None)
    if name is not None:
        table.setdefault("strategy", name)
    table["strategy_params"] = {**dict(table.get("strategy_params", {}) or {}), **merged}
    return table
