"""Retention: remove the bodies of old messages that every destination has received.

A message is eligible when it was routed (status accepted), every one of its deliveries
is `delivered`, it was received before the cutoff and its body is still there. Its body
becomes b"" and `purged_at` is set; the row, its deliveries, their attempt logs and the
audit trail stay. Pending, in-flight, retrying and dead deliveries keep their message's
body (a dead one may be replayed), and so do unrouted messages (no destination has them:
an operator may still need to see what arrived).

Work goes in small batches, each its own short transaction that locks its rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL: a row someone else holds is skipped (left for the
next run) rather than waited for, so live traffic is never blocked.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Mapping

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from courier.app.settings import parse_duration
from courier.app.store import audit
from courier.app.store.db import Store
from courier.app.store.models import ACCEPTED, DELIVERED, Delivery, Message, utcnow

DEFAULT_BATCH = 500
DEFAULT_INTERVAL = 3600.0  # how often the beat task runs when retention is on


@dataclass
class PurgeResult:
    cutoff: datetime
    batch: int
    dry_run: bool = False
    purged: int = 0  # bodies removed (or, in a dry run, that would be)
    batches: int = 0  # transactions that selected rows
    skipped: list[str] = field(default_factory=list)  # locked by someone else: left for the next run

    def details(self) -> dict:
        return {"cutoff": self.cutoff.isoformat(), "batch": self.batch, "purged": self.purged,
                "batches": self.batches, "skipped_locked": len(self.skipped)}


def retention_from_env(env: Mapping[str, str] | None = None) -> tuple[float | None, float]:
    """(age in seconds or None when retention is off, run interval) from COURIER_RETENTION[_INTERVAL].

    Off unless set: how long a hospital keeps messages is its policy's decision, not a default's.
    """
    env = os.environ if env is None else env
    raw = (env.get("COURIER_RETENTION") or "").strip()
    age = parse_duration(raw) if raw and raw.lower() != "off" else None
    if age is not None and age <= 0:
        raise ValueError(f"COURIER_RETENTION must be longer than zero: {raw!r}")
    interval = parse_duration(env.get("COURIER_RETENTION_INTERVAL") or DEFAULT_INTERVAL)
    return age, interval


def _eligible(cutoff: datetime, exclude: list[str]):
    """Ids of messages whose body may go, oldest first."""
    not_delivered = exists().where(Delivery.message_id == Message.id, Delivery.status != DELIVERED)
    query = (select(Message.id)
             .where(Message.status == ACCEPTED, Message.purged_at.is_(None), Message.received_at < cutoff,
                    ~not_delivered))
    if exclude:
        query = query.where(Message.id.notin_(exclude))
    return query.order_by(Message.received_at, Message.id)


def _purge_batch(session: Session, cutoff: datetime, batch: int, exclude: list[str],
                 now: datetime) -> tuple[list[str], list[str], list[str]]:
    """One transaction's work: (ids selected, ids purged, ids skipped because their deliveries are locked)."""
    ids = list(session.scalars(_eligible(cutoff, exclude).limit(batch)
                               .with_for_update(of=Message, skip_locked=True)))
    if not ids:
        return [], [], []
    # Lock the deliveries too: a replay (which locks them) then either finished before us
    # (and the status re-read below sees it) or waits and finds the message purged.
    total = dict(session.execute(select(Delivery.message_id, func.count())
                                 .where(Delivery.message_id.in_(ids)).group_by(Delivery.message_id)).all())
    locked: dict[str, list[str]] = {}
    for message_id, status in session.execute(select(Delivery.message_id, Delivery.status)
                                              .where(Delivery.message_id.in_(ids))
                                              .with_for_update(skip_locked=True)):
        locked.setdefault(message_id, []).append(status)
    purge = [i for i in ids if len(locked.get(i, ())) == total.get(i, 0) and all(s == DELIVERED for s in locked[i])]
    skipped = [i for i in ids if len(locked.get(i, ())) < total.get(i, 0)]
    if purge:
        session.execute(update(Message).where(Message.id.in_(purge))
                        .values(body=b"", purged_at=now).execution_options(synchronize_session=False))
    return ids, purge, skipped


def purge(store: Store, older_than: float, *, actor: str, batch: int = DEFAULT_BATCH, dry_run: bool = False,
          pause: float = 0.0, record_empty: bool = True, now: datetime | None = None,
          on_batch: Callable[[int], None] | None = None) -> PurgeResult:
    """Remove bodies of messages received more than `older_than` seconds ago and delivered everywhere.

    Writes one audit record per run (after the batches, in its own transaction), unless the
    run removed nothing and `record_empty` is False (the beat task: no hourly empty records).
    A dry run counts what would go and changes nothing, the audit log included.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    now = now or utcnow()
    result = PurgeResult(cutoff=now - timedelta(seconds=older_than), batch=batch, dry_run=dry_run)
    if dry_run:
        with store.session() as session:
            result.purged = session.scalar(select(func.count()).select_from(_eligible(result.cutoff, []).subquery()))
        return result
    seen: list[str] = []  # selected once: not selected again this run (a skipped row would loop)
    while True:
        with store.session() as session:
            selected, purged, skipped = _purge_batch(session, result.cutoff, batch, seen, now)
        if not selected:
            break
        result.batches += 1
        result.purged += len(purged)
        result.skipped += skipped
        seen += [i for i in selected if i not in set(purged)]
        if on_batch:
            on_batch(len(purged))
        if len(selected) < batch:
            break
        if pause:
            time.sleep(pause)  # let live traffic have the disk between batches
    if result.purged or record_empty:
        with store.session() as session:
            audit.record(session, actor=actor, action="purge", target=f"message bodies received before "
                         f"{result.cutoff.isoformat(timespec='seconds')}", details=result.details())
    return result


__all__ = ["purge", "retention_from_env", "PurgeResult", "DEFAULT_BATCH", "DEFAULT_INTERVAL"]
