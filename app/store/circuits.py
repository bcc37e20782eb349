"""The circuit breaker and pause switch of each destination, shared by every worker through the store.

One row per destination (created on its first failure or pause). The breaker:

    closed --failure_threshold temporary failures in a row--> open (for open_for, doubling per trip)
    open --open_for passed, next attempt--> half_open: that attempt is the only probe (row lock)
    half_open --probe succeeds--> closed        --probe fails--> open again, for longer

Permanent errors mean the destination answered, so they count as success here.
A closed, unpaused destination costs one primary-key read per attempt and no
lock, so the breaker does not serialise the workers of a healthy destination.
This module is the only writer of `courier_circuits`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from courier.app.settings import Destination
from courier.app.store.models import WAITING, Circuit, utcnow

log = logging.getLogger("courier.circuit")
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
PROBE_MARGIN = 30.0  # seconds beyond the destination timeout before a lost probe is replaced
PAUSE_RECHECK = timedelta(hours=1)  # a paused destination's deliveries look again this often (resume wakes them)


@dataclass(frozen=True)
class Admission:
    """May this attempt go? "go", "probe" (the one half-open attempt) or "wait" until `until`."""

    verdict: str
    until: datetime | None = None
    reason: str = ""


GO = Admission("go")


def _row(session: Session, name: str) -> Circuit | None:
    """The destination's row, locked: for the decisions that change it."""
    return session.get(Circuit, name, with_for_update=True, populate_existing=True)


# The quick look every attempt takes (no lock, no ORM object): is there anything to decide at all?
_GLANCE = select(Circuit.state, Circuit.failures, Circuit.paused_at).where(Circuit.destination == bindparam("name"))


def _glance(session: Session, name: str):
    return session.connection().execute(_GLANCE, {"name": name}).first()


def _ensure_row(session: Session, name: str) -> Circuit:
    """The destination's row, created if missing (concurrent creators both succeed), locked."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(Circuit).values(destination=name, state=CLOSED, failures=0, trips=0,
                                           changed_at=utcnow()).on_conflict_do_nothing())
    return _row(session, name)


def _change(row: Circuit, state: str, now: datetime, why: str) -> None:
    log.warning("circuit %s: %s -> %s (%s)", row.destination, row.state, state, why)
    row.state, row.changed_at = state, now


def admit(session: Session, destination: Destination, delivery_id: str, now: datetime | None = None) -> Admission:
    """Decide whether an attempt at `delivery_id` may be made now."""
    now = now or utcnow()
    row = _glance(session, destination.name)
    if row is None or (row.state == CLOSED and row.paused_at is None):
        return GO
    row = _row(session, destination.name)  # exactly one probe: decide under the row lock
    if row.paused_at is not None:
        return Admission("wait", now + PAUSE_RECHECK, f"{WAITING}destination paused by {row.paused_by}: "
                                                      f"{row.pause_reason or 'no reason given'}")
    if row.state == CLOSED:
        return GO
    if row.state == OPEN and now < row.open_until:
        return Admission("wait", row.open_until, f"{WAITING}circuit open until {row.open_until.isoformat()} "
                                                 f"after {row.failures} failures; last: {row.last_error}")
    if row.state == HALF_OPEN and row.probe_until and now < row.probe_until and row.probe_delivery_id != delivery_id:
        return Admission("wait", row.probe_until, f"{WAITING}circuit half-open, a probe is in progress")
    if row.state == OPEN:
        _change(row, HALF_OPEN, now, "open_for passed; probing")
    row.probe_delivery_id = delivery_id
    row.probe_until = now + timedelta(seconds=destination.timeout + PROBE_MARGIN)
    return Admission("probe")


def record(session: Session, destination: Destination, delivery_id: str, result: str, detail: str,
           now: datetime | None = None) -> str | None:
    """Feed one attempt's result to the breaker; returns the new state if it changed."""
    now = now or utcnow()
    policy = destination.circuit
    if result != "temporary":
        row = _glance(session, destination.name)
        if row is None or (row.state == CLOSED and row.failures == 0):
            return None
        row = _row(session, destination.name)
        row.failures = 0
        if row.state == CLOSED:
            return None
        _change(row, CLOSED, now, f"attempt succeeded ({detail[:80]})")
        row.trips, row.open_until, row.probe_delivery_id, row.probe_until = 0, None, None, None
        return CLOSED
    row = _ensure_row(session, destination.name)
    row.failures += 1
    row.last_error = detail[:500]
    reopen = row.state == HALF_OPEN and row.probe_delivery_id == delivery_id
    if reopen or (row.state == CLOSED and row.failures >= policy.failure_threshold):
        row.trips += 1
        open_for = min(policy.open_for * 2 ** (row.trips - 1), max(policy.max_open_for, policy.open_for))
        _change(row, OPEN, now, f"{row.failures} failures in a row, open for {open_for:g}s; last: {detail[:80]}")
        row.open_until = now + timedelta(seconds=open_for)
        row.probe_delivery_id, row.probe_until = None, None
        return OPEN
    return None


def pause(session: Session, name: str, actor: str, reason: str, now: datetime | None = None) -> Circuit:
    """Hold every delivery to `name` until `resume`; nothing is attempted meanwhile."""
    row = _ensure_row(session, name)
    row.paused_at, row.paused_by, row.pause_reason = now or utcnow(), actor, reason
    log.warning("destination %s paused by %s: %s", name, actor, reason)
    return row


def resume(session: Session, name: str, actor: str) -> bool:
    """Lift a pause; True if there was one. The caller then wakes the held deliveries (outbox.wake).

    Decided under the row lock, so of two concurrent resumes exactly one lifts the pause.
    """
    row = _row(session, name)
    if row is None or row.paused_at is None:
        return False
    row.paused_at, row.paused_by, row.pause_reason = None, None, None
    log.warning("destination %s resumed by %s", name, actor)
    return True


def reset(session: Session, name: str, actor: str, now: datetime | None = None) -> str | None:
    """Close the breaker by hand (an operator knows the destination is back); the state it had, None if none.

    The failure count and the trips start afresh; a pause is left as it is (resume lifts that).
    """
    row = _row(session, name)
    if row is None:
        return None
    before = row.state
    if row.state != CLOSED:
        _change(row, CLOSED, now or utcnow(), f"reset by {actor}")
    row.failures, row.trips, row.open_until, row.probe_delivery_id, row.probe_until = 0, 0, None, None, None
    return before


def states(session: Session) -> dict[str, Circuit]:
    """Every destination's row (destinations without one are closed and unpaused)."""
    return {c.destination: c for c in session.scalars(select(Circuit))}


def shown_state(row: Circuit | None, now: datetime | None = None) -> str:
    """closed | open | half_open as an operator should read it: an open circuit past its time is half-open."""
    if row is None:
        return CLOSED
    if row.state == OPEN and row.open_until and (now or utcnow()) >= row.open_until:
        return HALF_OPEN
    return row.state
