"""The deliver task and the relay in-process, against the real PostgreSQL, RabbitMQ and an HTTP sink."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time

import pytest
from kombu import Connection
from sqlalchemy import text

from courier.app import create_app
from courier.app.store import outbox
from courier.app.store.db import Store
from courier.app.store.models import Delivery
from courier.tasks.celery_app import celery_init_app
from courier.tasks.queues import delivery_queues
from courier.tasks.deliver import deliver
from courier.tasks.relay import Relay
from tests.support.config import settings_for, write_config
from tests.support.services import BROKER_URL
from tests.support.sinks import HttpSink


def failing_transform(envelope):
    raise KeyError("charge_code")


@pytest.fixture
def sink():
    with HttpSink() as s:
        yield s


@pytest.fixture
def courier(tmp_path, store, queue_prefix, sink):
    """An app + Celery app whose destinations are the sink (billing) and a failing transform (erp)."""
    cfg = write_config(tmp_path / "courier.yml", {"billing": f"http://127.0.0.1:{sink.port}/billing"},
                       retry={"max_attempts": 3, "initial": "1s", "max": "5s"})
    doc = cfg.read_text().replace("destinations:\n", "destinations:\n  erp:\n    url: file:///tmp\n    clearance: phi\n"
                                  "    transform: tests.integration.test_worker:failing_transform\n", 1)
    cfg.write_text(doc.replace("to:\n  - billing", "to:\n  - billing\n  - erp"))
    flask_app = create_app(settings_for(cfg, store.url, queue_prefix, relay_poll=30.0))
    celery = celery_init_app(flask_app)
    yield flask_app, celery
    flask_app.extensions["courier.store"].dispose()


def accept(store, key="m1", destinations=("billing",)):
    with store.session() as s:
        message, _ = outbox.accept(s, outbox.NewMessage("lab", "service.completed", "application/json",
                                                        json.dumps({"key": key}).encode(), key), list(destinations))
    return message


def run_once(flask_app, store, destination="billing", lease=60):
    """What the relay and a worker do for one delivery, without the broker in between."""
    with store.session() as s:
        claimed = [c for c in outbox.claim_due(s, lease=lease, limit=10) if c.destination == destination]
    assert claimed, "nothing was due"
    with flask_app.app_context():
        c = claimed[0]
        return deliver.run(c.destination, [[c.delivery_id, c.dispatch]])[c.delivery_id], c


def delivery(store, delivery_id):
    with store.session() as s:
        d = s.get(Delivery, delivery_id)
        return d, list(d.attempt_log)


def test_http_400_is_dead_after_one_attempt(courier, store, sink):
    flask_app, _ = courier
    sink.status = 400
    accept(store)
    status, claimed = run_once(flask_app, store)
    d, log = delivery(store, claimed.delivery_id)
    assert status == "dead" and d.status == "dead" and d.attempts == 1
    assert "400" in d.last_error
    assert [a.outcome for a in log] == ["permanent"] and log[0].status_code == 400
    assert len(sink.received) == 1


def test_a_task_whose_lease_is_running_out_extends_it_and_sends(courier, store, sink):
    """A lease shorter than the destination's timeout (the task waited in its queue): sent, not dropped."""
    flask_app, _ = courier
    accept(store)
    status, claimed = run_once(flask_app, store, lease=0.5)
    assert status == "delivered" and len(sink.received) == 1
    assert delivery(store, claimed.delivery_id)[0].attempts == 1


def test_a_lease_extension_outlives_a_lost_connection(courier, store, sink, pg_url, monkeypatch):
    """The primary restarts (or fails over) just as a worker extends a lease: the extension waits for the
    store like the batch's other writes, the delivery is sent once, and nothing sent before it is lost."""
    flask_app, _ = courier
    accept(store, "m1"), accept(store, "m2")
    killer, calls, killed = Store(pg_url), [], []
    real = outbox.extend_lease

    def extend_on_a_dying_connection(session, ticket, seconds):
        calls.append(ticket.delivery_id)
        if len(calls) == 2:  # the second extension, after the first delivery was sent: its connection dies
            killed.append(session.execute(text("SELECT pg_backend_pid()")).scalar())
            with killer.session() as s:
                s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": killed[0]})
        return real(session, ticket, seconds)

    monkeypatch.setattr(outbox, "extend_lease", extend_on_a_dying_connection)
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=0.5, limit=10)
    try:
        with flask_app.app_context():
            statuses = deliver.run("billing", [[c.delivery_id, c.dispatch] for c in claimed])
    finally:
        killer.dispose()
    assert killed and statuses == {c.delivery_id: "delivered" for c in claimed}
    assert sorted(r.headers["idempotency-key"] for r in sink.received) == sorted(c.delivery_id for c in claimed)
    assert [delivery(store, c.delivery_id)[0].attempts for c in claimed] == [1, 1]


def test_503_is_retried_with_the_same_key_then_delivered(courier, store, sink):
    flask_app, _ = courier
    sink.respond((503, {"Retry-After": "2"}, b"maintenance"))
    accept(store)
    status, claimed = run_once(flask_app, store)
    d, _ = delivery(store, claimed.delivery_id)
    assert status == "retrying" and d.status == "retrying" and "503" in d.last_error
    assert d.due_at.timestamp() - time.time() > 1.0  # Retry-After: 2 is honoured as a floor
    with store.session() as s:  # the relay's next claim, at its due time instead of waiting for it
        (again,) = outbox.claim_due(s, lease=60, limit=10, now=d.due_at)
    with flask_app.app_context():
        assert deliver.run(again.destination, [[again.delivery_id, again.dispatch]]) == {d.id: "delivered"}
    keys = [r.headers["idempotency-key"] for r in sink.received]
    assert keys == [d.id, d.id]
    d, log = delivery(store, d.id)
    assert [a.outcome for a in log] == ["temporary", "delivered"] and d.delivered_at is not None


def test_a_failing_transform_is_permanent_with_its_reason(courier, store):
    flask_app, _ = courier
    accept(store, destinations=("erp",))
    status, claimed = run_once(flask_app, store, destination="erp")
    d, _ = delivery(store, claimed.delivery_id)
    assert status == "dead"
    assert d.last_error == "transform tests.integration.test_worker:failing_transform failed: KeyError: 'charge_code'"


def test_relay_wakes_on_commit_and_publishes_to_the_destination_queue(courier, store, queue_prefix):
    """relay_poll is 30 s here: a dispatch within seconds can only come from LISTEN/NOTIFY."""
    flask_app, celery = courier
    settings = flask_app.extensions["courier.settings"]
    relay = Relay(settings, flask_app.extensions["courier.store"], celery)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # the relay's first round is done and it is waiting
        message = accept(store, key="wake")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            d, _ = delivery(store, message.deliveries[0].id)
            if d.status == "in_flight":
                break
            time.sleep(0.02)
        assert d.status == "in_flight" and d.dispatches == 1
    finally:
        relay.stopping.set()
        thread.join(timeout=35)
    with Connection(BROKER_URL) as conn:
        declared = next(q for q in delivery_queues(settings) if q.name == settings.queue_for("billing"))
        queue = conn.SimpleQueue(declared)
        tasks = []
        while True:
            try:
                m = queue.get(timeout=1)
            except queue.Empty:
                break
            tasks.append(m.headers.get("argsrepr") or m.payload)
            m.ack()
        queue.close()
    assert any(d.id in str(t) for t in tasks), tasks


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to set a policy")
def test_a_publish_rabbitmq_refuses_is_given_back_and_sent_again(courier, store, queue_prefix):
    """RabbitMQ nacks a publish (here a policy makes the queue refuse everything; in a cluster, a quorum
    queue whose leader's node just died): the relay gives the claims back at once, so the next round
    publishes them again, instead of keeping them until their lease runs out."""
    flask_app, celery = courier
    settings = flask_app.extensions["courier.settings"]
    relay = Relay(settings, flask_app.extensions["courier.store"], celery)
    relay.prepare()
    queue = settings.queue_for("billing")
    declared = next(q for q in delivery_queues(settings) if q.name == queue)
    policy = f"refuse-{queue_prefix}"

    def ctl(*args):
        out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr

    message = accept(store, key="nacked")
    ctl("set_policy", "--apply-to", "queues", policy, f"^{re.escape(queue)}$",
        '{"max-length": 0, "overflow": "reject-publish"}')
    with Connection(BROKER_URL) as conn:  # declared as a worker would, and holding one message: full
        conn.SimpleQueue(declared).put({"filler": True})
    try:
        time.sleep(1.0)  # a policy reaches the queue asynchronously
        assert relay.pump(10) == 0
        d, _ = delivery(store, message.deliveries[0].id)
        assert d.status in ("pending", "retrying") and d.attempts == 0 and d.dispatches == 1, d.status
    finally:
        ctl("clear_policy", policy)
    time.sleep(1.0)
    assert relay.pump(10) == 1
    d, _ = delivery(store, message.deliveries[0].id)
    assert d.status == "in_flight" and d.dispatches == 2
    with Connection(BROKER_URL) as conn:
        declared(conn.default_channel).purge()


def test_a_batch_is_delivered_in_one_task_each_with_its_own_key(courier, store, sink):
    flask_app, _ = courier
    ids = sorted(accept(store, key=f"b{i}").deliveries[0].id for i in range(5))
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10)
    with flask_app.app_context():
        statuses = deliver.run("billing", [[c.delivery_id, c.dispatch] for c in claimed])
    assert statuses == {i: "delivered" for i in ids}
    assert [r.headers["idempotency-key"] for r in sink.received] == ids  # sent in id order, once each
    assert all([a.outcome for a in delivery(store, i)[1]] == ["delivered"] for i in ids)


def test_a_batch_stops_at_its_first_temporary_failure_and_gives_the_rest_back(courier, store, sink):
    """The rest were never sent: no attempt is spent or logged for them, and they are due at once."""
    flask_app, _ = courier
    sink.respond((200, {}, b"ok"), (503, {}, b"busy"))
    ids = sorted(accept(store, key=f"b{i}").deliveries[0].id for i in range(5))
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10)
    with flask_app.app_context():
        statuses = deliver.run("billing", [[c.delivery_id, c.dispatch] for c in claimed])
    assert [statuses[i] for i in ids] == ["delivered", "retrying", "retrying", "retrying", "retrying"]
    assert len(sink.received) == 2
    d, log = delivery(store, ids[1])
    assert d.attempts == 1 and [a.outcome for a in log] == ["temporary"] and "503" in d.last_error
    for untried in ids[2:]:
        d, log = delivery(store, untried)
        assert d.attempts == 0 and log == [] and d.due_at.timestamp() <= time.time()


def test_a_stale_item_in_a_batch_is_skipped_and_the_others_go(courier, store, sink):
    flask_app, _ = courier
    ids = sorted(accept(store, key=f"s{i}").deliveries[0].id for i in range(3))
    with store.session() as s:
        claimed = {c.delivery_id: c for c in outbox.claim_due(s, lease=60, limit=10)}
    items = [[i, claimed[i].dispatch] for i in ids]
    items[1][1] -= 1  # an older dispatch of the middle one: superseded
    with flask_app.app_context():
        statuses = deliver.run("billing", items)
    assert [statuses[i] for i in ids] == ["delivered", "skipped", "delivered"]
    assert sorted(r.headers["idempotency-key"] for r in sink.received) == [ids[0], ids[2]]


def test_split_makes_even_batches_of_one_destination_each():
    from courier.tasks.relay import split

    claimed = [outbox.Claimed(f"a{i}", "a", 1) for i in range(25)] + [outbox.Claimed(f"b{i}", "b", 1)
                                                                       for i in range(3)]
    batches = split(claimed, 10)
    assert sorted(len(b) for b in batches) == [3, 8, 8, 9]
    assert all(len({c.destination for c in b}) == 1 for b in batches)
    assert sorted(c.delivery_id for b in batches for c in b) == sorted(c.delivery_id for c in claimed)
    assert [len(b) for b in split(claimed[:3], 1)] == [1, 1, 1]


def test_the_celery_app_schedules_the_alert_check_and_registers_its_task(courier):
    """Beat sends courier.alerts (docs/console.md, Alerts) to a queue the Procfile's worker consumes."""
    _, celery = courier
    entry = celery.conf.beat_schedule["courier-alerts"]
    assert entry["task"] == "courier.alerts" and "courier.alerts" in celery.tasks
    queue = celery.conf.task_routes["courier.alerts"]["queue"]
    assert queue in {q.name for q in celery.conf.task_queues}
