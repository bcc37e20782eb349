"""Misbehaving destinations, on real relay and worker processes and a real HTTP sink.

Counts are asserted (attempts bounded, nothing lost); durations are only printed.
"""
from __future__ import annotations

import time

import pytest
from kombu import Connection
from sqlalchemy import func, select

from courier.app.store.models import Circuit, Delivery
from courier.tasks.queues import DELIVERY_LIMIT, dead_letter_queues
from tests.support.services import BROKER_URL
from tests.support.processes import post_messages, running_courier, wait_all_delivered
from tests.support.sinks import HttpSink

pytestmark = pytest.mark.slow
OUTAGE = 30.0  # seconds the destination answers 500


def dlq_messages(app, destination: str) -> list:
    """Drain and return the payloads (or Celery task args) in a destination's dead-letter queue."""
    settings = app.extensions["courier.settings"]
    queue = next(q for q in dead_letter_queues(settings) if q.routing_key == destination)
    found = []
    with Connection(BROKER_URL) as conn:
        simple = conn.SimpleQueue(queue)
        while True:
            try:
                m = simple.get(timeout=1)
            except simple.Empty:
                break
            found.append(m.payload)
            m.ack()
        simple.close()
    return found


def wait_parked(app, destination: str, delivery_id: str, timeout: float = 90.0) -> bool:
    """Whether something naming `delivery_id` reaches the destination's DLQ within `timeout` (drained as read)."""
    deadline = time.monotonic() + timeout
    parked: list = []
    while not any(delivery_id in str(m) for m in parked) and time.monotonic() < deadline:
        time.sleep(1.0)
        parked += dlq_messages(app, destination)
    return any(delivery_id in str(m) for m in parked)


def statuses(store) -> dict[str, int]:
    with store.session() as s:
        return dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())


def test_outage_opens_the_circuit_bounds_attempts_and_recovers(tmp_path, store, queue_prefix):
    with HttpSink(status=500) as sink, running_courier(
            tmp_path, store, queue_prefix, {"billing": sink.url},
            retry={"max_attempts": 100, "initial": "200ms", "max": "1s"},
            circuit={"failure_threshold": 3, "open_for": "2s", "max_open_for": "8s"}) as courier:
        courier.procs.start("worker")
        courier.procs.start("relay")
        courier.procs.wait_ready()
        post_messages(courier.client, courier.headers, 20)
        t0 = time.monotonic()
        seen_states = set()
        while time.monotonic() - t0 < OUTAGE:
            with store.session() as s:
                row = s.get(Circuit, "billing")
                seen_states.add(row.state if row else "closed")
            time.sleep(0.2)
        during_outage = len(sink.received)
        sink.status = 200
        recovered = time.monotonic()
        wait_all_delivered(store, 20, courier.procs, timeout=60)
        print(f"\n{during_outage} requests in a {OUTAGE:.0f}s outage for 20 messages; all delivered "
              f"{time.monotonic() - recovered:.1f}s after recovery")
    assert "open" in seen_states
    # Without the breaker: 20 deliveries retried about once a second each, ~600 requests.
    # With it: the requests before it opened (at most threshold + 8 in flight) plus one probe per
    # open period (2, 4, 8, 8, ... seconds).
    assert during_outage <= 3 + 8 + int(OUTAGE / 2), during_outage
    with store.session() as s:
        assert s.scalar(select(func.max(Delivery.attempts))) <= 12
        assert s.get(Circuit, "billing").state == "closed"
    assert set(sink.count_by_key()) == {d for d in _delivery_ids(store)}


def _delivery_ids(store) -> list[str]:
    with store.session() as s:
        return list(s.scalars(select(Delivery.id)))


def test_a_dead_destination_does_not_stop_a_healthy_one(tmp_path, store, queue_prefix):
    with HttpSink() as sink, running_courier(
            tmp_path, store, queue_prefix,
            {"healthy": sink.url, "down": "http://127.0.0.1:9/refused"},  # port 9: nothing listens
            retry={"max_attempts": 100, "initial": "200ms", "max": "1s"},
            circuit={"failure_threshold": 3, "open_for": "5s"}) as courier:
        courier.procs.start("worker")
        courier.procs.start("relay")
        courier.procs.wait_ready()
        t0 = time.monotonic()
        post_messages(courier.client, courier.headers, 200)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with store.session() as s:
                healthy_done = s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.destination == "healthy", Delivery.status == "delivered"))
            if healthy_done == 200:
                break
            time.sleep(0.1)
        print(f"\nhealthy destination: 200 delivered in {time.monotonic() - t0:.2f}s next to a dead one")
        assert healthy_done == 200
        with store.session() as s:
            down = s.scalars(select(Delivery).where(Delivery.destination == "down")).all()
            assert s.get(Circuit, "down").state in ("open", "half_open")
        assert {d.status for d in down} <= {"retrying", "in_flight", "pending"}
        assert sum(d.attempts for d in down) <= 3 + 8 + 12, "the open circuit should stop the attempts"
        # Held back without spending attempts. (Whether a held one also shows "waiting: circuit ..."
        # depends on whether its task was already queued when the circuit opened: timing, not behaviour.)
        assert sum(1 for d in down if d.attempts == 0) >= len(down) - (3 + 8 + 12)


def test_http_400_goes_dead_once_shows_in_the_dlq_and_replays(tmp_path, store, queue_prefix):
    with HttpSink(status=400) as sink, running_courier(tmp_path, store, queue_prefix,
                                                       {"billing": sink.url}) as courier:
        dlq_messages(courier.app, "billing")  # the queue prefix is the session's: earlier tests' dead letters
        courier.procs.start("worker")
        courier.procs.start("relay")
        post_messages(courier.client, courier.headers, 3)
        deadline = time.monotonic() + 60
        while statuses(store).get("dead", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert statuses(store) == {"dead": 3}
        assert len(sink.received) == 3  # one attempt each, never retried
        time.sleep(1.0)  # the DLQ publish follows the commit
        dead_letters = dlq_messages(courier.app, "billing")
        assert sorted(m["delivery_id"] for m in dead_letters) == sorted(_delivery_ids(store))
        assert all("HTTP 400" in m["reason"] for m in dead_letters)

        sink.status = 200  # the destination is fixed; the operator replays
        from courier.app.store import tokens
        with store.session() as s:
            _, op = tokens.create(s, scope="operate", source=None)
        for delivery_id in _delivery_ids(store):
            r = courier.client.post(f"/api/v1/deliveries/{delivery_id}/replay", json={"reason": "fixed"},
                                    headers={"Authorization": f"Bearer {op}"})
            assert r.status_code == 200, r.get_json()
        wait_all_delivered(store, 3, courier.procs, timeout=60)
    keys = sink.count_by_key()
    assert set(keys) == set(_delivery_ids(store)) and all(n == 2 for n in keys.values())  # once refused, once taken


def test_a_poison_task_is_parked_in_the_dlq_after_bounded_redeliveries(tmp_path, store, queue_prefix):
    """The transform SIGKILLs the prefork child running it, every time."""
    with HttpSink() as sink, running_courier(tmp_path, store, queue_prefix, {"billing": sink.url},
                                             transform="tests.support.poison:kill_worker",
                                             retry={"max_attempts": 50, "initial": "1s", "max": "2s"}) as courier:
        dlq_messages(courier.app, "billing")  # earlier tests' dead letters are not this test's
        courier.procs.start("worker", pool="prefork", concurrency=1)
        courier.procs.start("relay")
        post_messages(courier.client, courier.headers, 1)
        (delivery_id,) = _delivery_ids(store)
        # The Celery task itself, parked by RabbitMQ after DELIVERY_LIMIT redeliveries.
        assert wait_parked(courier.app, "billing", delivery_id), courier.procs.logs()
        with store.session() as s:
            attempts = s.get(Delivery, delivery_id).attempts
        assert 1 <= attempts <= DELIVERY_LIMIT + 1, attempts
        assert sink.received == []


def test_a_poison_message_in_a_batch_is_parked_alone_and_its_neighbours_go(tmp_path, store, queue_prefix):
    """Six messages in one task; one kills the worker. The broker hands the batch out again, the
    worker splits it into one task each, the neighbours are delivered and the poison is parked.
    (Without the split, the three behind the poison would never be sent: the batch dies each time.)"""
    import json

    with HttpSink() as sink, running_courier(tmp_path, store, queue_prefix, {"billing": sink.url},
                                             transform="tests.support.poison:kill_worker_on_poison",
                                             retry={"max_attempts": 50, "initial": "1s", "max": "2s"}) as courier:
        dlq_messages(courier.app, "billing")
        for i in range(6):  # accepted before the relay starts: its first claim takes all six, one batch
            body = {"type": "service.completed", "id": f"b-{i}", "data": {"n": "poison" if i == 2 else i}}
            r = courier.client.post("/api/v1/messages", headers=courier.headers, content_type="application/json",
                                    data=json.dumps(body))
            assert r.status_code == 202
        courier.procs.start("worker", pool="prefork", concurrency=1)
        courier.procs.start("relay")
        with store.session() as s:
            (poison,) = [d.id for d in s.scalars(select(Delivery)) if b"poison" in d.message.body]
        wait_all_delivered(store, 5, courier.procs, timeout=90)
        assert wait_parked(courier.app, "billing", poison), courier.procs.logs()
    assert all(b"poison" not in r.body for r in sink.received)
    assert set(sink.count_by_key()) == set(_delivery_ids(store)) - {poison}


def test_ordered_destination_keeps_each_keys_order_through_failures(tmp_path, store, queue_prefix):
    """Five patients, four messages each; the first answers fail. Per patient, order holds."""
    import json

    with HttpSink() as sink, running_courier(tmp_path, store, queue_prefix, {"billing": sink.url},
                                             ordered_by="data.patient",
                                             retry={"max_attempts": 20, "initial": "100ms", "max": "300ms"},
                                             circuit={"failure_threshold": 50}) as courier:
        sink.respond(*[(503, {}, b"busy")] * 6)
        courier.procs.start("worker")
        courier.procs.start("relay")
        accepted: dict[str, list[str]] = {}
        for i in range(20):
            patient = f"P{i % 5}"
            r = courier.client.post("/api/v1/messages", headers=courier.headers, content_type="application/json",
                                    data=json.dumps({"type": "adt", "id": f"m{i}", "data": {"patient": patient}}))
            assert r.status_code == 202
            accepted.setdefault(patient, []).append(r.get_json()["deliveries"][0]["id"])
        wait_all_delivered(store, 20, courier.procs, timeout=90)
    # The sink refused the first six requests it got and took every later one.
    assert len(sink.received) == 26
    delivered_order: dict[str, list[str]] = {}
    for r in sink.received[6:]:
        delivered_order.setdefault(json.loads(r.body)["data"]["patient"], []).append(r.headers["idempotency-key"])
    assert delivered_order == accepted
