"""Read-only operator reports shared by the HTTP API and the `courier` CLI, so both say the same: the
reconciliation counts, and the documents of a message, a delivery and an attempt."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier.app.store.models import OPEN_STATUSES, Attempt, Delivery, Message


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


__all__ = ["reconciliation", "iso", "message_doc", "delivery_doc", "attempt_doc"]
