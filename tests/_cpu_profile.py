"""CPU seconds per test (this process plus every child it reaped), for sizing the suite against its 2 cores.

Wall time on a shared machine says little; CPU time hardly depends on load. With ``FEDSHIELD_TEST_CPU_LOG=FILE``
each test appends ``{"nodeid", "cpu_s", "wall_s", "end", "worker"}`` to FILE (one line per test, every xdist worker appending);
``python tests/_cpu_profile.py FILE`` prints the totals and the heaviest tests. Off by default.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator

import pytest

LOG_ENV = "FEDSHIELD_TEST_CPU_LOG"


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    path = os.environ.get(LOG_ENV)
    if not path:
        return (yield)
    cpu, wall = _cpu(), time.monotonic()
    try:
        return (yield)
    finally:
        row = {"nodeid": item.nodeid, "cpu_s": round(_cpu() - cpu, 2), "wall_s": round(time.monotonic() - wall, 2),
               "end": round(time.time(), 2), "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def main(path: str, top: int = 30) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    cpu, wall = sum(r["cpu_s"] for r in rows), sum(r["wall_s"] for r in rows)
    print(f"{len(rows)} tests: {cpu:.0f} CPU s ({cpu / 120:.1f} min on 2 cores), {wall:.0f} test-wall s")
    for r in sorted(rows, key=lambda r: -r["cpu_s"])[:top]:
        print(f"{r['cpu_s']:8.1f} cpu {r['wall_s']:8.1f} wall  {r['nodeid']}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
