"""Validated, frozen settings of a federated run: the only code that reads TOML files or Flower's config mappings.

* :mod:`.names`: the choices users may type (strategies, accountants, grad-sample modes, ...);
* :mod:`.checks`: range checks shared with the round settings;
* :mod:`.specs`: value types inside a run config (``PartitionSpec``, ``StrategyParams``);
* :mod:`.run`: :class:`RunConfig` and its reading from a mapping by dataclass fields;
* :mod:`.files`: ``--config FILE``.

The round settings the server sends each client (:class:`fedshield.protocol.RoundSettings`) are wire contract and
live in :mod:`fedshield.protocol`; ``from fedshield.config import RoundSettings`` keeps working.
"""

from __future__ import annotations

from typing import Any

from .checks import normalise_device_spec as normalise_device_spec
from .files import load_config_file as load_config_file
from .names import ACCOUNTANTS as ACCOUNTANTS
from .names import AMP_GRAD_SAMPLE_MODES as AMP_GRAD_SAMPLE_MODES
from .names import CLIENT_DP_MODES as CLIENT_DP_MODES
from .names import CLIENT_SAMPLING as CLIENT_SAMPLING
from .names import DISPATCH_LOOPS as DISPATCH_LOOPS
from .names import DP_MODES as DP_MODES
from .names import GRAD_SAMPLE_MODES as GRAD_SAMPLE_MODES
from .names import PARTITION_KINDS as PARTITION_KINDS
from .names import ROBUST_STRATEGIES as ROBUST_STRATEGIES
from .names import STRATEGIES as STRATEGIES
from .run import RunConfig as RunConfig
from .specs import PartitionSpec as PartitionSpec
from .specs import StrategyParams as StrategyParams

__all__ = [
    "ACCOUNTANTS", "AMP_GRAD_SAMPLE_MODES", "CLIENT_DP_MODES", "CLIENT_SAMPLING", "DISPATCH_LOOPS", "DP_MODES",
    "GRAD_SAMPLE_MODES",
    "PARTITION_KINDS", "ROBUST_STRATEGIES", "STRATEGIES", "PartitionSpec", "RoundSettings", "RunConfig",
    "StrategyParams", "load_config_file", "normalise_device_spec",
]


def __getattr__(name: str) -> Any:
    # RoundSettings lives in fedshield.protocol, which imports this package's checks: resolved on first use so
    # that importing either module first works.
    if name == "RoundSettings":
        from ..protocol import RoundSettings

        return RoundSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
