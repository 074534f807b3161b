"""A deployed site's own privacy policy: the site decides, the server only proposes.

The server's round config names the task, the mechanism (DP on or off, sigma, delta, accountant) and the budget it
plans for; a hostile or misconfigured coordinator can send anything there. A site started with ``fedshield client``
therefore carries its own policy in its node config and checks every request against it *before* anything the
server named is imported or any record is touched:

* ``task``: only the site's own task (``--task``) runs; any other name is refused before it is imported.
* ``dp``: DP-SGD is required unless the operator passed ``--allow-no-dp``.
* ``noise-multiplier``: at least :data:`MIN_NOISE_MULTIPLIER` (below it no budget survives a round, and the
  accountant needs seconds just to say so).
* ``accountant``: the site accounts with its own accountant; a round planned with another one is refused.
* ``delta``: the round's delta may not exceed the site's ceiling (default 1e-5, or the largest power of ten below 1/records);
  the ledger is always kept at the site's own delta.

A refusal raises :class:`PolicyRefused`; its reason starts with ``fedshield:policy-refused: <rule>:`` and goes to
the server as an error reply. The ledger is not opened, so a policy refusal leaves it untouched. The lifetime budget
(``--max-epsilon``) is then enforced by the ledger itself, at the site's delta and accountant, before training: an
over-budget round is refused as ``fedshield:budget-exhausted`` (and recorded in the ledger's ``refused`` list).

Simulated clients (no ``data-path`` in the node config) have no site policy: the simulation runs the operator's
own code on the operator's own data.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ACCOUNTANTS
from ..errors import ConfigError
from ..privacy.ledger import PrivacyLedger
from ..protocol import MIN_HONEST, POLICY_REFUSAL, POLICY_REFUSED_CODE
from .node_config import ACCOUNTANT, ALLOW_NO_DP, BUDGET, DATA_PATH, DELTA, TASK

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_MAX_EPSILON",
    "MIN_NOISE_MULTIPLIER",
    "POLICY_REFUSAL",
    "POLICY_REFUSED_CODE",
    "PolicyRefused",
    "SitePolicy",
    "check_ledger_terms",
    "check_request",
    "default_delta",
    "ledger_terms",
    "load_policy_file",
    "policy_from_node_config",
]

#: A deployed site's lifetime budget when its operator gives none (``--max-epsilon``).
DEFAULT_MAX_EPSILON = 10.0
DEFAULT_DELTA = 1e-5
#: Below this a single DP-SGD round already costs epsilon in the tens or more at any usual sampling rate.
MIN_NOISE_MULTIPLIER = 0.3

_POLICY_KEYS = ("max-epsilon", "delta", "accountant", "allow-no-dp", "allow-plain-updates", "task")


class PolicyRefused(Exception):
    """The site's policy forbids this request; ``reason`` goes back to the server as an error reply."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.reason = f"{POLICY_REFUSAL}: {rule}: {detail}"
        super().__init__(self.reason)


@dataclass(frozen=True)
class SitePolicy:
    """What this site accepts, whatever the server asks for."""

    task: str
    max_epsilon: float = DEFAULT_MAX_EPSILON
    delta: float = DEFAULT_DELTA
    accountant: str = "prv"
    allow_no_dp: bool = False
    min_honest: int = 0  # distributed DP: the most sites this site relies on to add their noise share (0: any)

    def __post_init__(self) -> None:
        if not self.task:
            raise ConfigError("the site policy needs the site's own task (fedshield client --task NAME)")
        if not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise ConfigError(f"--max-epsilon must be a finite number > 0, got {self.max_epsilon}: e.g. --max-epsilon 10")
        if not (0 < self.delta < 1):
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta}: e.g. --delta 1e-5")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"--accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")

    def to_node_config(self) -> dict[str, str | float | bool]:
        return {TASK: self.task, BUDGET: float(self.max_epsilon), DELTA: float(self.delta),
                ACCOUNTANT: self.accountant, ALLOW_NO_DP: bool(self.allow_no_dp), MIN_HONEST: int(self.min_honest)}


def default_delta(records: int) -> float:
    """The smaller of 1e-5 and the largest power of ten strictly below 1/records.

    Why: delta must stay below the chance of picking any one record; a power of ten rather than 1/records itself
    because the delta travels in clear beside the site's epsilon (metric ``delta``) and must not tell the server
    the exact record count, only its order of magnitude, and only for sites of more than 100,000 records.
    """
    return min(DEFAULT_DELTA, 10.0 ** -(math.floor(math.log10(max(1, records))) + 1))


def load_policy_file(path: Path) -> dict[str, Any]:
    """The settings of a site policy TOML (kebab-case keys as the flags; flags given on the command line win)."""
    try:
        with Path(path).open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read the site policy {path} ({err.strerror}): fix the path given to --policy") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"the site policy {path} is not valid TOML ({err}): fix the file") from None
    unknown = sorted(set(raw) - set(_POLICY_KEYS))
    if unknown:
        raise ConfigError(f"the site policy {path} has unknown keys {unknown}; known: {list(_POLICY_KEYS)}")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def policy_from_node_config(node_config: Mapping[str, Any]) -> SitePolicy | None:
    """The deployed site's policy from its node config; None for a simulated client (no ``data-path``)."""
    if not str(node_config.get(DATA_PATH, "") or ""):
        return None
    task = str(node_config.get(TASK, "") or "")
    if not task:
        raise ConfigError(f"this site's node config has no {TASK!r}: start the site with `fedshield client --task NAME`")
    budget = float(node_config.get(BUDGET, 0.0) or 0.0)
    return SitePolicy(
        task=task,
        max_epsilon=budget if budget > 0 else DEFAULT_MAX_EPSILON,
        delta=float(node_config.get(DELTA, DEFAULT_DELTA) or DEFAULT_DELTA),
        accountant=str(node_config.get(ACCOUNTANT, "prv") or "prv"),
        allow_no_dp=_true(node_config.get(ALLOW_NO_DP, False)),
        min_honest=_whole(node_config.get(MIN_HONEST, 0) or 0),
    )


def check_request(policy: SitePolicy | None, config: Mapping[str, Any], *, train: bool) -> None:
    """Refuse a round the site's policy forbids; reads the raw round config, imports nothing the server named."""
    if policy is None:
        return
    task = str(config.get("task", ""))
    if task != policy.task:
        raise PolicyRefused("task", f"the server asked for task {task!r}, but this site runs only its own task "
                            f"{policy.task!r} (fedshield client --task); run the server with --task {policy.task}")
    if not train:
        return
    if not _true(config.get("dp", False)):
        if policy.allow_no_dp:
            return
        raise PolicyRefused("dp", "the server asked for training without DP-SGD (dp=false); this site trains only "
                            "with DP. Run the server with DP, or restart this site with --allow-no-dp")
    sigma = _number(config.get("noise-multiplier"))
    if not sigma >= MIN_NOISE_MULTIPLIER:
        raise PolicyRefused("noise-multiplier", f"noise multiplier {config.get('noise-multiplier')!r} is below this "
                            f"site's floor of {MIN_NOISE_MULTIPLIER}; ask the server for more noise")
    _check_min_honest(policy, config)
    accountant = str(config.get("accountant", ""))
    if accountant != policy.accountant:
        raise PolicyRefused("accountant", f"the server plans with accountant {accountant!r}; this site accounts with "
                            f"{policy.accountant!r}. Run the server with --accountant {policy.accountant}")
    delta = _number(config.get("delta"))
    if not (0 < delta <= policy.delta * (1 + 1e-12)):
        raise PolicyRefused("delta", f"the server asked for delta {config.get('delta')!r}, above this site's "
                            f"ceiling {policy.delta:g}; run the server with --delta {policy.delta:g} or less")


def _check_min_honest(policy: SitePolicy, config: Mapping[str, Any]) -> None:
    """A distributed round sizes each site's noise share as total / ``min-honest``: the more sites it assumes add
    their share, the less noise this site's own update carries if they do not (a server colluding with other
    sites). A round assuming more honest sites than this site relies on is refused; fewer only costs accuracy."""
    if str(config.get("dp-mode", "local")) != "distributed" or not policy.min_honest:
        return
    asked = _number(config.get(MIN_HONEST, 0))
    if not asked <= policy.min_honest:
        raise PolicyRefused(MIN_HONEST, f"the round assumes {config.get(MIN_HONEST)!r} sites add their noise share "
                            f"(each adds 1/{config.get(MIN_HONEST)!r} of the noise); this site relies on at most "
                            f"{policy.min_honest}. Run the server with --min-honest {policy.min_honest} or less")


def ledger_terms(policy: SitePolicy | None, *, accountant: str, delta: float, target_epsilon: float,
                 site_budget: float | None) -> tuple[str, float, float | None]:
    """(accountant, delta, budget) the ledger is charged with: the site's own when it has a policy.

    The server's target epsilon may only tighten the site's budget, never loosen it.
    """
    caps = [b for b in (site_budget, target_epsilon or None) if b is not None]
    if policy is None:
        return accountant, delta, (min(caps) if caps else None)
    return policy.accountant, policy.delta, min([policy.max_epsilon, *caps])


def check_ledger_terms(ledger: PrivacyLedger | None, policy: SitePolicy, path: Path) -> None:
    """A ledger kept at another delta or accountant cannot be continued: say so at start, not at the first round."""
    if ledger is None or (ledger.accountant == policy.accountant and math.isclose(ledger.delta, policy.delta)):
        return
    raise ConfigError(
        f"this site's ledger {path} accounts with {ledger.accountant} at delta {ledger.delta:g}, but its policy "
        f"says {policy.accountant} at delta {policy.delta:g}: pass --accountant {ledger.accountant} --delta "
        f"{ledger.delta:g}, or use a new --state directory for a new data set"
    )


def _true(value: object) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _whole(value: object) -> int:
    n = _number(value)
    if not (n >= 0 and n == int(n)):
        raise ConfigError(f"the site's min-honest must be a whole count >= 0, got {value!r}: fedshield client "
                          "--min-honest N")
    return int(n)


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan
