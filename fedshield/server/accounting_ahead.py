"""Accounting ahead of need: while round r + 1 trains, compute the epsilons its report will print.

Why: the report after every round prints each client's record-level epsilon and the run's client-level epsilon
over the whole history, and the PRV accountant's cost grows with the history (0.1 s at 10 rounds, 0.6 s at 20,
1 s at 30 for z 0.3 on a quiet core; its mesh gets finer and its domain wider with every round). The histories
round r + 1 can produce are known after round r: each one present now, plus one more round of the planned
mechanism. They are handed to :func:`~fedshield.privacy.accounting.prefetch_epsilon`, which computes them on a
background thread while the clients train; the report then finds them done. The figures are the same numbers,
from the same function on the same histories: a history the plan did not foresee (a distributed round with
dropouts, a run whose z differs) is simply computed when the report asks, as before.

The client-level epsilon is the one exception to "the report waits": while the run goes on, a report that does
not find it computed writes it as pending (``null``, beside its history), because a round of a small model takes
less time than the accountant; the planned run's epsilon is computed in the background from round 1
(:func:`prefetch_planned_horizon`) so the final report finds it done.
"""

from __future__ import annotations

from ..privacy.accounting import compact_history, prefetch_epsilon
from ..privacy.client_level_mechanism import accounting_sample_rate
from .plan import RunPlan, round_settings
from .report import PrivacyReport

__all__ = ["next_round_histories", "prefetch_next_round", "prefetch_planned_horizon"]

History = list[tuple[float, float, int]]


def next_round_histories(report: PrivacyReport, plan: RunPlan, next_round: int) -> list[History]:
    """The record-level histories that round ``next_round`` can end with: every distinct client history so far (and
    a client's first round) plus one round of the planned DP-SGD, fewest steps first (the likeliest); none without
    DP or in distributed mode (Skellam). (The client-level one is not needed before the end: reports in between say
    "pending".)
    """
    c = plan.config
    if not c.dp or report.distributed is not None:
        return []
    s = round_settings(plan, next_round)
    step = (s.noise_multiplier, s.sample_rate, s.steps_per_round)
    distinct = {tuple(tuple(h) for h in cl.history) for cl in report.clients.values()} | {()}
    return sorted((list(compact_history([*h, step])) for h in distinct), key=lambda h: sum(n for *_, n in h))


def prefetch_next_round(report: PrivacyReport, plan: RunPlan, next_round: int) -> None:
    """Start computing round ``next_round``'s likely record-level epsilons in the background (nothing past the
    planned rounds)."""
    if next_round > plan.config.num_rounds:
        return
    record = next_round_histories(report, plan, next_round)
    if record:
        prefetch_epsilon(record, delta=plan.config.delta, accountant=report.accountant, needed_by=next_round)


def prefetch_planned_horizon(report: PrivacyReport, plan: RunPlan, first_round: int) -> None:
    """Queue the client-level epsilon of the whole planned run, right behind round ``first_round``'s.

    Why only that one: a client-level history is ``[(z, q, releases)]`` whichever rounds released, so the planned
    run's is known before round 1, and it is the one the final report must have (the reports in between may say
    "pending", :meth:`~fedshield.server.report.PrivacyReport.client_level_json`). Computing it while the run trains
    means the end of the run finds it done. Every other planned count is left out: PRV's cost grows with the count
    (about 1 s at 30 rounds of z 0.3), and computing each in turn kept a core busy for the whole run.
    """
    c = plan.config
    if c.client_dp == "off" or plan.client_noise_multiplier is None or first_round > c.num_rounds:
        return
    q = accounting_sample_rate(sampling=c.client_sampling, fraction=c.fraction_train)
    releases = c.num_rounds - first_round + 1
    history = list(compact_history([*report.client_level_history(), (plan.client_noise_multiplier, q, releases)]))
    prefetch_epsilon([history], delta=c.delta, accountant=c.accountant, needed_by=first_round)
