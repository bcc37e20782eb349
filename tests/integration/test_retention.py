"""Retention (body purge) and the append-only audit log, on the run's real PostgreSQL database."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from alembic import command
from celery import Celery
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from courier.app.store import audit, outbox, retention
from courier.app.store.schema import alembic_config
from courier.app.store.db import make_engine
from courier.app.store.models import (ACCEPTED, DEAD, DELIVERED, PENDING, RETRYING, UNROUTED, AuditRecord, Delivery, Message,
                        utcnow)
from tests.support.services import fresh_database
from tests.integration.test_cli import courier

DAY = 86400.0
OLD = timedelta(days=40)


def add_message(store, statuses: list[str], age: timedelta = OLD, status: str = ACCEPTED) -> str:
    """A message received `age` ago with one delivery per status; its id."""
    at = utcnow() - age
    with store.session() as session:
        m = Message(source="lab", type="t", content_type="application/json", body=b'{"phi": 1}', size=10,
                    correlation_id="c", status=status, received_at=at)
        session.add(m)
        session.flush()
        for i, st in enumerate(statuses):
            session.add(Delivery(message_id=m.id, destination=("billing", "erp")[i % 2], status=st,
                                 created_at=at, updated_at=at, delivered_at=at if st == DELIVERED else None))
        return m.id


def message(store, message_id: str) -> Message:
    with store.session() as session:
        return session.get(Message, message_id)


def purge_records(store) -> list[AuditRecord]:
    with store.session() as session:
        return list(session.scalars(select(AuditRecord).where(AuditRecord.action == "purge")))


def test_only_old_messages_delivered_everywhere_lose_their_bodies(store):
    old_delivered = add_message(store, [DELIVERED, DELIVERED])
    keep = {
        "old dead": add_message(store, [DEAD]),
        "old pending": add_message(store, [PENDING]),
        "old partly delivered": add_message(store, [DELIVERED, RETRYING]),
        "old delivered and dead": add_message(store, [DELIVERED, DEAD]),
        "old unrouted": add_message(store, [], status=UNROUTED),
        "new delivered": add_message(store, [DELIVERED], age=timedelta(days=1)),
    }
    result = retention.purge(store, 30 * DAY, actor="cli:alice")

    assert result.purged == 1 and result.batches == 1
    gone = message(store, old_delivered)
    assert gone.body == b"" and gone.purged_at is not None
    assert gone.size == 10 and gone.source == "lab"  # metadata stays
    with store.session() as session:
        assert session.scalar(select(Delivery.status).where(Delivery.message_id == old_delivered)) == DELIVERED
    for what, message_id in keep.items():
        row = message(store, message_id)
        assert row.body == b'{"phi": 1}' and row.purged_at is None, what

    [record] = purge_records(store)
    assert record.actor == "cli:alice"
    details = audit.details_of(record)
    assert details["purged"] == 1 and details["batches"] == 1
    assert details["cutoff"] == result.cutoff.isoformat()

    again = retention.purge(store, 30 * DAY, actor="cli:alice")  # idempotent: nothing left to do
    assert again.purged == 0
    assert len(purge_records(store)) == 2  # a person's run is always recorded


def test_batches_are_separate_transactions(store):
    ids = [add_message(store, [DELIVERED]) for _ in range(5)]
    sizes: list[int] = []
    result = retention.purge(store, 30 * DAY, actor="cli:bob", batch=2, on_batch=sizes.append)
    assert sizes == [2, 2, 1]
    assert result.batches == 3 and result.purged == 5
    assert audit.details_of(purge_records(store)[0])["batches"] == 3
    assert all(message(store, i).purged_at for i in ids)


def test_a_locked_message_is_skipped_not_waited_for(store):
    ids = [add_message(store, [DELIVERED]) for _ in range(3)]
    engine = make_engine(store.url)
    try:
        with engine.connect() as other:
            other.begin()
            other.execute(text("SELECT id FROM courier_messages WHERE id = :id FOR UPDATE"), {"id": ids[1]})
            done: list = []
            worker = threading.Thread(target=lambda: done.append(retention.purge(store, 30 * DAY, actor="t")))
            worker.start()
            worker.join(timeout=20)
            assert done, "purge waited for a row lock held by live traffic"
            assert done[0].purged == 2
            assert message(store, ids[1]).purged_at is None
            other.rollback()
    finally:
        engine.dispose()
    assert retention.purge(store, 30 * DAY, actor="t").purged == 1  # the next run takes it
    assert message(store, ids[1]).body == b""


def test_a_message_whose_delivery_is_locked_is_left_for_the_next_run(store):
    locked = add_message(store, [DELIVERED, DELIVERED])
    engine = make_engine(store.url)
    try:
        with engine.connect() as other:
            other.begin()  # as a replay does: it locks the deliveries it is about to change
            other.execute(text("SELECT id FROM courier_deliveries WHERE message_id = :id LIMIT 1 FOR UPDATE"),
                          {"id": locked})
            result = retention.purge(store, 30 * DAY, actor="t")
            other.rollback()
    finally:
        engine.dispose()
    assert result.purged == 0 and result.skipped == [locked]
    assert audit.details_of(purge_records(store)[0])["skipped_locked"] == 1
    assert message(store, locked).purged_at is None


def test_dry_run_counts_and_changes_nothing(store):
    ids = [add_message(store, [DELIVERED]) for _ in range(3)]
    result = retention.purge(store, 30 * DAY, actor="t", dry_run=True)
    assert result.purged == 3 and result.dry_run
    assert all(message(store, i).purged_at is None for i in ids)
    assert purge_records(store) == []


def test_a_purged_message_is_not_replayed(store, config_file):
    message_id = add_message(store, [DELIVERED])
    retention.purge(store, 30 * DAY, actor="t")
    with store.session() as session:
        delivery_id = session.scalar(select(Delivery.id).where(Delivery.message_id == message_id))
        assert outbox.replay(session, [delivery_id], actor="t") == []
        assert outbox.replay(session, actor="t", destination="billing", status=DELIVERED) == []
        assert session.get(Delivery, delivery_id).status == DELIVERED
    result = courier("replay", delivery_id, config=config_file, database_url=store.url)
    assert result.returncode == 1 and "retention purged its message's body" in result.stderr


def test_the_trace_says_the_body_was_purged(store, client, make_token):
    purged, kept = add_message(store, [DELIVERED]), add_message(store, [DEAD])
    retention.purge(store, 30 * DAY, actor="t")
    headers = make_token(scope="operate")
    doc = client.get(f"/api/v1/messages/{purged}", headers=headers).get_json()
    assert doc["body_purged"] is True and doc["purged_at"]
    assert doc["deliveries"][0]["status"] == DELIVERED
    doc = client.get(f"/api/v1/messages/{kept}", headers=headers).get_json()
    assert doc["body_purged"] is False and doc["purged_at"] is None


def test_courier_purge_command(store, config_file):
    [add_message(store, [DELIVERED]) for _ in range(3)]
    run = lambda *a: courier(*a, config=config_file, database_url=store.url)  # noqa: E731
    dry = run("purge", "--older-than", "30d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would purge 3 message bodies" in dry.stdout
    done = run("purge", "--older-than", "30d", "--batch", "2", "--actor", "carol")
    assert done.returncode == 0, done.stderr
    assert "purged 3 message bodies" in done.stdout and "in 2 batches" in done.stdout
    [record] = purge_records(store)
    assert record.actor == "cli:carol"
    listed = run("audit", "--action", "purge")
    assert "cli:carol\tpurge" in listed.stdout
    bad = run("purge", "--older-than", "soon")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--older-than" in bad.stderr


def test_retention_is_off_unless_configured():
    assert retention.retention_from_env({}) == (None, retention.DEFAULT_INTERVAL)
    assert retention.retention_from_env({"COURIER_RETENTION": "off"})[0] is None
    assert retention.retention_from_env({"COURIER_RETENTION": "30d", "COURIER_RETENTION_INTERVAL": "10m"}) == \
        (30 * DAY, 600.0)
    with pytest.raises(ValueError):
        retention.retention_from_env({"COURIER_RETENTION": "0s"})


def test_beat_schedule_and_task(app, store, monkeypatch):
    import courier.tasks.retention

    settings = app.extensions["courier.settings"]
    celery = Celery("t")
    celery.conf.task_queues = []
    courier.tasks.retention.configure(celery, settings)
    assert not celery.conf.beat_schedule  # off by default: nothing scheduled

    monkeypatch.setenv("COURIER_RETENTION", "30d")
    monkeypatch.setenv("COURIER_RETENTION_INTERVAL", "15m")
    courier.tasks.retention.configure(celery, settings)
    entry = celery.conf.beat_schedule["courier-retention"]
    assert entry == {"task": "courier.purge", "schedule": 900.0}
    queue = f"{settings.queue_prefix}.housekeeping"
    [declared] = celery.conf.task_queues
    assert declared.name == queue and declared.queue_arguments == {"x-queue-type": "quorum"}  # on every node
    assert celery.conf.task_routes["courier.purge"] == {"queue": queue}

    add_message(store, [DELIVERED])
    with app.app_context():
        courier.tasks.retention.purge_task.run()
        courier.tasks.retention.purge_task.run()  # nothing left: the beat writes no empty record
    [record] = purge_records(store)
    assert record.actor == "beat" and audit.details_of(record)["purged"] == 1


# --- the audit log is append-only ---------------------------------------------

def test_the_audit_table_refuses_update_and_delete(store):
    with store.session() as session:
        audit.record(session, actor="t", action="pause", target="billing")
    for statement in ("UPDATE courier_audit SET actor = 'someone else'", "DELETE FROM courier_audit"):
        with pytest.raises(DBAPIError, match="append-only"):
            with store.engine.begin() as conn:
                conn.execute(text(statement))
    with store.session() as session:
        assert session.scalar(select(AuditRecord.actor)) == "t"


def test_the_append_only_trigger_comes_and_goes_with_the_migration():
    with fresh_database("courier_auditmig") as url:
        engine = make_engine(url)
        try:
            def triggers() -> list[str]:
                with engine.connect() as conn:
                    return conn.scalars(text("SELECT tgname FROM pg_trigger WHERE tgname = "
                                             "'courier_audit_append_only'")).all()
            command.upgrade(alembic_config(url), "head")
            assert triggers() == ["courier_audit_append_only"]
            command.downgrade(alembic_config(url), "0002")
            assert triggers() == []
            with engine.connect() as conn:
                columns = conn.scalars(text("SELECT column_name FROM information_schema.columns "
                                            "WHERE table_name = 'courier_messages'")).all()
            assert "purged_at" not in columns
        finally:
            engine.dispose()
