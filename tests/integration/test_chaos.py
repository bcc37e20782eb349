"""The short failure suite (bench/chaos.py --quick) as a test: nothing acknowledged may be lost.

It starts its own PostgreSQL cluster and RabbitMQ node on other ports (never the
machine's), runs web, relay, worker and mllp as real processes under load, and
in turn kills the worker, kills web and relay, crashes PostgreSQL, crashes
RabbitMQ and stops a destination for 10 s; after each it drains and reconciles
every 202 and AA against the store and the sinks (see bench/chaos.py). About
1.5 to 2.2 minutes on a 2-core machine (six runs: 89-131 s). `make chaos` runs the full suite.
"""
from __future__ import annotations

import pytest

from bench.chaos import QUICK, run, table
from bench.chaos_services import missing_services

pytestmark = pytest.mark.slow


@pytest.mark.skipif(missing_services() is not None, reason=f"failure suite: {missing_services()}")
def test_nothing_acknowledged_is_lost_under_kills_and_restarts():
    lines: list[str] = []
    rows, totals, log_dir = run(QUICK, say=lines.append)
    report = table(rows) + "\n" + "\n".join(f"- {r.fault}: {n}" for r in rows for n in r.notes)
    print("\n" + "\n".join(lines) + "\n" + report + f"\ntotals: {totals}")
    assert [r.fault for r in rows] == list(QUICK.faults)
    assert all(r.accepted > 0 for r in rows), f"a phase accepted nothing: the load did not run\n{report}"
    assert sum(r.lost for r in rows) == 0, f"acknowledged messages lost (logs in {log_dir}):\n{report}\n" \
                                           f"{totals['lost_detail']}"
    # Every delivery in the store is closed, and the destinations hold exactly the delivered ones:
    # distinct Idempotency-Keys at the HTTP sinks plus files in the drop = delivered in the store.
    assert totals["delivered"] + totals["dead"] == totals["deliveries"], totals
    assert totals["sink_distinct"] + totals["drop_files"] == totals["delivered"], totals
