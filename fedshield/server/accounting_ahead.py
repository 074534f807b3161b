"""Accounting ahead of need: while round r + 1 trains, compute the epsilons its report will print.

Why: the report after every round prints each client's record-level epsilon and the run's client-level epsilon
over the whole history, and the PRV accountant's cost grows with the history (0.2 s at 10 rounds, 1.3 s at 20 for
z 0.3 on a quiet core; its mesh gets finer and its domain wider with every round). The histories round r + 1 can
produce are known after round r: each one present now, plus one more round of the planned mechanism. They are
handed to :func:`~fedshield.privacy.accounting.prefetch_epsilon`, which computes them on a background thread
while the clients train; the report then finds them done. The figures are the same numbers, from the same
function on the same histories: a history the plan did not foresee (a distributed round with dropouts, a run
whose z differs) is simply computed when the report asks, as before.
"""

from __future__ import annotations

from ..privacy.accounting import compact_history, prefetch_epsilon
from ..privacy.client_level_mechanism import accounting_sample_rate
from .plan import RunPlan, round_settings
from .report import PrivacyReport

__all__ = ["next_round_histories", "prefetch_next_round", "prefetch_planned_horizon"]

History = list[tuple[float, float, int]]


def next_round_histories(report: PrivacyReport, plan: RunPlan, next_round: int) -> tuple[History, list[History]]:
    """``(client-level history, record-level histories)`` that round ``next_round`` can end with.

    Client-level: the history so far plus one release of the planned z (empty if client-level DP is off).
    Record-level (local mode): every distinct client history so far (and a client's first round) plus one round of
    the planned DP-SGD, fewest steps first (the likeliest); none without DP or in distributed mode (Skellam).
    """
    c = plan.config
    client: History = []
    if c.client_dp != "off" and plan.client_noise_multiplier is not None:
        q = accounting_sample_rate(sampling=c.client_sampling, fraction=c.fraction_train)
        client = list(compact_history([*report.client_level_history(), (plan.client_noise_multiplier, q, 1)]))
    record: list[History] = []
    if c.dp and report.distributed is None:
        s = round_settings(plan, next_round)
        step = (s.noise_multiplier, s.sample_rate, s.steps_per_round)
        distinct = {tuple(tuple(h) for h in cl.history) for cl in report.clients.values()} | {()}
        record = sorted((list(compact_history([*h, step])) for h in distinct), key=lambda h: sum(n for *_, n in h))
    return client, record


def prefetch_next_round(report: PrivacyReport, plan: RunPlan, next_round: int) -> None:
    """Start computing round ``next_round``'s likely epsilons in the background (nothing past the planned rounds)."""
    if next_round > plan.config.num_rounds:
        return
    client, record = next_round_histories(report, plan, next_round)
    c = plan.config
    if client:
        prefetch_epsilon([client], delta=c.delta, accountant=c.accountant, needed_by=next_round)
    if record:
        prefetch_epsilon(record, delta=c.delta, accountant=report.accountant, needed_by=next_round)


def prefetch_planned_horizon(report: PrivacyReport, plan: RunPlan, first_round: int) -> None:
    """Queue the client-level epsilons of every planned round from ``first_round`` on, each behind the rounds before.

    Why all of them: a client-level history is ``[(z, q, releases)]`` whichever rounds released, so each planned
    count is needed (the old report computed exactly these, one a round), and the first round (the simulation
    engine's start, imports) gives the thread a head start. Record-level histories depend on who is sampled and
    are queued one round ahead by :func:`prefetch_next_round` instead.
    """
    c = plan.config
    if c.client_dp == "off" or plan.client_noise_multiplier is None:
        return
    q = accounting_sample_rate(sampling=c.client_sampling, fraction=c.fraction_train)
    history = report.client_level_history()
    for r in range(first_round, c.num_rounds + 1):
        history = list(compact_history([*history, (plan.client_noise_multiplier, q, 1)]))
        prefetch_epsilon([history], delta=c.delta, accountant=c.accountant, needed_by=r)
