"""How the suite is spread over pytest-xdist workers (``-n auto --dist loadgroup``: ``conftest.WORKERS``, see
``pyproject.toml``).

Much of the suite's wall time is waiting (a SuperNode polling, a ``flwr-clientapp`` process importing torch, Ray
starting), so two workers on two cores finish well before one. These rules make that safe and fast:

* **Tests that share an expensive module-scoped fixture run on one worker** (one ``xdist_group`` per module), or
  each worker would start its own federation or simulation batch. Cheap module fixtures (a key set, data files)
  do not pin a test: a second copy costs a second.
* **At most ``RAY_LANES`` Ray sessions at once.** Several Ray starts on two busy cores time out ("The current node
  timed out during startup"; measured here under load), so every test that starts Ray (listed in ``RAY_TESTS``, or marked
  ``@pytest.mark.ray``) goes to one of ``RAY_LANES`` lanes, each one ``xdist_group`` (one worker); the lanes are
  balanced by expected seconds. The other workers run the real-process and unit tests meanwhile.
* **Longest work first** (LPT scheduling): xdist hands out work units in collection order, so the units are sorted
  by their expected seconds, the slowest first, and the short unit tests fill the gaps at the end. The seconds
  below are measured durations (quiet 2-core machine, serial run, 2026-12-03); a stale figure only costs wall time,
  never correctness. A test not listed counts as ``DEFAULT_S``.
"""

from __future__ import annotations

import pytest

__all__ = ["CHEAP_MODULE_FIXTURES", "RAY_LANES", "assign_groups", "group_of", "order_by_expected_time"]

#: Module-scoped fixtures cheap enough to build once per worker rather than pin their tests to one worker.
CHEAP_MODULE_FIXTURES = frozenset({"keys", "sites", "site_csv", "shared"})

DEFAULT_S = 1.0
#: One Ray session at a time: on two busy cores a second one made every simulation several times slower, Ray's
#: start time out ("The current node timed out during startup") and in-test deadlines fail (measured 2026-12-03).
RAY_LANES = 1

#: Node id prefixes of the tests that start Ray (Flower's simulation engine); a new one may say
#: ``@pytest.mark.ray`` instead of being listed here.
RAY_TESTS = (
    # Everything else simulates on the local backend (fedshield.simulation.local_backend), the product's default:
    # these three run Ray on purpose (the product's --backend ray, Flower's stock engine, `flwr run`).
    "tests/test_simulation_local.py", "tests/test_secagg_simulation.py", "tests/test_flwr_run.py",
)

#: ``node id prefix -> seconds`` (setup + call, serial run); the longest matching prefix wins.
EXPECTED_S: dict[str, float] = {
    "tests/test_reliability.py::test_b_": 161.0,
    "tests/test_reliability.py::test_c_": 60.0,
    "tests/test_reliability.py::test_e_": 5.0,
    "tests/test_deploy_e2e.py::test_cli_server": 137.0,
    "tests/test_deploy_e2e.py::test_a_": 120.0,
    "tests/test_deploy_e2e.py::test_ctrl_c": 20.0,
    "tests/test_secagg_malicious_server.py": 94.0,
    "tests/test_resume.py::test_killed": 86.0,  # its own 2 Ray starts (killed CLI, resume) + the reference's share
    "tests/test_hostile_server.py": 70.0,
    "tests/test_local_users.py::test_a_local_user": 43.0,
    "tests/test_local_users.py::test_sigkilled": 40.0,
    "tests/test_revocation.py::test_a_removed_key": 37.0,
    "tests/test_ledger_lock.py": 37.0,
    "tests/test_client_dp.py::test_client_level_dp_end_to_end": 17.0,
    "tests/test_user_task.py::test_user_task_trains": 16.0,
    "tests/test_in_clear.py": 2.0,
    "tests/test_simulation_local.py": 25.0,
    "tests/test_deploy_processes.py": 4.0,
    "tests/test_deploy_cli.py": 3.0,
    "tests/test_deploy_cli_client.py": 3.0,
    "tests/test_clientapp_zygote.py": 8.0,
    "tests/test_supernode_polling.py": 8.0,
    "tests/test_sim_dispatch.py": 3.0,
    "tests/test_ledger_crash.py": 5.0,
    "tests/test_benchmarks_smoke.py::test_benchmark_writes_json_rows": 15.0,
    "tests/test_benchmarks_smoke.py::test_run_all_writes": 10.0,
    # added with issues 12-15 (measured under a loaded run, 2026-12-03, divided by its ~3x slow-down)
    "tests/test_distributed_dp.py::test_distributed_simulation": 5.0,
    "tests/test_partial_model.py::test_frozen_user_task": 12.0,
    "tests/test_text_task.py::test_simulated_federation": 25.0,
    "tests/test_text_task.py::test_dp_sgd_on_minilm": 5.0,
    "tests/test_text_task.py::test_two_real_clients": 90.0,
    "tests/test_flwr_run.py": 45.0,
    "tests/test_utility_bench.py": 30.0,
    "tests/test_benchmarks_smoke.py::test_benchmark_writes_json_rows[large_models]": 25.0,
    "tests/test_zygote_stop_race.py": 15.0,
    "tests/test_pfl_peer_bench.py": 10.0,
    "tests/test_secagg_fold.py": 1.0,
}


#: ``module -> seconds`` for the whole group of a module's tests that share an expensive module fixture, where the
#: fixture's setup dominates (counted once, not per test).
#:
#: The modules that read ``tests/_sim_batch.py`` share one simulation per client count, which the first of them to
#: run pays for; their figures here (and above) are their runs' shares of it, so that the Ray lane's sum is right:
#: 3 clients ~140 s (15 runs), 4 clients ~57 s (14 runs), 5 clients ~47 s (11 runs). Measured serially (``-n 0``)
#: on 2026-12-03 at load average 20-25 (1,471 s for all of them and the resume test) and divided by ~4.5, the
#: same-machine slow-down of the tests measured both loaded and quiet; before the batches: ~483 s, 14 Ray starts.
GROUP_S: dict[str, float] = {
    "tests/test_simulation_e2e.py": 70.0,  # six runs; the 3-client batch's Ray start and actor warm-up counted here
    "tests/test_strategies.py": 40.0,  # eleven runs; the 4-client batch's start counted here
    "tests/test_malicious_sites.py": 27.0,  # four runs; the 5-client batch's start counted here
    "tests/test_robust_e2e.py": 20.0,  # seven runs
    "tests/test_secagg_simulation.py": 45.0,
    "tests/test_deploy_processes.py": 40.0,
    "tests/test_deploy_e2e.py": 130.0,
    "tests/test_quantize_outcomes.py": 2.0,  # two runs
}


def expected_seconds(nodeid: str) -> float:
    matches = [prefix for prefix in EXPECTED_S if nodeid.startswith(prefix)]
    return EXPECTED_S[max(matches, key=len)] if matches else DEFAULT_S


def group_of(item: pytest.Item) -> str | None:
    """The module's name if ``item`` uses one of its expensive module-scoped fixtures, else ``None`` (any worker)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for name in info.names_closure:
        defs = info.name2fixturedefs.get(name, ())
        if any(d.scope in ("module", "package", "class") for d in defs) and name not in CHEAP_MODULE_FIXTURES:
            return item.nodeid.split("::", 1)[0]
    return None


def batch_group(item: pytest.Item, group: str | None) -> str | None:
    """A test that reads its module's simulation batch (a module fixture of a module that registered runs) joins
    the batch's group: every module of one batch on one worker, so the batch runs once."""
    if group is None:
        return None
    from _sim_batch import batch_groups

    return batch_groups().get(item.path.name, group)


def uses_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("ray") is not None or item.nodeid.startswith(RAY_TESTS)


def assign_groups(items: list[pytest.Item]) -> list[str | None]:
    """Each item's ``xdist_group``: its Ray lane, else its shared simulation batch's group (``_sim_batch``), else its
    module's group (``group_of``), else ``None``."""
    module_groups = [group_of(item) for item in items]
    groups = [batch_group(item, group) for item, group in zip(items, module_groups, strict=True)]
    costs = item_costs(items, module_groups)
    ray_units: dict[str, float] = {}
    for item, group, cost in zip(items, groups, costs, strict=True):
        if uses_ray(item):
            ray_units[group or item.nodeid] = ray_units.get(group or item.nodeid, 0.0) + cost
    lane_of, load = {}, [0.0] * RAY_LANES
    for key in sorted(ray_units, key=lambda k: -ray_units[k]):  # longest first onto the lighter lane
        lane = load.index(min(load))
        lane_of[key], load[lane] = f"ray-{lane}", load[lane] + ray_units[key]
    return [lane_of.get(group or item.nodeid, group) if uses_ray(item) else group
            for item, group in zip(items, groups, strict=True)]


def item_costs(items: list[pytest.Item], groups: list[str | None]) -> list[float]:
    """Expected seconds of each item; a module group in ``GROUP_S`` shares its figure among its tests."""
    sizes: dict[str, int] = {}
    for group in groups:
        if group in GROUP_S:
            sizes[group] = sizes.get(group, 0) + 1
    return [GROUP_S[group] / sizes[group] if group in sizes else expected_seconds(item.nodeid)
            for item, group in zip(items, groups, strict=True)]


def order_by_expected_time(items: list[pytest.Item], groups: list[str | None]) -> list[pytest.Item]:
    """``items`` as work units (one per group, one per ungrouped test), the longest unit first; tests keep their
    collection order inside a unit. Deterministic, so every worker collects the same order, as xdist requires."""
    units: dict[str, list[pytest.Item]] = {}
    cost: dict[str, float] = {}
    for item, group, seconds in zip(items, groups, item_costs(items, [group_of(i) for i in items]), strict=True):
        units.setdefault(group or item.nodeid, []).append(item)
        cost[group or item.nodeid] = cost.get(group or item.nodeid, 0.0) + seconds
    ordered = sorted(units, key=lambda key: -cost[key])  # stable: equal costs keep collection order
    return [item for key in ordered for item in units[key]]
