"""Read-only operator reports shared by the HTTP API and the `courier` CLI, so both say the same: the
reconciliation counts, and the documents of a message, a delivery and an attempt."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session

from courier.app.store.models import DEAD, DELIVERED, OPEN_STATUSES, Attempt, Delivery, Message, is_open, utcnow


def reconciliation(session: Session, since: datetime | None = None) -> dict[str, dict[str, int]]:
    """Per destination: accepted = delivered + pending + dead, for deliveries of messages received since `since`.

    `pending` counts every open status (pending, in_flight, retrying).
    """
    query = (select(Delivery.destination, Delivery.status, func.count())
             .group_by(Delivery.destination, Delivery.status))
    if since:
        query = query.join(Message, Message.id == Delivery.message_id).where(Message.received_at >= since)
    totals: dict[str, dict[str, int]] = {}
    for destination, status, n in session.execute(query):
        row = totals.setdefault(destination, {"accepted": 0, "delivered": 0, "pending": 0, "dead": 0})
        row["accepted"] += n
        row["pending" if status in OPEN_STATUSES else status] += n
    return totals


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def delivery_doc(d: Delivery, with_log: bool = False) -> dict:
    body = {"id": d.id, "message_id": d.message_id, "destination": d.destination, "status": d.status,
            "attempts": d.attempts, "last_error": d.last_error,
            "next_attempt_at": iso(d.due_at) if d.status in ("pending", "retrying") else None,
            "lease_expires_at": iso(d.due_at) if d.status == "in_flight" else None,
            "delivered_at": iso(d.delivered_at), "created_at": iso(d.created_at),
            "updated_at": iso(d.updated_at)}
    if with_log:
        body["attempt_log"] = [attempt_doc(a) for a in d.attempt_log]
    return body


def attempt_doc(a: Attempt) -> dict:
    return {"number": a.number, "started_at": iso(a.started_at), "duration_ms": a.duration_ms,
            "outcome": a.outcome, "status_code": a.status_code, "detail": a.detail}


def message_doc(m: Message) -> dict:
    return {"id": m.id, "source": m.source, "type": m.type, "status": m.status,
            "content_type": m.content_type, "size": m.size, "idempotency_key": m.dedup_key,
            "correlation_id": m.correlation_id, "received_at": iso(m.received_at),
            # Retention removed the body (it is no longer stored); the metadata and trace remain.
            "body_purged": m.purged_at is not None, "purged_at": iso(m.purged_at)}


HOURS = 24  # the dashboard's window: its charts have one bar per hour


def _hour(session: Session, column):
    """The whole hours since the epoch of a time column, in SQL (PostgreSQL or SQLite)."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), Integer) / 3600
    return cast(func.floor(func.extract("epoch", column) / 3600), Integer)


def activity_row() -> dict:
    """One destination's `activity` with nothing in it (a destination that has had no deliveries)."""
    return {"delivered_1h": 0, "delivered_24h": 0, "dead_1h": 0, "dead_24h": 0, "open": 0,
            "oldest_open_seconds": None, "hourly": {DELIVERED: [0] * HOURS, DEAD: [0] * HOURS}}


def activity(session: Session, now: datetime | None = None) -> dict[str, dict]:
    """Per destination, from the store (so it survives restarts): deliveries finished as delivered and as
    dead in the last hour and day, one count per hour of the day for the charts, how many are open now
    and the age in seconds of the oldest open one.

    Finished deliveries are counted by `updated_at`, the time of their last change, which the
    (destination, status, updated_at) index serves: a day's counts read that index, not the table.
    """
    now = now or utcnow()
    day_ago, hour_ago = now - timedelta(hours=HOURS), now - timedelta(hours=1)
    this_hour = int(now.timestamp()) // 3600
    report: dict[str, dict] = {}

    def row(name: str) -> dict:
        return report.setdefault(name, activity_row())
    hour = _hour(session, Delivery.updated_at)
    for name, status, bucket, n in session.execute(
            select(Delivery.destination, Delivery.status, hour, func.count())
            .where(Delivery.status.in_((DELIVERED, DEAD)), Delivery.updated_at >= day_ago)
            .group_by(Delivery.destination, Delivery.status, hour)):
        r, index = row(name), HOURS - 1 - (this_hour - int(bucket))
        if 0 <= index < HOURS:
            r["hourly"][status][index] += n
        r[f"{status}_24h"] += n
    for name, status, n in session.execute(
            select(Delivery.destination, Delivery.status, func.count())
            .where(Delivery.status.in_((DELIVERED, DEAD)), Delivery.updated_at >= hour_ago)
            .group_by(Delivery.destination, Delivery.status)):
        row(name)[f"{status}_1h"] = n
    for name, n, oldest in session.execute(
            select(Delivery.destination, func.count(), func.min(Delivery.created_at))
            .where(is_open(Delivery.status)).group_by(Delivery.destination)):
        r = row(name)
        r["open"] = n
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=now.tzinfo)
            r["oldest_open_seconds"] = max(0, int((now - oldest).total_seconds()))
    return report


__all__ = ["reconciliation", "iso", "message_doc", "delivery_doc", "attempt_doc", "activity", "activity_row"]
