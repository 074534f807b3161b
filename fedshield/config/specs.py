"""Value types inside a run config: the strategy's own settings and the bundled data's partition."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .names import PARTITION_KINDS

__all__ = ["PartitionSpec", "StrategyParams"]

_StrategyValue = bool | int | float | str


class StrategyParams(Mapping[str, _StrategyValue]):
    """Read-only, hashable ``name -> scalar`` settings of the aggregation strategy (a ``[strategy]`` TOML table).

    Immutable so a frozen :class:`RunConfig` really is frozen; the names and ranges are checked against the
    chosen strategy by :func:`fedshield.strategies.registry.validate_params`.
    """

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        items: dict[str, _StrategyValue] = {}
        for raw_key, value in dict(values or {}).items():
            if not isinstance(raw_key, str) or not raw_key:
                raise ConfigError(f"strategy settings need text names, got {raw_key!r}")
            if not isinstance(value, (bool, int, float, str)):
                raise ConfigError(
                    f"strategy setting {raw_key!r} must be a number, true/false or text, got {type(value).__name__} "
                    f"{value!r}: write it as e.g. `{raw_key.replace('-', '_')} = 0.1` under [strategy]"
                )
            items[raw_key.replace("-", "_")] = value
        object.__setattr__(self, "_items", dict(sorted(items.items())))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("StrategyParams is read-only")

    def __getitem__(self, key: str) -> _StrategyValue:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"StrategyParams({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (StrategyParams, (dict(self._items),))

    def to_dict(self) -> dict[str, _StrategyValue]:
        return dict(self._items)


@dataclass(frozen=True)
class PartitionSpec:
    """How the bundled data set is split across simulated clients: ``iid``, ``dirichlet:ALPHA`` or ``shard:N``."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        kind, _, arg = str(text).strip().partition(":")
        kind = kind.lower()
        if kind not in PARTITION_KINDS:
            raise ConfigError(
                f"unknown partition {text!r}: expected one of iid, dirichlet:ALPHA (e.g. dirichlet:0.5), shard:N"
            )
        if kind == "iid":
            if arg:
                raise ConfigError(f"partition 'iid' takes no argument, got {text!r}: use plain 'iid'")
            return cls("iid")
        if not arg:
            example = "dirichlet:0.5" if kind == "dirichlet" else "shard:2"
            raise ConfigError(f"partition {kind!r} needs an argument, got {text!r}: e.g. {example}")
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(f"partition {text!r}: {arg!r} is not a number") from None
        if kind == "dirichlet" and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"partition {text!r}: the Dirichlet alpha must be > 0 (smaller = more skewed), got {arg}")
        if kind == "shard" and (value < 1 or value != int(value)):
            raise ConfigError(f"partition {text!r}: shards per client must be a whole number >= 1, got {arg}")
        return cls(kind, value)

    def __str__(self) -> str:
        if self.param is None:
            return self.kind
        value = int(self.param) if self.kind == "shard" else self.param
        return f"{self.kind}:{value:g}"
