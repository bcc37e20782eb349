"""The outbox state machine and the relay's claim, on the real PostgreSQL (and SQLite where it differs)."""
from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time
from sqlalchemy import select, text
from sqlalchemy.exc import ProgrammingError

from courier.app.store import outbox
from courier.app.store.db import Store
from courier.app.store.models import Attempt, Delivery
from courier.app.settings import Destination, RetryPolicy

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)  # after any real "now": everything accepted is due
POLICY = RetryPolicy(max_attempts=3, initial=10.0, max=60.0)
DESTS = {"billing": Destination("billing", "http://x", timeout=10.0, retry=POLICY),
         "erp": Destination("erp", "file:///tmp", retry=POLICY)}


def accept(store, n=1, destinations=("billing", "erp"), key_prefix="k"):
    with store.session() as s:
        for i in range(n):
            outbox.accept(s, outbox.NewMessage("lab", "service.completed", "application/json", b"{}",
                                               f"{key_prefix}{i}"), list(destinations))


def deliveries(store):
    with store.session() as s:
        return {d.id: d for d in s.scalars(select(Delivery))}


def outcome(result, detail="x", retry_after=None):
    return outbox.Outcome(result, detail, T0, 5, None, retry_after)


def claim_one(store, now=T0, lease=60.0):
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=lease, limit=1, now=now)
    assert len(claimed) == 1
    return claimed[0]


def begin(store, c, now=T0):
    with store.session() as s:
        return outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS, now=now)


def finish(store, ticket, result, now=T0, **kw):
    with store.session() as s:
        return outbox.finish_attempt(s, ticket, outcome(result, **kw), DESTS["billing"], now=now)


def test_claim_marks_in_flight_with_a_lease_and_counts_dispatches(store):
    accept(store, 3)
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10, now=T0 + timedelta(days=1))
    assert len(claimed) == 6 and all(c.dispatch == 1 for c in claimed)
    rows = deliveries(store)
    assert {d.status for d in rows.values()} == {"in_flight"}
    assert {d.due_at for d in rows.values()} == {T0 + timedelta(days=1, seconds=60)}
    with store.session() as s:  # nothing is due again until the lease runs out
        assert outbox.claim_due(s, lease=60, limit=10, now=T0 + timedelta(days=1, seconds=59)) == []
        again = outbox.claim_due(s, lease=60, limit=10, now=T0 + timedelta(days=1, seconds=61))
    assert len(again) == 6 and all(c.dispatch == 2 for c in again)


def test_two_relays_never_claim_the_same_delivery(store, pg_url):
    accept(store, 200)
    other = Store(pg_url)
    results: dict[str, list] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def relay(name, st):
        barrier.wait()
        while True:
            with st.session() as s:
                got = outbox.claim_due(s, lease=60, limit=7)
            if not got:
                return
            results[name] += [c.delivery_id for c in got]

    threads = [threading.Thread(target=relay, args=("a", store)), threading.Thread(target=relay, args=("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.dispose()
    assert len(results["a"]) + len(results["b"]) == 400
    assert not set(results["a"]) & set(results["b"])
    assert results["a"] and results["b"], "SKIP LOCKED should let both relays make progress"


def test_delivered_is_final_and_a_duplicate_task_is_a_noop(store):
    accept(store, 1, destinations=("billing",))
    c = claim_one(store)
    ticket = begin(store, c)
    assert ticket.number == 1 and ticket.body == b"{}"
    assert finish(store, ticket, "delivered") == "delivered"
    assert begin(store, c) == "skipped"  # the same task again: nothing to do
    d = deliveries(store)[c.delivery_id]
    assert (d.status, d.attempts, d.due_at, d.delivered_at) == ("delivered", 1, None, T0)


def test_stale_dispatch_is_ignored_but_its_success_still_counts(store):
    accept(store, 1, destinations=("billing",))
    first = claim_one(store)
    ticket1 = begin(store, first)
    # The claim's lease (60 s) runs out; the relay dispatches again.
    later = T0 + timedelta(seconds=61)
    second = claim_one(store, now=later)
    assert second.dispatch == first.dispatch + 1
    assert begin(store, first, now=later) == "skipped"  # the old task, redelivered
    ticket2 = begin(store, second, now=later)
    assert finish(store, ticket1, "delivered") == "delivered"  # the slow first attempt did get through
    assert finish(store, ticket2, "temporary") == "superseded"
    with store.session() as s:
        assert [a.outcome for a in s.scalars(select(Attempt).order_by(Attempt.id))] == ["delivered", "temporary"]
    assert deliveries(store)[first.delivery_id].status == "delivered"


def test_a_lease_running_out_is_extended_only_by_its_own_dispatch(store):
    accept(store, 1, destinations=("billing",))
    first = claim_one(store, lease=5)
    ticket = begin(store, first)
    with store.session() as s:  # its task waited in the queue: the worker extends the lease before sending
        assert outbox.extend_lease(s, ticket, 40, now=T0 + timedelta(seconds=4))
    assert deliveries(store)[first.delivery_id].due_at == T0 + timedelta(seconds=44)
    later = T0 + timedelta(seconds=45)
    second = claim_one(store, now=later)  # it ran out after all: dispatched again
    with store.session() as s:
        assert not outbox.extend_lease(s, ticket, 40, now=later)  # the old dispatch cannot take it back
    assert deliveries(store)[second.delivery_id].due_at == later + timedelta(seconds=60)


def test_temporary_failures_back_off_then_go_dead(store):
    accept(store, 1, destinations=("billing",))
    now = T0
    for attempt in range(1, 4):
        c = claim_one(store, now=now)
        ticket = begin(store, c, now=now)
        status = finish(store, ticket, "temporary", now=now, detail=f"HTTP 503 #{attempt}")
        d = deliveries(store)[c.delivery_id]
        if attempt < 3:
            assert status == "retrying" and d.last_error == f"HTTP 503 #{attempt}"
            ceiling = min(POLICY.max, POLICY.initial * 2 ** (attempt - 1))
            assert now + timedelta(seconds=ceiling / 2) <= d.due_at <= now + timedelta(seconds=ceiling)
            now = d.due_at
        else:
            assert status == "dead" and d.due_at is None
            assert d.last_error == "gave up after 3 attempts; last: HTTP 503 #3"
    with store.session() as s:
        assert [a.number for a in s.scalars(select(Attempt).order_by(Attempt.id))] == [1, 2, 3]


def test_permanent_failure_is_dead_after_one_attempt(store):
    accept(store, 1, destinations=("billing",))
    ticket = begin(store, claim_one(store))
    assert finish(store, ticket, "permanent", detail="HTTP 400: bad charge code") == "dead"
    d = deliveries(store)[ticket.delivery_id]
    assert (d.status, d.attempts, d.last_error) == ("dead", 1, "HTTP 400: bad charge code")


def test_attempts_that_never_finish_still_exhaust_the_budget(store):
    """A message that kills its worker every time ends dead, not in an endless loop."""
    accept(store, 1, destinations=("billing",))
    now = T0
    for _ in range(POLICY.max_attempts):
        c = claim_one(store, now=now)
        assert isinstance(begin(store, c, now=now), outbox.Ticket)  # ...and the worker dies here
        now += timedelta(seconds=61)  # the claim's lease runs out
    c = claim_one(store, now=now)
    assert begin(store, c, now=now) == "dead"
    d = deliveries(store)[c.delivery_id]
    assert d.status == "dead" and "never finished" in d.last_error


def test_a_task_the_broker_redelivers_counts_an_attempt_and_renews_the_lease(store):
    """Its worker died running it (a poison message): that death spent the claim's attempt."""
    accept(store, 1, destinations=("billing",))
    c = claim_one(store, lease=5)
    assert begin(store, c).number == 1
    with store.session() as s:
        ticket = outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS, redelivered=True, now=T0)
    assert ticket.number == 2 and ticket.lease_until == T0 + timedelta(seconds=10 + outbox.LEASE_MARGIN)
    d = deliveries(store)[c.delivery_id]
    assert (d.attempts, d.due_at) == (2, ticket.lease_until)
    with store.session() as s:  # the third death spends the last of three attempts: dead, not sent again
        assert outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS, redelivered=True, now=T0).number == 3
        assert outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS, redelivered=True, now=T0) == "dead"
    d = deliveries(store)[c.delivery_id]
    assert (d.status, d.attempts) == ("dead", 3) and "attempt 3 of 3 never finished" in d.last_error


def test_retry_after_is_a_floor_capped_by_max():
    rng = random.Random(1)
    assert outbox.retry_delay(POLICY, 1, retry_after=30, rng=rng) == 30
    assert outbox.retry_delay(POLICY, 1, retry_after=3600, rng=rng) == POLICY.max
    delays = [outbox.retry_delay(POLICY, 10, rng=rng) for _ in range(200)]
    assert all(POLICY.max / 2 <= x <= POLICY.max for x in delays) and len(set(delays)) > 100


def test_released_deliveries_are_due_at_once(store):
    accept(store, 1, destinations=("billing",))
    c = claim_one(store)
    with store.session() as s:
        outbox.release(s, [c], now=T0)
        assert len(outbox.claim_due(s, lease=60, limit=5, now=T0)) == 1


def test_sqlite_store_runs_the_same_state_machine(sqlite_store):
    with freeze_time(T0):
        accept(sqlite_store, 2, destinations=("billing",))
        with sqlite_store.session() as s:
            claimed = outbox.claim_due(s, lease=60, limit=10)
        assert len(claimed) == 2
        ticket = begin(sqlite_store, claimed[0])
        assert finish(sqlite_store, ticket, "delivered") == "delivered"
        with sqlite_store.session() as s:  # duplicates are caught by the same unique key
            _, created = outbox.accept(s, outbox.NewMessage("lab", "t", "application/json", b"{}", "k0"), ["billing"])
        assert created is False
    assert sorted(d.status for d in deliveries(sqlite_store).values()) == ["delivered", "in_flight"]


def test_the_claims_generic_plan_uses_the_partial_index_of_open_deliveries(store):
    """psycopg prepares a statement after five runs, and PostgreSQL may then plan it once for any
    parameters. The claim must still find due deliveries through the partial index: with the open
    statuses bound as parameters it could not, and scanned the whole table (the relay stalled)."""
    import re

    accept(store, 300)
    with store.session() as s:
        s.execute(Delivery.__table__.update().where(Delivery.id.in_(
            select(Delivery.id).limit(500).scalar_subquery())).values(status="delivered", due_at=None))
    compiled = outbox._claim_statement().compile(dialect=store.engine.dialect)
    numbers: dict[str, int] = {}
    sql = re.sub(r"%\((\w+)\)s", lambda m: f"${numbers.setdefault(m.group(1), len(numbers) + 1)}", str(compiled))
    values = {**compiled.params, "now": T0.isoformat(), "lease_end": T0.isoformat(), "limit": 200}
    args = ", ".join(str(v) if isinstance(v, int) else f"'{v}'" for v in (values[n] for n in numbers))
    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE courier_deliveries")
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(f"PREPARE claim_probe AS {sql}")
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN EXECUTE claim_probe({args})"))
        conn.exec_driver_sql("DEALLOCATE claim_probe")
        conn.rollback()
    assert "ix_courier_deliveries_due" in plan, plan
    assert "ix_courier_deliveries_order" in plan, plan  # first_in_line's NOT EXISTS, for ordered keys


def test_transact_runs_the_work_again_when_its_connection_is_lost(store, pg_url):
    """A database restart kills the pooled connections: the worker's batch retries instead of failing."""
    other = Store(pg_url)
    calls = []

    def work(session):
        calls.append(session.execute(text("SELECT pg_backend_pid()")).scalar())
        if len(calls) == 1:
            with other.session() as s:
                s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": calls[0]})
        return session.execute(text("SELECT 42")).scalar()

    try:
        assert store.transact(work, patience=10) == 42
    finally:
        other.dispose()
    assert len(calls) == 2 and calls[0] != calls[1]


def test_transact_raises_a_query_error_at_once(store):
    calls = []

    def work(session):
        calls.append(1)
        session.execute(text("SELECT no_such_column FROM courier_deliveries"))

    with pytest.raises(ProgrammingError):
        store.transact(work, patience=10)
    assert calls == [1]
