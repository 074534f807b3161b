"""The run's privacy report (``privacy.json``): each client's record-level spend and the run's client-level one.

:class:`~fedshield.server.run_writer.RunWriter` writes it after every round. Every epsilon in ``privacy.json`` sits beside the mechanism parameters that produce it; :func:`recompute_epsilon`
is what a reader would run to check it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as P
from ..config import RunConfig
from ..protocol import RoundSettings
from ..privacy.accounting import compact_history, known_epsilon
from ..privacy.mechanisms import SKELLAM_ACCOUNTANT, history_epsilon, history_steps
from ..privacy.client_level_mechanism import accounting_sample_rate, client_level_epsilon
from ..strategies.outcomes import ReleaseEvent
from .report_text import client_adjacency, client_statement, client_trust, noise_statement, randomness

__all__ = ["ClientPrivacy", "PrivacyReport", "recompute_epsilon", "recompute_client_epsilon"]

PRIVACY_FORMAT = "fedshield-privacy/1"
#: A simulated client tags its error replies with its name, so a refusal is attributed to the right client.
_CLIENT_TAG = re.compile(r"\[client-(\d+)\]")


@dataclass
class ClientPrivacy:
    """What the server knows of one client's record-level spend in this run."""

    name: str
    node_id: int
    partition_id: int | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    reported_epsilon: float | None = None
    reported_steps: int | None = None
    stopped_on_budget: bool = False
    stopped_round: int | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: DP rounds charged although the reply failed (aborted SecAgg+ round, timeout, rejected update): the site
    #: charged its ledger before training, so the report counts them too and never falls below the ledger.
    charged_unconfirmed: list[int] = field(default_factory=list)


class PrivacyReport:
    """Per-client record-level accounting, driven by the mechanism the server itself prescribed each round."""

    def __init__(self, config: RunConfig, noise_multiplier: float, *, client_noise_multiplier: float | None = None) -> None:
        self.config = config
        self.noise_multiplier = noise_multiplier
        self.client_noise_multiplier = client_noise_multiplier
        self.clients: dict[str, ClientPrivacy] = {}
        self._names: dict[int, str] = {}
        #: Client-level releases: one entry per round whose aggregate was released.
        self.client_releases: list[dict[str, Any]] = []
        self.accountant = config.accountant  # the record-level history's accountant (Skellam's in distributed mode)
        self.distributed: tuple[Any, int] | None = None
        self.last_settings: RoundSettings | None = None
        # A client's entries in privacy.json and in the checkpoint change only when a round touches it (_client):
        # built again then, reused otherwise, so a round costs O(clients it touched), not O(every client's history).
        self._revisions: dict[str, int] = {}
        self._json_cache: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._state_cache: dict[str, tuple[tuple[int, int], str]] = {}
        self._shown_releases: list[dict[str, Any]] = []
        self._level_history: tuple[int, tuple[tuple[float, float, int], ...]] = (0, ())

    def record_client_level(self, server_round: int, event: ReleaseEvent | None) -> None:
        """Charge one round's client-level release (``None``: nothing was released this round, nothing spent)."""
        if event is None or self.config.client_dp == "off":
            return
        self.client_releases.append({
            "round": server_round, "noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate,
            "included_clients": event.included_clients, "expected_clients": event.expected_clients,
            "clipped_updates": event.clipped,
        })

    def client_level_state(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.client_releases]

    def load_client_level(self, state: list[dict[str, Any]] | None) -> None:
        self.client_releases = [dict(r) for r in state or []]
        self._shown_releases.clear()
        self._level_history = (0, ())

    def _public_releases(self) -> list[dict[str, Any]]:
        """Per-round releases as privacy.json shows them: under Poisson sampling the number of participants is
        part of what the accounting hides, so it is left out (the checkpoint keeps it). Releases are only ever
        appended: each one's entry is built once and handed over as the same object (render_privacy_json)."""
        hidden = ("included_clients", "clipped_updates") if self.config.client_sampling == "poisson" else ()
        shown = self._shown_releases
        if len(shown) > len(self.client_releases):
            del shown[:]
        shown.extend({k: v for k, v in r.items() if k not in hidden} for r in self.client_releases[len(shown):])
        return list(shown)

    def client_level_history(self) -> list[tuple[float, float, int]]:
        """The releases as ``[(z, q, count)]``; folded in as they come (compacting is associative), not again."""
        folded, compact = self._level_history
        if folded > len(self.client_releases):
            folded, compact = 0, ()
        compact = compact_history([*compact, *((r["noise_multiplier"], r["sample_rate"], 1)
                                               for r in self.client_releases[folded:])])
        self._level_history = (len(self.client_releases), compact)
        return list(compact)

    def client_level_json(self, *, wait: bool = True) -> dict[str, Any]:
        """The run's client-level guarantee with every parameter needed to recompute it.

        ``wait=False`` (a report written while the run goes on): an epsilon not computed yet is written as pending
        (``epsilon`` null, ``epsilon_pending`` true) beside its history, and the run does not wait for the
        accountant (its cost grows with the releases: ~1 s at 30 rounds of z 0.3, more than a round of a small
        model). The report at the end of the run always waits: it has the epsilon.
        """
        c = self.config
        if c.client_dp == "off":
            return {"enabled": False, "mode": "off", "epsilon": None,
                    "statement": "NO client-level DP: whether a client took part is not protected (--client-dp off)"}
        history = self.client_level_history()
        if wait:
            eps: float | None = client_level_epsilon(history, delta=c.delta, accountant=c.accountant)
        else:
            eps = known_epsilon(history, delta=c.delta, accountant=c.accountant)
        return self._client_level_section(history, eps)

    def _client_level_section(self, history: list[tuple[float, float, int]], eps: float | None) -> dict[str, Any]:
        c = self.config
        q = accounting_sample_rate(sampling=c.client_sampling, fraction=c.fraction_train)
        return {
            "enabled": True,
            "mode": c.client_dp,
            "mechanism": "Gaussian noise on the sum of client updates clipped to L2 norm clip_norm (DP-FedAvg)",
            "noise_multiplier": self.client_noise_multiplier,
            "clip_norm": c.client_clip_norm,
            "noise_std_on_sum": None if self.client_noise_multiplier is None else self.client_noise_multiplier * float(c.client_clip_norm or 0),
            "sampling": c.client_sampling,
            "sample_rate": q,
            "fraction_train": c.fraction_train,
            "num_clients": c.num_clients,
            "expected_clients": c.fraction_train * c.num_clients if c.client_sampling == "poisson" else c.expected_train_clients,
            "accountant": c.accountant,
            "delta": c.delta,
            "target_epsilon": c.client_epsilon,
            "planned_rounds": c.num_rounds,
            "adjacency": client_adjacency(c.client_sampling),
            "rounds_released": len(self.client_releases),
            "history": [list(h) for h in history],
            "releases": self._public_releases(),
            "epsilon": None if eps is None else _finite(eps),
            "epsilon_pending": eps is None,
            "dropouts": ("distributed: a round with m of n expected noise shares is accounted at z*sqrt(m/n) "
                         "(conservative, no server top-up)" if c.client_dp == "distributed"
                         else "central: the server adds the full noise every round"),
            "trust": client_trust(c.client_dp, c.secagg),
            "statement": client_statement(eps, c.delta, client_adjacency(c.client_sampling)),
        }

    def use_distributed(self, terms: Any, dim: int) -> None:
        """``--dp-mode distributed``: histories hold Skellam entries (:mod:`fedshield.server.distributed`)."""
        self.distributed, self.accountant = (terms, dim), SKELLAM_ACCOUNTANT

    def _entry(self, settings: RoundSettings, history: list[Any]) -> list[Any]:
        if self.distributed is None:
            return list(compact_history([*history, (settings.noise_multiplier, settings.sample_rate, settings.steps_per_round)]))
        from .distributed import skellam_entry

        return [*history, skellam_entry(settings, self.distributed[1])]

    def _distributed_json(self, settings: RoundSettings) -> dict[str, Any] | None:
        if self.distributed is None:
            return None
        from .distributed import mechanism_json

        return mechanism_json(settings, self.distributed[1], self.distributed[0])

    def record_round(self, settings: RoundSettings, replies: list[P.ClientReply]) -> None:
        self.last_settings = settings
        for reply in replies:
            client = self._client(reply)
            refused = bool(reply.error) and any(r in str(reply.error) for r in P.UNCHARGED_REFUSALS)
            if settings.dp and not refused:
                # Charged for every reply that is not a refusal sent before charging: an aborted SecAgg+ round, a
                # rejected update or a timeout may hide a round the site trained (and charged) all the same.
                client.history = self._entry(settings, client.history)
                if not reply.ok:
                    client.charged_unconfirmed.append(settings.server_round)
                if P.EPSILON in reply.metrics:
                    client.reported_epsilon = reply.metrics[P.EPSILON]
                    client.reported_steps = int(reply.metrics.get(P.STEPS, 0))
            if reply.ok:
                client.rounds_trained.append(settings.server_round)
            elif reply.error and P.BUDGET_REFUSAL in reply.error:
                if not client.stopped_on_budget:
                    client.stopped_on_budget, client.stopped_round = True, settings.server_round
            else:
                client.failures.append({"round": settings.server_round, "reason": str(reply.error)[:500]})

    def _client(self, reply: P.ClientReply) -> ClientPrivacy:
        """Clients are keyed by a stable name: ``client-<partition id>`` in simulation (node ids change when a run
        is resumed), else ``node-<node id>``."""
        pid = reply.metrics.get(P.PARTITION_ID)
        if pid is None and reply.error:
            match = _CLIENT_TAG.search(reply.error)
            pid = int(match.group(1)) if match else None
        if pid is not None:
            name = f"client-{int(pid)}"
            self._names[reply.node_id] = name
        else:
            name = self._names.get(reply.node_id, f"node-{reply.node_id}")
        if name not in self.clients:
            self.clients[name] = ClientPrivacy(name, reply.node_id, None if pid is None else int(pid))
        client = self.clients[name]
        client.node_id = reply.node_id
        self._revisions[name] = self._revisions.get(name, 0) + 1
        return client

    def to_state(self) -> list[dict[str, Any]]:
        """Every client's fields as plain JSON values (what ``dataclasses.asdict`` gives)."""
        return [json.loads(line) for line in self.state_lines()]

    def state_lines(self) -> list[str]:
        """:meth:`to_state`, one JSON text per client, encoded again only for the clients a round touched."""
        lines = []
        for c in self.clients.values():
            revision = (id(c), self._revisions.get(c.name, 0))
            cached = self._state_cache.get(c.name)
            if cached is None or cached[0] != revision:
                cached = (revision, json.dumps(
                    {"name": c.name, "node_id": c.node_id, "partition_id": c.partition_id,
                     "history": [list(h) for h in c.history], "rounds_trained": c.rounds_trained,
                     "reported_epsilon": c.reported_epsilon, "reported_steps": c.reported_steps,
                     "stopped_on_budget": c.stopped_on_budget, "stopped_round": c.stopped_round,
                     "failures": c.failures, "charged_unconfirmed": c.charged_unconfirmed},
                    sort_keys=True, allow_nan=False))
                self._state_cache[c.name] = cached
            lines.append(cached[1])
        return lines

    def load_state(self, state: list[dict[str, Any]]) -> None:
        for raw in state:
            client = ClientPrivacy(**{**raw, "history": [tuple(h) for h in raw["history"]]})
            self.clients[client.name] = client
            self._revisions[client.name] = self._revisions.get(client.name, 0) + 1

    def client_epsilon(self, client: ClientPrivacy) -> float:
        if not self.config.dp:
            return math.inf
        run_eps = history_epsilon(client.history, delta=self.config.delta, accountant=self.accountant)
        # A client's own ledger may hold spend from earlier runs: report whichever is larger.
        return max(run_eps, client.reported_epsilon or 0.0)

    def max_epsilon(self) -> float:
        values = [self.client_epsilon(c) for c in self.clients.values()]
        return max(values) if values else 0.0

    def _client_json(self, client: ClientPrivacy) -> dict[str, Any]:
        """The client's entry of privacy.json: the same object until a round touches the client (callers must not
        change it; :func:`~fedshield.server.run_writer.render_privacy_json` reuses its text while it is the same)."""
        c = self.config
        key = (id(client), self._revisions.get(client.name, 0), self.accountant, self.noise_multiplier)
        cached = self._json_cache.get(client.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        eps = self.client_epsilon(client)
        from_ledger = self.config.dp and (client.reported_epsilon or 0.0) > history_epsilon(
            client.history, delta=self.config.delta, accountant=self.accountant)
        entry = {
            "node_id": client.node_id,
            "partition_id": client.partition_id,
            "epsilon": _finite(eps),
            # "history": epsilon is recompute_epsilon(entry), from the history below. "ledger": the client's
            # own ledger (earlier runs, or a round re-run after a crash) holds more; recompute it from the
            # site's privacy-ledger.json.
            "epsilon_source": "ledger" if from_ledger else "history",
            "delta": c.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier if c.dp else None,
            "sample_rate": c.sample_rate,
            "steps": history_steps(client.history),
            "history": [list(h) for h in client.history],
            "rounds_trained": len(client.rounds_trained),
            "trained_in_rounds": list(client.rounds_trained),
            "ledger_epsilon": client.reported_epsilon,
            "ledger_steps": client.reported_steps,
            "stopped_on_budget": client.stopped_on_budget,
            "stopped_round": client.stopped_round,
            "failures": [dict(f) for f in client.failures],
            "charged_unconfirmed": list(client.charged_unconfirmed),
            "noise": noise_statement(client),
        }
        self._json_cache[client.name] = (key, entry)
        return entry

    def to_json(self, *, final: bool = True) -> dict[str, Any]:
        """The whole report; ``final=False`` while the run goes on (see :meth:`client_level_json`)."""
        c = self.config
        clients = {}
        for client in sorted(self.clients.values(), key=lambda x: (x.partition_id is None, x.partition_id or 0, x.node_id)):
            clients[client.name] = self._client_json(client)
        overall = self.max_epsilon()
        return {
            "format": PRIVACY_FORMAT,
            "dp": c.dp,
            "level": "record",
            "mechanism": {
                "name": "DP-SGD (Poisson-sampled Gaussian, Opacus)" if c.dp else "none",
                "accountant": c.accountant,
                "delta": c.delta,
                "noise_multiplier": self.noise_multiplier if c.dp else None,
                "max_grad_norm": c.max_grad_norm if c.dp else None,
                "sample_rate": c.sample_rate,
                "steps_per_round": c.steps_per_round,
                "planned_rounds": c.num_rounds,
                "target_epsilon": c.epsilon,
            },
            "guarantee": {
                "level": "record",
                "adjacency": RECORD_ADJACENCY if c.dp else None,
                "epsilon": _finite(overall),
                "delta": c.delta if c.dp else None,
                "statement": (
                    f"each client's records are ({overall:.4g}, {c.delta:g})-DP under add/remove of one record, "
                    "with respect to everything that client sent (max over clients)"
                    if c.dp else "NO differential privacy: trained with --no-dp"
                ),
            },
            "in_clear": IN_CLEAR if c.dp else "--no-dp: train replies also carry the exact record count and loss",
            "randomness": randomness(self.clients.values()),
            "clients": clients,
            "client_level": self.client_level_json(wait=final),
            "distributed": None if self.last_settings is None else self._distributed_json(self.last_settings),
        }


#: The neighbouring data sets record-level epsilon is proven for: Opacus' PRV accountant of the Poisson-subsampled
#: Gaussian is tight for add/remove; a train reply carries no exact record count (public weight 1), so nothing in
#: clear tells the two neighbours apart.
RECORD_ADJACENCY = "add/remove one record of one site"

#: What a site sends in clear besides its noised update (docs/PRIVACY.md, "What leaves a site in clear").
IN_CLEAR = {
    "train_reply": [f"{P.NUM_EXAMPLES} (the public constant {P.PUBLIC_WEIGHT:g}, not the record count)",
                    f"{P.EPSILON}, {P.STEPS}, {P.ROUNDS_TRAINED} (ledger figures: public parameters and participation)",
                    f"{P.DELTA} (the delta the site's own ledger accounts at: its policy)",
                    "success, or the reason of a refusal or failure",
                    f"{P.RECEIVED_EXAMPLES}, {P.RECEIVED_LOSS}, {P.RECEIVED_ACCURACY} (federated evaluation folded "
                    "into the train message: the evaluate reply's figures of the model the message carried, NOT "
                    "covered by epsilon)"],
    "evaluate_reply": [f"{P.NUM_EXAMPLES} (the exact size of the site's test split)",
                       f"{P.EVAL_LOSS} and {P.EVAL_ACCURACY} of the global model on it: NOT covered by epsilon"],
}


def recompute_client_epsilon(section: dict[str, Any]) -> float:
    """Recompute the run's client-level epsilon from the ``client_level`` section of ``privacy.json``."""
    return client_level_epsilon([tuple(h) for h in section["history"]], delta=section["delta"],
                                accountant=section["accountant"])


def recompute_epsilon(entry: dict[str, Any]) -> float:
    """Recompute a client's epsilon for this run from the parameters written beside it in ``privacy.json``.

    Equals ``entry["epsilon"]`` when ``entry["epsilon_source"]`` is ``"history"``; when it is ``"ledger"`` the
    client's own ledger holds more (earlier runs, or an interrupted round charged twice) and ``epsilon`` is that
    ledger's figure, recomputable from the site's ``privacy-ledger.json``.
    """
    return history_epsilon([tuple(h) for h in entry["history"]], delta=entry["delta"], accountant=entry["accountant"])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
