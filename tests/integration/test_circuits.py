"""The shared circuit breaker: state machine under frozen time, and one probe across real processes."""
from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta, timezone

from freezegun import freeze_time
from sqlalchemy import select

from courier.app.store import circuits, outbox
from courier.app.store.db import Store
from courier.app.store.models import Attempt, Circuit, Delivery
from courier.app.settings import CircuitPolicy, Destination, RetryPolicy

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
BILLING = Destination("billing", "http://x", timeout=5.0, retry=RetryPolicy(max_attempts=50, initial=1, max=2),
                      circuit=CircuitPolicy(failure_threshold=3, open_for=10.0, max_open_for=25.0))
ERP = Destination("erp", "file:///tmp", retry=RetryPolicy(max_attempts=50, initial=1, max=2))
DESTS = {"billing": BILLING, "erp": ERP}


def accept(store, n, destinations=("billing",)):
    with store.session() as s:
        for i in range(n):
            outbox.accept(s, outbox.NewMessage("lab", "t", "application/json", b"{}", None), list(destinations))


def attempt(store, result, destination="billing"):
    """Claim one due delivery of `destination` and run an attempt ending in `result`; returns begin's answer."""
    with store.session() as s:
        claimed = [c for c in outbox.claim_due(s, lease=60, limit=100) if c.destination == destination]
    assert claimed, f"nothing due for {destination}"
    c = claimed[0]
    with store.session() as s:
        ticket = outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS)
    if isinstance(ticket, str):
        return ticket
    with store.session() as s:
        outbox.finish_attempt(s, ticket, outbox.Outcome(result, f"HTTP 503 ({result})", T0, 1), DESTS[destination])
    return "attempted"


def circuit(store, name="billing") -> Circuit | None:
    with store.session() as s:
        return s.get(Circuit, name)


def release_all(store):
    """Make every waiting or retrying delivery due now (instead of sleeping through backoff)."""
    with store.session() as s:
        s.execute(Delivery.__table__.update().where(Delivery.status == "retrying")
                  .values(due_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))


def attempts_made(store) -> int:
    with store.session() as s:
        return len(s.scalars(select(Attempt)).all())


def test_opens_after_threshold_then_holds_deliveries_without_spending_attempts(store):
    with freeze_time(T0) as clock:
        accept(store, 5)
        for _ in range(3):
            assert attempt(store, "temporary") == "attempted"
            release_all(store)
        row = circuit(store)
        assert (row.state, row.failures, row.trips) == ("open", 3, 1)
        assert row.open_until == T0 + timedelta(seconds=10)
        # Still-due deliveries are not even claimed while the circuit is open...
        with store.session() as s:
            assert [c for c in outbox.claim_due(s, lease=60, limit=100) if c.destination == "billing"] == []
        # ...and a task already in the queue waits without spending an attempt.
        # (claimed before the circuit opened: the claim counted an attempt, which waiting gives back)
        with store.session() as s:
            d = s.scalars(select(Delivery).where(Delivery.status == "in_flight")).first()
            assert d.attempts == 1
            assert outbox.begin_attempt(s, d.id, d.dispatches, DESTS) == "waiting"
        with store.session() as s:
            d = s.get(Delivery, d.id)
            assert (d.status, d.attempts, d.due_at) == ("retrying", 0, T0 + timedelta(seconds=10))
            assert d.last_error.startswith("waiting: circuit open")
        assert attempts_made(store) == 3
        clock.tick(11)


def test_exactly_one_probe_then_close_wakes_the_held_deliveries(store):
    with freeze_time(T0) as clock:
        accept(store, 4)
        for _ in range(3):
            attempt(store, "temporary")
            release_all(store)
        clock.tick(10)
        with store.session() as s:
            first = circuits.admit(s, BILLING, "probe-1")
            second = circuits.admit(s, BILLING, "other")
        assert (first.verdict, second.verdict) == ("probe", "wait")
        assert circuit(store).state == "half_open"
        # A held delivery waits until the probe's lease at most.
        with store.session() as s:
            s.execute(Delivery.__table__.update().values(status="retrying", due_at=T0 + timedelta(hours=1),
                                                         last_error="waiting: circuit half-open"))
            circuits.record(s, BILLING, "probe-1", "delivered", "HTTP 200")
            woken = outbox.wake(s, "billing")
        assert woken == 4
        row = circuit(store)
        assert (row.state, row.failures, row.trips, row.open_until) == ("closed", 0, 0, None)


def test_failed_probe_reopens_for_longer_capped(store):
    with freeze_time(T0) as clock:
        with store.session() as s:
            for _ in range(3):
                circuits.record(s, BILLING, "d", "temporary", "timeout")
        opens = []
        for _ in range(4):
            clock.move_to(circuit(store).open_until)
            with store.session() as s:
                assert circuits.admit(s, BILLING, "probe").verdict == "probe"
                assert circuits.record(s, BILLING, "probe", "temporary", "timeout") == "open"
            row = circuit(store)
            opens.append((row.open_until - datetime.now(timezone.utc)).total_seconds())
        assert opens == [20.0, 25.0, 25.0, 25.0]  # open_for 10 doubles per trip, capped by max_open_for 25


def test_a_lost_probe_is_replaced_after_its_lease(store):
    with freeze_time(T0) as clock:
        with store.session() as s:
            for _ in range(3):
                circuits.record(s, BILLING, "d", "temporary", "timeout")
        clock.tick(10)
        with store.session() as s:
            assert circuits.admit(s, BILLING, "probe-1").verdict == "probe"
        clock.tick(BILLING.timeout + circuits.PROBE_MARGIN - 1)
        with store.session() as s:
            assert circuits.admit(s, BILLING, "probe-2").verdict == "wait"
        clock.tick(2)  # probe-1's worker died: its lease ran out
        with store.session() as s:
            assert circuits.admit(s, BILLING, "probe-2").verdict == "probe"


def test_permanent_errors_do_not_open_the_circuit(store):
    with store.session() as s:
        for _ in range(2):
            circuits.record(s, BILLING, "d", "temporary", "timeout")
        circuits.record(s, BILLING, "d", "permanent", "HTTP 400")
        for _ in range(2):
            circuits.record(s, BILLING, "d", "temporary", "timeout")
    assert (circuit(store).state, circuit(store).failures) == ("closed", 2)


def test_an_open_circuit_does_not_hold_other_destinations(store):
    accept(store, 3, destinations=("billing", "erp"))
    with store.session() as s:
        for _ in range(3):
            circuits.record(s, BILLING, "d", "temporary", "timeout")
        claimed = outbox.claim_due(s, lease=60, limit=100)
    assert {c.destination for c in claimed} == {"erp"} and len(claimed) == 3


def _admit_in_process(url, barrier, delivery_id, results):
    store = Store(url)
    barrier.wait()
    with store.session() as s:
        results.put(circuits.admit(s, BILLING, delivery_id).verdict)
    store.dispose()


def test_one_half_open_probe_across_worker_processes(store, pg_url):
    """Six processes ask at the same instant after open_for: exactly one may probe, every round."""
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(3):
        with store.session() as s:
            s.execute(Circuit.__table__.delete())
            for _ in range(3):
                circuits.record(s, BILLING, "d", "temporary", "timeout")
            # Already past open_until: the next admit decides the probe.
            s.execute(Circuit.__table__.update().values(open_until=datetime(2000, 1, 1, tzinfo=timezone.utc)))
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_admit_in_process, args=(pg_url, barrier, f"d{round_}-{i}", results))
                 for i in range(6)]
        for p in procs:
            p.start()
        verdicts = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        assert verdicts == ["probe"] + ["wait"] * 5, verdicts
