"""The outbox: the only code that writes messages' deliveries and their status.

A message and one delivery per routed destination are written in the caller's
transaction, so "accepted" and "will be delivered" commit together. After
that, a delivery moves only through the functions below:

    pending --claim--> in_flight --begin_attempt/finish_attempt--> delivered
                          ^                                    \\-> retrying --(due)--> in_flight
                          +-- lease expired (claimed again)     \\-> dead

`due_at` is the one clock of an open delivery: the next attempt's time while
pending or retrying, the lease's end while in flight. The relay selects by
status and due time, never "id > last seen" (ids commit out of order).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import audit, circuits, ordering
from app.models import (ACCEPTED, DEAD, DELIVERED, IN_FLIGHT, OPEN_STATUSES, PENDING, RETRYING, UNROUTED,
                        Attempt, Circuit, Delivery, Message, new_id, utcnow)
from app.settings import Destination, RetryPolicy

NOTIFY_CHANNEL = "courier_outbox"
DETAIL_LIMIT = 1000  # characters of an attempt's detail kept in the log


@dataclass(frozen=True)
class NewMessage:
    source: str
    message_type: str
    content_type: str
    body: bytes
    dedup_key: str | None
    correlation_id: str | None = None


def accept(session: Session, new: NewMessage, destinations: list[str],
           order_keys: Mapping[str, str | None] | None = None) -> tuple[Message, bool]:
    """Store a message with a pending delivery per destination; `(existing, False)` for a duplicate.

    Duplicates are found by (source, dedup_key). Two concurrent duplicates race on the
    unique constraint: the loser's insert fails inside a savepoint (PostgreSQL makes it
    wait for the winner's commit first), and it returns the winner's row.

    `order_keys` maps ordered destinations to this message's key (app.ordering); the relay
    sends one key's deliveries in id order, so their ids must follow acceptance order.
    """

    if new.dedup_key is not None:
        existing = _find_duplicate(session, new)
        if existing is not None:
            return existing, False
    keys = {d: ordering.fit(k) for d, k in (order_keys or {}).items() if d in destinations and k is not None}
    # Pitfall 8 for ordered keys: ids are made before commit, so two concurrent ingests of
    # one key could commit out of id order, and the relay could send the later one before
    # the earlier one is even visible. PostgreSQL: an advisory lock per (destination, key),
    # held until commit, makes them take turns, so an id is made only after every earlier
    # delivery of its key has committed. SQLite needs none: BEGIN IMMEDIATE (app/db.py)
    # already runs one writing transaction at a time.
    ordering.lock(session, keys.items())
    now = utcnow()
    message_id = new_id()
    message = Message(
        id=message_id, source=new.source, type=new.message_type, content_type=new.content_type,
        body=new.body, size=len(new.body), dedup_key=new.dedup_key,
        correlation_id=new.correlation_id or message_id, status=ACCEPTED if destinations else UNROUTED,
        received_at=now,
    )
    message.deliveries = [Delivery(id=ordering.next_id(session, d, keys[d]) if d in keys else new_id(),
                                   destination=d, status=PENDING, attempts=0, dispatches=0, due_at=now,
                                   created_at=now, updated_at=now, order_key=keys.get(d)) for d in destinations]
    if session.get_bind().dialect.name == "sqlite":
        # No savepoint on SQLite: in pysqlite's default mode (a host's engine, embedding) RELEASE
        # commits the outer transaction, so a host's rollback would keep the message. No race to
        # catch either on Courier's own engine, whose BEGIN IMMEDIATE admits one writer at a time.
        session.add(message)
        session.flush()
    else:
        try:
            with session.begin_nested():
                session.add(message)
        except IntegrityError:
            existing = _find_duplicate(session, new)
            if existing is None:
                raise
            return existing, False
    if destinations:
        _notify(session)
    return message, True


def _notify(session: Session) -> None:
    """Wake the relay at commit (PostgreSQL LISTEN/NOTIFY; SQLite relays poll)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))


def _find_duplicate(session: Session, new: NewMessage) -> Message | None:
    return session.scalars(select(Message).where(
        Message.source == new.source, Message.dedup_key == new.dedup_key)).one_or_none()


@dataclass(frozen=True)
class Claimed:
    delivery_id: str
    destination: str
    dispatch: int


def claim_due(session: Session, *, lease: float, limit: int, now: datetime | None = None) -> list[Claimed]:
    """Mark up to `limit` due deliveries in flight for `lease` seconds and return them.

    PostgreSQL: FOR UPDATE SKIP LOCKED, so several relays share the work and never take the
    same row. SQLite: the store opens every transaction with BEGIN IMMEDIATE, one writer at a time.

    A delivery with an order key waits while an earlier one of its key is open (pending, in
    flight or retrying), so at most one per key is out at a time and they go in id order.
    """

    now = now or utcnow()
    held = select(Circuit.destination).where(or_(
        Circuit.paused_at.is_not(None), and_(Circuit.state == circuits.OPEN, Circuit.open_until > now)))
    due = (select(Delivery.id)
           .where(Delivery.status.in_(OPEN_STATUSES), Delivery.due_at <= now, Delivery.destination.not_in(held),
                  ordering.first_in_line())
           .order_by(Delivery.due_at).limit(limit)
           .with_for_update(skip_locked=True))
    rows = session.execute(
        update(Delivery)
        .where(Delivery.id.in_(due.scalar_subquery()))
        .values(status=IN_FLIGHT, due_at=now + timedelta(seconds=lease),
                dispatches=Delivery.dispatches + 1, updated_at=now)
        .returning(Delivery.id, Delivery.destination, Delivery.dispatches)
        .execution_options(synchronize_session=False)
    ).all()
    return [Claimed(*row) for row in rows]


def release(session: Session, claimed: list[Claimed], now: datetime | None = None) -> None:
    """Make claimed deliveries due again at once (their publish failed)."""
    now = now or utcnow()
    for c in claimed:
        session.execute(update(Delivery).where(
            Delivery.id == c.delivery_id, Delivery.status == IN_FLIGHT, Delivery.dispatches == c.dispatch,
        ).values(due_at=now, updated_at=now))


@dataclass(frozen=True)
class Ticket:
    """Permission to make one attempt: what the worker needs, detached from the session."""

    delivery_id: str
    dispatch: int
    number: int
    destination: str
    message_id: str
    source: str
    message_type: str
    content_type: str
    body: bytes
    correlation_id: str
    order_key: str | None = None


def begin_attempt(session: Session, delivery_id: str, dispatch: int, destinations: Mapping[str, Destination],
                  *, lease_margin: float, now: datetime | None = None) -> Ticket | str:
    """Start an attempt if this dispatch still owns the delivery and its circuit lets it through.

    Returns a Ticket, or why not: "skipped" (not ours), "waiting" (circuit open or destination
    paused: back to retrying until then, no attempt spent) or "dead" (budget spent).

    A task whose delivery is finished, or that a newer dispatch superseded, is a no-op: that
    is what makes a redelivered or duplicated task harmless. The attempt is counted before
    sending, so a message that kills its worker every time still runs out of attempts: when
    the budget is spent by attempts that never finished, the delivery goes dead here.
    """
    now = now or utcnow()
    delivery = session.get(Delivery, delivery_id, with_for_update=True)
    if delivery is None or delivery.status != IN_FLIGHT or delivery.dispatches != dispatch:
        return "skipped"
    destination = destinations.get(delivery.destination)
    reason = None
    if destination is None:
        reason = f"destination {delivery.destination!r} is no longer configured"
    elif delivery.attempts >= destination.retry.max_attempts:
        reason = (f"gave up: attempt {delivery.attempts} of {destination.retry.max_attempts} never finished "
                  "(the worker died or lost the store while sending)")
    if reason:
        delivery.status, delivery.due_at, delivery.updated_at, delivery.last_error = DEAD, None, now, reason
        return "dead"
    admission = circuits.admit(session, destination, delivery.id, now)
    if admission.verdict == "wait":  # held back by the breaker or a pause: no attempt is spent
        delivery.status, delivery.due_at, delivery.updated_at = RETRYING, admission.until, now
        delivery.last_error = admission.reason[:DETAIL_LIMIT]
        return "waiting"
    delivery.attempts += 1
    delivery.due_at = now + timedelta(seconds=destination.timeout + lease_margin)
    delivery.updated_at = now
    message = delivery.message
    return Ticket(delivery.id, dispatch, delivery.attempts, delivery.destination, message.id, message.source,
                  message.type, message.content_type, message.body, message.correlation_id, delivery.order_key)


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: delivered, temporary (retry) or permanent (dead)."""

    result: str  # "delivered" | "temporary" | "permanent"
    detail: str
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    retry_after: float | None = None
    throttled: bool = False  # 429 or timeout: wait at least the policy's min_wait


def retry_delay(policy: RetryPolicy, attempts: int, retry_after: float | None = None,
                rng: random.Random | random.SystemRandom = random.SystemRandom()) -> float:
    """Exponential backoff with "equal jitter", capped at `policy.max`; Retry-After is a floor."""
    ceiling = min(policy.max, policy.initial * (2 ** max(attempts - 1, 0)))
    delay = ceiling / 2 + rng.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.max))
    return delay


def finish_attempt(session: Session, ticket: Ticket, outcome: Outcome, destination: Destination,
                   now: datetime | None = None) -> str:
    """Log the attempt, move the delivery on and feed the circuit breaker; returns the delivery's status.

    Guarded by (status, dispatch): if the lease expired and another dispatch took over, this
    worker's result is still logged, and a success still counts (the destination has it).
    """
    now = now or utcnow()
    policy = destination.retry
    session.add(Attempt(delivery_id=ticket.delivery_id, number=ticket.number, started_at=outcome.started_at,
                        duration_ms=outcome.duration_ms, outcome=outcome.result,
                        status_code=outcome.status_code, detail=outcome.detail[:DETAIL_LIMIT]))
    owned = and_(Delivery.id == ticket.delivery_id, Delivery.status == IN_FLIGHT,
                 Delivery.dispatches == ticket.dispatch)
    if outcome.result == "delivered":
        status, values = DELIVERED, dict(due_at=None, delivered_at=now, last_error=None)
        owned = and_(Delivery.id == ticket.delivery_id, Delivery.status.in_(OPEN_STATUSES))
    elif outcome.result == "permanent":
        status, values = DEAD, dict(due_at=None, last_error=outcome.detail[:DETAIL_LIMIT])
    elif ticket.number >= policy.max_attempts:
        status, values = DEAD, dict(due_at=None, last_error=(
            f"gave up after {ticket.number} attempts; last: {outcome.detail}")[:DETAIL_LIMIT])
    else:
        delay = retry_delay(policy, ticket.number, outcome.retry_after)
        if outcome.throttled:
            delay = max(delay, policy.min_wait)
        status, values = RETRYING, dict(due_at=now + timedelta(seconds=delay),
                                        last_error=outcome.detail[:DETAIL_LIMIT])
    changed = session.execute(update(Delivery).where(owned).values(status=status, updated_at=now, **values)
                              .execution_options(synchronize_session=False)).rowcount
    if circuits.record(session, destination, ticket.delivery_id, outcome.result, outcome.detail, now) == \
            circuits.CLOSED:
        wake(session, destination.name, now)
    if ticket.order_key is not None and status in (DELIVERED, DEAD) and changed:
        _notify(session)  # the next delivery of this key is claimable now: wake the relay
    return status if changed else "superseded"


def wake(session: Session, destination: str, now: datetime | None = None) -> int:
    """Make the deliveries held back by a circuit or a pause due now (the circuit closed, or a resume)."""
    now = now or utcnow()
    woken = session.execute(update(Delivery).where(
        Delivery.destination == destination, Delivery.status == RETRYING, Delivery.due_at > now,
        Delivery.last_error.startswith(circuits.WAITING),
    ).values(due_at=now, updated_at=now).execution_options(synchronize_session=False)).rowcount
    if woken:
        _notify(session)
    return woken


def trace(session: Session, message_id: str) -> Message | None:
    """A message with its deliveries and their attempt logs."""
    return session.get(Message, message_id)


# --- operator actions: replay, pause, resume ----------------------------------

REPLAYABLE = (DEAD, DELIVERED)
REPLAY_LIMIT = 10_000  # rows per replay call: one call never locks a whole destination's history
AUDIT_IDS = 100  # ids kept in an audit record's details


def replay(session: Session, delivery_ids: list[str] | None = None, *, actor: str, reason: str = "",
           destination: str | None = None, status: str | None = None, since: datetime | None = None,
           until: datetime | None = None, limit: int = REPLAY_LIMIT, now: datetime | None = None) -> list[str]:
    """Make dead or delivered deliveries pending again, as if new; returns the ids replayed.

    Either `delivery_ids`, or a filter (destination, status, created_at in [since, until)),
    oldest first, at most `limit` rows: a filter that matched more is simply called again, as
    the replayed rows no longer match it. Ids that are unknown or still open are left alone and
    listed in the audit record. A replayed delivery keeps its id (so the destination sees the
    same Idempotency-Key), its attempt log and its dispatch count, so a task dispatched before
    the replay is still recognised as stale; its attempt budget starts afresh.
    One audit record per call, in the same transaction.
    """
    now = now or utcnow()
    filtered = any(v is not None for v in (destination, status, since, until))
    if delivery_ids is not None and filtered:
        raise ValueError("give delivery ids or a filter, not both")
    if delivery_ids is None and not filtered:
        raise ValueError("give delivery ids or a filter (destination, status, since, until)")
    if status is not None and status not in REPLAYABLE:
        raise ValueError(f"only {' or '.join(REPLAYABLE)} deliveries can be replayed, not {status!r}")
    if limit < 1:
        raise ValueError("limit must be at least 1")

    if delivery_ids is not None:
        ids = list(dict.fromkeys(delivery_ids))
        if len(ids) > limit:
            raise ValueError(f"{len(ids)} ids is more than the limit of {limit} per replay")
        chosen = select(Delivery.id).where(Delivery.id.in_(ids), Delivery.status.in_(REPLAYABLE))
        filter_doc: dict = {"delivery_ids": ids[:AUDIT_IDS]}
    else:
        chosen = select(Delivery.id).where(Delivery.status.in_((status,) if status else REPLAYABLE))
        if destination is not None:
            chosen = chosen.where(Delivery.destination == destination)
        if since is not None:
            chosen = chosen.where(Delivery.created_at >= since)
        if until is not None:
            chosen = chosen.where(Delivery.created_at < until)
        chosen = chosen.order_by(Delivery.created_at, Delivery.id).limit(limit)
        filter_doc = {"destination": destination, "status": status, "since": since and since.isoformat(),
                      "until": until and until.isoformat(), "limit": limit}
    # One UPDATE, however many rows. The status test is repeated outside the subquery: a row
    # that another transaction changed while we waited for its lock is re-checked, not replayed blind.
    replayed = list(session.execute(
        update(Delivery)
        .where(Delivery.id.in_(chosen.with_for_update().scalar_subquery()), Delivery.status.in_(REPLAYABLE))
        .values(status=PENDING, attempts=0, due_at=now, last_error=None, delivered_at=None, updated_at=now)
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    ).scalars())

    details: dict = {"count": len(replayed), "ids": replayed[:AUDIT_IDS], "filter": filter_doc}
    if delivery_ids is not None:
        left = [i for i in ids if i not in set(replayed)]
        found = dict(session.execute(select(Delivery.id, Delivery.status).where(Delivery.id.in_(left))).all())
        details["skipped"] = {i: found.get(i, "unknown") for i in left[:AUDIT_IDS]}
        target = ids[0] if len(ids) == 1 else f"{len(ids)} deliveries: {', '.join(ids)}"
    else:
        target = " ".join(f"{k}={v}" for k, v in filter_doc.items() if v is not None and k != "limit")
    audit.record(session, actor=actor, action="replay", target=target, reason=reason, details=details)
    if replayed:
        _notify(session)
    return replayed


def pause_destination(session: Session, name: str, *, actor: str, reason: str,
                      now: datetime | None = None) -> Circuit:
    """Hold every delivery to `name` (nothing is attempted, no attempt is spent) and log who and why."""
    before = session.get(Circuit, name)
    already = before is not None and before.paused_at is not None
    row = circuits.pause(session, name, actor, reason, now)
    audit.record(session, actor=actor, action="pause", target=name, reason=reason,
                 details={"already_paused": already})
    return row


def resume_destination(session: Session, name: str, *, actor: str, reason: str = "",
                       now: datetime | None = None) -> int | None:
    """Lift a pause and make the deliveries it held due at once; how many were woken, None if not paused."""
    was_paused = circuits.resume(session, name, actor)
    # Only when a pause was lifted: waking deliveries that an open circuit holds would
    # just make them wait again.
    woken = wake(session, name, now) if was_paused else 0
    audit.record(session, actor=actor, action="resume", target=name, reason=reason,
                 details={"was_paused": was_paused, "woken": woken})
    return woken if was_paused else None


def destination_summary(session: Session) -> dict[str, dict]:
    """Per destination with deliveries: `backlog` (open), `dead` and `last_success_at`."""
    summary: dict[str, dict] = {}
    for name, status, n in session.execute(
            select(Delivery.destination, Delivery.status, func.count())
            .where(Delivery.status.in_(OPEN_STATUSES + (DEAD,)))
            .group_by(Delivery.destination, Delivery.status)):
        row = summary.setdefault(name, {"backlog": 0, "dead": 0, "last_success_at": None})
        row["dead" if status == DEAD else "backlog"] += n
    for name, last in session.execute(select(Delivery.destination, func.max(Delivery.delivered_at))
                                      .where(Delivery.status == DELIVERED).group_by(Delivery.destination)):
        summary.setdefault(name, {"backlog": 0, "dead": 0, "last_success_at": None})["last_success_at"] = last
    return summary


__all__ = ["accept", "claim_due", "release", "begin_attempt", "finish_attempt", "wake", "trace", "retry_delay",
           "replay", "pause_destination", "resume_destination", "destination_summary", "NewMessage", "Claimed",
           "Ticket", "Outcome", "NOTIFY_CHANNEL", "DEAD", "DELIVERED", "REPLAYABLE", "REPLAY_LIMIT"]
