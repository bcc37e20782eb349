"""End to end on real processes: ingest -> outbox -> relay -> RabbitMQ -> worker -> HTTP sink.

The relay and the worker run as the `courier relay` and `celery worker`
commands of the Procfile, against the real PostgreSQL and RabbitMQ, and are
killed with SIGKILL mid-run in the failure test. Throughput is printed, never
asserted (timing goals live in bench/).
"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from courier.app.store.models import Delivery
from tests.support.processes import delivered_count, post_messages, running_courier, wait_all_delivered
from tests.support.sinks import HttpSink

pytestmark = pytest.mark.slow
N_MESSAGES = 300


@pytest.fixture
def pipeline(tmp_path, store, queue_prefix):
    """A sink, a config routing every message of source `lab` to billing and erp, and process control."""
    with HttpSink() as sink:
        with running_courier(tmp_path, store, queue_prefix,
                             {"billing": f"http://127.0.0.1:{sink.port}/billing",
                              "erp": f"http://127.0.0.1:{sink.port}/erp"},
                             retry={"max_attempts": 10, "initial": "200ms", "max": "2s"}) as courier:
            yield sink, courier.procs, courier.client, courier.headers


def check_sink(store, sink: HttpSink, *, exact: bool) -> None:
    """Every delivery reached its destination with its own key and its own message's body."""
    with store.session() as s:
        expected = {d.id: (d.destination, d.message.body) for d in s.scalars(select(Delivery))}
    seen = sink.count_by_key()
    assert set(seen) == set(expected), "the sink saw keys that are not deliveries, or missed some"
    if exact:
        assert all(n == 1 for n in seen.values()), {k: n for k, n in seen.items() if n > 1}
    for r in sink.received:
        destination, body = expected[r.headers["idempotency-key"]]
        assert r.path == f"/{destination}" and r.body == body


def test_every_message_reaches_both_destinations_exactly_once(pipeline, store):
    sink, procs, client, headers = pipeline
    procs.start("worker")
    procs.start("relay")
    procs.wait_ready()
    t0 = time.monotonic()
    post_messages(client, headers, N_MESSAGES)
    posted = time.monotonic() - t0
    wait_all_delivered(store, 2 * N_MESSAGES, procs)
    elapsed = time.monotonic() - t0
    check_sink(store, sink, exact=True)
    print(f"\nend-to-end: {N_MESSAGES} messages ({2 * N_MESSAGES} deliveries) posted in {posted:.2f}s, all "
          f"delivered after {elapsed:.2f}s = {N_MESSAGES / elapsed:.0f} messages/s")


def test_nothing_is_lost_when_relay_and_worker_are_killed(pipeline, store):
    sink, procs, client, headers = pipeline
    procs.start("worker")
    procs.start("relay")
    post_messages(client, headers, N_MESSAGES // 2)
    # Kill both in the middle of the run: some deliveries claimed, some published, some mid-send.
    deadline = time.monotonic() + 60
    while delivered_count(store) < N_MESSAGES // 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    procs.kill("worker")
    procs.kill("relay")
    before = delivered_count(store)
    assert before < N_MESSAGES, "the kill came too late to interrupt anything"
    post_messages(client, headers, N_MESSAGES // 2, start=N_MESSAGES // 2)  # accepted while both are down
    procs.start("relay")
    procs.start("worker")
    wait_all_delivered(store, 2 * N_MESSAGES, procs)
    check_sink(store, sink, exact=False)
    dupes = sum(n - 1 for n in sink.count_by_key().values())
    print(f"\nkilled at {before}/{2 * N_MESSAGES} delivered; all delivered after restart; "
          f"{dupes} duplicate sends, each with its delivery's own Idempotency-Key")
