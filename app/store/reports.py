"""Read-only operator reports shared by the HTTP API and the `courier` CLI, so both say the same."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier.app.store.models import OPEN_STATUSES, Delivery, Message


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


__all__ = ["reconciliation"]
