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

What each delivery costs the database (docs/design.md, "The hot path"): three row
versions: the insert at ingest, the claim (which also counts the attempt and sets
the lease, so the worker's first transaction only reads), and the outcome, written
for a whole batch by one statement, with one attempt-log row.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Mapping

from sqlalchemy import LargeBinary, and_, bindparam, func, or_, select, text, type_coerce, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, defer

from courier.app.settings import Destination, RetryPolicy
from courier.app.store import audit, circuits, crypto, ordering
from courier.app.store.models import (ACCEPTED, DEAD, DELIVERED, IN_FLIGHT, OPEN_STATUSES, PENDING, RETRYING, UNROUTED,
                                      Attempt, Circuit, Delivery, Message, MessageLink, is_open, new_id, utcnow)

log = logging.getLogger("courier.outbox")
NOTIFY_CHANNEL = "courier_outbox"
NOTIFY_EVERY = 0.05  # seconds: ingest wakes the relay at most this often per process (_notify_new)
DETAIL_LIMIT = 1000  # characters of an attempt's detail kept in the log
KEY_RECHECK = timedelta(minutes=5)  # a body this worker cannot decrypt: when to look again
LEASE_MARGIN = 30.0  # seconds beyond a send's timeout when a lease is renewed or extended


@dataclass(frozen=True)
class NewMessage:
    source: str
    message_type: str
    content_type: str
    body: bytes
    dedup_key: str | None
    correlation_id: str | None = None


@dataclass(frozen=True)
class StoredDelivery:
    id: str
    destination: str
    status: str


@dataclass(frozen=True)
class Stored:
    """A message as `accept` stored it, or found it (a duplicate): what the caller reports back."""

    id: str
    type: str
    status: str
    deliveries: list[StoredDelivery]


def accept(session: Session, new: NewMessage, destinations: list[str],
           order_keys: Mapping[str, str | None] | None = None) -> tuple[Stored, bool]:
    """Store a message with a pending delivery per destination; `(existing, False)` for a duplicate.

    Duplicates are found by (source, dedup_key): the insert is `ON CONFLICT DO NOTHING`, so
    of two concurrent duplicates the second waits for the first's commit and inserts nothing
    (no savepoint, no exception), and then reads the first's row.

    `order_keys` maps ordered destinations to this message's key (courier.app.store.ordering; stored as
    `ordering.stored` makes it: a pseudonym under encryption at rest); the relay
    sends one key's deliveries in id order, so their ids must follow acceptance order.
    Core statements, not ORM objects: this is the hot path of every ingest.
    """
    ring = crypto.ring_for(session)
    keys = {d: ordering.stored(k, ring) for d, k in (order_keys or {}).items() if d in destinations and k is not None}
    # docs/design.md, pitfall 8, for ordered keys: ids are made before commit, so two concurrent ingests of
    # one key could commit out of id order, and the relay could send the later one before
    # the earlier one is even visible. PostgreSQL: an advisory lock per (destination, key),
    # held until commit, makes them take turns, so an id is made only after every earlier
    # delivery of its key has committed. SQLite needs none: BEGIN IMMEDIATE (app/store/db.py)
    # already runs one writing transaction at a time.
    ordering.lock(session, keys.items())
    now = utcnow()
    message_id = new_id()
    status = ACCEPTED if destinations else UNROUTED
    dialect = session.get_bind().dialect.name
    conn = session.connection()
    values = dict(id=message_id, source=new.source, type=new.message_type, content_type=new.content_type,
                  body=new.body, size=len(new.body), dedup_key=new.dedup_key,
                  correlation_id=new.correlation_id or message_id, status=status, received_at=now)
    if new.dedup_key is None:
        conn.execute(_insert_message(dialect, dedup=False), values)
    elif conn.execute(_insert_message(dialect, dedup=True), values).first() is None:
        return _duplicate(session, new), False
    ids = [ordering.next_id(session, d, keys[d]) if d in keys else new_id() for d in destinations]
    if destinations:
        params = {"message_id": message_id, "now": now}
        for i, (delivery_id, name) in enumerate(zip(ids, destinations)):
            params.update({f"id_{i}": delivery_id, f"destination_{i}": name, f"order_key_{i}": keys.get(name)})
        conn.execute(_insert_deliveries(len(destinations)), params)
        _notify_new(session)
    return Stored(message_id, new.message_type, status,
                  [StoredDelivery(i, d, PENDING) for i, d in zip(ids, destinations)]), True


# The ingest statements are built once and reused: building a statement costs more than running it.

@lru_cache(maxsize=None)
def _insert_message(dialect: str, *, dedup: bool):
    stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(Message.__table__)
    return stmt.on_conflict_do_nothing(index_elements=["source", "dedup_key"]).returning(
        Message.__table__.c.id) if dedup else stmt


@lru_cache(maxsize=64)
def _insert_deliveries(count: int):
    """One multi-row INSERT of `count` pending deliveries of one message (parameters `id_<i>`, ...).

    Text, not insert().values([...]): SQLAlchemy cannot cache the compiled form of a multi-row
    VALUES and compiled it for every message (a tenth of the web process's CPU); an executemany
    costs psycopg a pipeline per message instead.
    """
    rows = ", ".join(f"(:id_{i}, :message_id, :destination_{i}, '{PENDING}', 0, 0, :now, :now, :now, :order_key_{i})"
                     for i in range(count))
    columns = "id, message_id, destination, status, attempts, dispatches, due_at, created_at, updated_at, order_key"
    sql = f"INSERT INTO {Delivery.__tablename__} ({columns}) VALUES {rows}"  # nosec B608  # our names, no input
    return text(sql).bindparams(bindparam("now", type_=Delivery.__table__.c.due_at.type))


_NOTIFY = text(f"NOTIFY {NOTIFY_CHANNEL}")


def _notify(session: Session) -> None:
    """Wake the relay at commit (PostgreSQL LISTEN/NOTIFY; SQLite relays poll)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_NOTIFY)


_last_notify = 0.0


def _notify_new(session: Session) -> None:
    """`_notify` for a new message, at most once per NOTIFY_EVERY per process.

    PostgreSQL holds one lock per database from a notifying transaction's commit until its WAL
    flush, so a NOTIFY in every ingest serialised all ingests' commits (measured: a third of
    the busy database connections waited on it). A message that skips its NOTIFY is claimed on
    the relay's round after the one the earlier NOTIFY started: the relay polls every
    BUSY_POLL (twice NOTIFY_EVERY) for as long as its rounds find work.
    """
    global _last_notify
    now = time.monotonic()
    # Not "now - last >= NOTIFY_EVERY": a clock that went back (a frozen clock in tests) would
    # silence the NOTIFYs for good. Two threads racing here send two NOTIFYs: harmless.
    if not 0 <= now - _last_notify < NOTIFY_EVERY:
        _last_notify = now
        _notify(session)


def _duplicate(session: Session, new: NewMessage) -> Stored:
    """The stored message that `new` duplicates (its insert just found the conflict)."""
    # Not the body: the answer does not need it, and decrypting it would cost (or fail) for nothing.
    message = session.scalars(select(Message).options(defer(Message.body)).where(
        Message.source == new.source, Message.dedup_key == new.dedup_key)).one()
    return Stored(message.id, message.type, message.status,
                  [StoredDelivery(d.id, d.destination, d.status) for d in message.deliveries])


@dataclass(frozen=True)
class Claimed:
    delivery_id: str
    destination: str
    dispatch: int


def claim_due(session: Session, *, lease: float, limit: int, now: datetime | None = None) -> list[Claimed]:
    """Mark up to `limit` due deliveries in flight for `lease` seconds and return them.

    The claim counts the attempt it dispatches (a dispatch that is never sent gives it back:
    `release`, `begin_attempts`), so the worker's first transaction only reads; and a message
    that kills its worker every time still runs out of attempts.
    PostgreSQL: FOR UPDATE SKIP LOCKED, so several relays share the work and never take the
    same row. SQLite: the store opens every transaction with BEGIN IMMEDIATE, one writer at a time.

    A delivery with an order key waits while an earlier one of its key is open (pending, in
    flight or retrying), so at most one per key is out at a time and they go in id order.
    """

    now = now or utcnow()
    rows = session.execute(_claim_statement(), {"now": now, "lease_end": now + timedelta(seconds=lease),
                                                "limit": limit}).all()
    return [Claimed(*row) for row in rows]


@lru_cache(maxsize=None)
def _claim_statement():
    """claim_due's statement, built once (the relay runs it every round)."""
    now = bindparam("now")
    held = select(Circuit.destination).where(or_(
        Circuit.paused_at.is_not(None), and_(Circuit.state == circuits.OPEN, Circuit.open_until > now)))
    due = (select(Delivery.id)
           .where(is_open(Delivery.status), Delivery.due_at <= now, Delivery.destination.not_in(held),
                  ordering.first_in_line())
           .order_by(Delivery.due_at).limit(bindparam("limit"))
           .with_for_update(skip_locked=True))
    return (update(Delivery)
            .where(Delivery.id.in_(due.scalar_subquery()))
            .values(status=IN_FLIGHT, due_at=bindparam("lease_end"), dispatches=Delivery.dispatches + 1,
                    attempts=Delivery.attempts + 1, updated_at=now)
            .returning(Delivery.id, Delivery.destination, Delivery.dispatches)
            .execution_options(synchronize_session=False))


def release(session: Session, claimed: list[Claimed], now: datetime | None = None) -> None:
    """Make claimed deliveries due again at once, their attempt given back (their publish failed)."""
    if claimed:
        now = now or utcnow()
        session.execute(_give_back(), [{"b_id": c.delivery_id, "b_dispatch": c.dispatch, "b_due": now,
                                        "b_now": now, "b_error": None} for c in claimed])


@lru_cache(maxsize=None)
def _give_back():
    """Back to retrying, due at `b_due`, the claim's attempt not spent; fenced by the dispatch (no row lock)."""
    table = Delivery.__table__
    return (update(table)
            .where(table.c.id == bindparam("b_id"), table.c.status == IN_FLIGHT,
                   table.c.dispatches == bindparam("b_dispatch"))
            .values(status=RETRYING, attempts=table.c.attempts - 1, due_at=bindparam("b_due"),
                    last_error=func.coalesce(bindparam("b_error", type_=Delivery.last_error.type), table.c.last_error),
                    updated_at=bindparam("b_now")))


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
    received_at: datetime | None = None  # the message's acceptance: the latency metric's start
    lease_until: datetime | None = None  # the claim's lease: after it, another dispatch may take the delivery


def begin_attempt(session: Session, delivery_id: str, dispatch: int, destinations: Mapping[str, Destination],
                  *, redelivered: bool = False, now: datetime | None = None) -> Ticket | str:
    """`begin_attempts` for one delivery: its Ticket, or why not ("skipped", "waiting", "dead")."""
    tickets, refused = begin_attempts(session, [(delivery_id, dispatch)], destinations, redelivered=redelivered,
                                      now=now)
    return tickets[0] if tickets else refused[delivery_id]


def begin_attempts(session: Session, items: list[tuple[str, int]], destinations: Mapping[str, Destination],
                   *, redelivered: bool = False, now: datetime | None = None) -> tuple[list[Ticket], dict[str, str]]:
    """The Tickets of the (delivery id, dispatch) pairs that this dispatch still owns and whose circuit lets go.

    Returns the Tickets to send, in id order, and for the others why not: "skipped" (not ours),
    "waiting" (circuit open or destination paused: back to retrying until then, the claim's
    attempt given back; also a body this worker cannot decrypt, see below) or "dead" (budget
    spent). One read for the whole batch, and no write unless one is refused: the claim already
    counted the attempt and set the lease (`claim_due`).

    A task whose delivery is finished, or that a newer dispatch superseded, is a no-op: that
    is what makes a redelivered or duplicated task harmless. No row lock is needed for it:
    every write after this one is fenced by (status, dispatch). A message that kills its
    worker every time still runs out of attempts, as each claim counted one: when the budget
    is spent by attempts that never finished, the delivery goes dead here.

    `redelivered`: RabbitMQ handed this task out again because the worker running it died (a
    poison message kills it every time): the claim's attempt was spent by that death, so each
    ticket counts a new one and its lease is renewed, in one fenced UPDATE. This is the only
    write of a normal begin, and it happens only after a crash.

    A body encrypted under a key this worker lacks (COURIER_ENCRYPTION_KEY differs between
    processes, e.g. mid-rotation) is the worker's fault, not the message's or the destination's:
    the delivery waits KEY_RECHECK with the key id in last_error, spends no attempt and feeds no
    breaker, so a configuration slip never turns deliveries dead; a worker with the key takes it.
    """
    now = now or utcnow()
    dispatch_of = dict(items)
    rows = session.connection().execute(_tickets_statement(), {"ids": list(dispatch_of)}).all()
    refused = {delivery_id: "skipped" for delivery_id in dispatch_of}
    candidates: dict[str, list] = {}
    given_back = []  # (row, due, reason): back to retrying, attempt not spent

    spent = 1 if redelivered else 0  # attempts this dispatch spent before now, beyond the claim's

    def dead(row, reason):
        _fenced(session, row.id, row.dispatches, status=DEAD, due_at=None, updated_at=now, last_error=reason,
                attempts=row.attempts + spent - 1)
        refused[row.id] = DEAD

    for row in rows:
        if row.status != IN_FLIGHT or row.dispatches != dispatch_of[row.id]:
            continue
        destination = destinations.get(row.destination)
        if destination is None:
            dead(row, f"destination {row.destination!r} is no longer configured")
            continue
        if row.attempts + spent > destination.retry.max_attempts:
            dead(row, f"gave up: attempt {row.attempts + spent - 1} of {destination.retry.max_attempts} never "
                      "finished (the worker died or lost the store while sending)")
            continue
        try:
            body = crypto.ring_for(session).unseal(row.body)
        except crypto.Unreadable as exc:
            log.error("delivery %s: cannot decrypt its message's body: %s", row.id, exc)
            given_back.append((row, now + KEY_RECHECK,
                               f"{circuits.WAITING}this worker cannot decrypt the message body: {exc}"))
            continue
        candidates.setdefault(row.destination, []).append((row, body))
    tickets = []
    for name, group in candidates.items():
        destination = destinations[name]
        admission = None
        for row, body in group:
            # A "go" covers the rest of the batch (the circuit is closed); a half-open circuit
            # admits a single probe, and asking again for the others tells them to wait for it.
            if admission is not circuits.GO:
                admission = circuits.admit(session, destination, row.id, now)
            if admission.verdict == "wait":  # held back by the breaker or a pause: no attempt is spent
                given_back.append((row, admission.until, admission.reason))
                continue
            refused.pop(row.id)
            lease = now + timedelta(seconds=destination.timeout * (len(tickets) + 1) + LEASE_MARGIN) \
                if redelivered else row.due_at
            tickets.append(Ticket(row.id, row.dispatches, row.attempts + spent, name, row.message_id, row.source,
                                  row.type, row.content_type, body, row.correlation_id, order_key=row.order_key,
                                  received_at=row.received_at, lease_until=lease))
    if redelivered and tickets:
        table = Delivery.__table__
        session.execute(update(table).where(
            table.c.id == bindparam("b_id"), table.c.status == IN_FLIGHT, table.c.dispatches == bindparam("b_dispatch"),
        ).values(attempts=bindparam("b_attempts"), due_at=bindparam("b_due"), updated_at=now),
            [{"b_id": t.delivery_id, "b_dispatch": t.dispatch, "b_attempts": t.number, "b_due": t.lease_until}
             for t in tickets])
    if given_back:
        session.execute(_give_back(), [{"b_id": row.id, "b_dispatch": row.dispatches, "b_due": due, "b_now": now,
                                        "b_error": reason[:DETAIL_LIMIT]} for row, due, reason in given_back])
        refused.update({row.id: "waiting" for row, _, _ in given_back})
    return tickets, refused


@lru_cache(maxsize=None)
def _tickets_statement():
    """begin_attempts' read: the deliveries and what their attempt needs of their messages (built once)."""
    return (select(Delivery.id, Delivery.dispatches, Delivery.status, Delivery.attempts, Delivery.destination,
                   Delivery.order_key, Delivery.due_at, Message.id.label("message_id"), Message.source, Message.type,
                   Message.content_type,
                   # Raw: decrypted row by row, so one unreadable body does not fail the batch.
                   type_coerce(Message.body, LargeBinary).label("body"), Message.correlation_id, Message.received_at)
            .join(Message, Delivery.message_id == Message.id)
            .where(Delivery.id.in_(bindparam("ids", expanding=True)))
            .order_by(Delivery.id))


def extend_lease(session: Session, ticket: Ticket, seconds: float, now: datetime | None = None) -> bool:
    """Keep a delivery in flight for `seconds` more, if this ticket's dispatch still owns it."""
    now = now or utcnow()
    return _fenced(session, ticket.delivery_id, ticket.dispatch, due_at=now + timedelta(seconds=seconds))


def _fenced(session: Session, delivery_id: str, dispatch: int, **values) -> bool:
    """Update a delivery only if it is still in flight under `dispatch` (no row lock is held); True if it was."""
    return session.execute(update(Delivery).where(Delivery.id == delivery_id, Delivery.status == IN_FLIGHT,
                                                  Delivery.dispatches == dispatch).values(**values)
                           .execution_options(synchronize_session=False)).rowcount == 1


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
    """`finish_attempts` for one attempt; returns the delivery's status ("superseded" if no longer ours)."""
    return finish_attempts(session, destination, [(ticket, outcome)], now=now)[ticket.delivery_id]


def finish_attempts(session: Session, destination: Destination, results: list[tuple[Ticket, Outcome | None]],
                    now: datetime | None = None) -> dict[str, str]:
    """Log each attempt, move its delivery on and feed the circuit breaker; returns {delivery id: status}.

    An outcome of None means the ticket was never sent (an earlier one of its batch failed):
    its attempt is given back and it is due again at once, for the breaker to decide on.
    Guarded by (status, dispatch): if the lease expired and another dispatch took over, this
    worker's result is still logged, and a success still counts (the destination has it).
    Successes are one UPDATE for the batch; retries and dead ends one each.
    """
    now = now or utcnow()
    policy = destination.retry
    attempts = [dict(delivery_id=t.delivery_id, number=t.number, started_at=o.started_at, duration_ms=o.duration_ms,
                     outcome=o.result, status_code=o.status_code, detail=o.detail[:DETAIL_LIMIT])
                for t, o in results if o is not None]
    conn = session.connection()  # Core statements built once: this runs for every batch
    if attempts:
        conn.execute(_insert_attempts(len(attempts)),
                     {f"{key}_{i}": value for i, row in enumerate(attempts) for key, value in row.items()})
    statuses: dict[str, str] = {}
    delivered = [t.delivery_id for t, o in results if o is not None and o.result == "delivered"]
    if delivered:
        done = set(conn.execute(_DELIVERED, {"ids": delivered, "now": now}).scalars())
        statuses.update({i: DELIVERED if i in done else "superseded" for i in delivered})
    for ticket, outcome in results:
        if ticket.delivery_id in statuses:
            continue
        if outcome is None:
            status, values = RETRYING, dict(due_at=now, attempts=Delivery.attempts - 1)
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
        changed = _fenced(session, ticket.delivery_id, ticket.dispatch, status=status, updated_at=now, **values)
        statuses[ticket.delivery_id] = status if changed else "superseded"
    closed, previous = False, None
    for ticket, outcome in results:
        if outcome is None or (outcome.result != "temporary" and previous not in (None, "temporary")):
            continue  # a second answer in a row changes nothing the first did not (and costs a read)
        previous = outcome.result
        if circuits.record(session, destination, ticket.delivery_id, outcome.result, outcome.detail,
                           now) == circuits.CLOSED:
            closed = True
    if closed:
        wake(session, destination.name, now)
    if any(t.order_key is not None and statuses[t.delivery_id] in (DELIVERED, DEAD) for t, _ in results):
        _notify(session)  # the next delivery of these keys is claimable now: wake the relay
    return statuses


# A success counts whichever dispatch reported it: the destination has the message.
_DELIVERED = (update(Delivery.__table__)
              .where(Delivery.__table__.c.id.in_(bindparam("ids", expanding=True)),
                     is_open(Delivery.__table__.c.status))
              .values(status=DELIVERED, due_at=None, delivered_at=bindparam("now"), last_error=None,
                      updated_at=bindparam("now"))
              .returning(Delivery.__table__.c.id))


@lru_cache(maxsize=64)
def _insert_attempts(count: int):
    """One multi-row INSERT of `count` attempt-log rows (parameters `delivery_id_<i>`, ...), cached per count."""
    columns = ("delivery_id", "number", "started_at", "duration_ms", "outcome", "status_code", "detail")
    rows = ", ".join("(" + ", ".join(f":{c}_{i}" for c in columns) + ")" for i in range(count))
    table = Attempt.__table__
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {rows}"  # nosec B608  # our names, no input
    return text(sql).bindparams(*(bindparam(f"{c}_{i}", type_=table.c[c].type)
                                  for i in range(count) for c in ("started_at", "detail")))


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
    """A message with its deliveries and their attempt logs (not its body, which no trace shows)."""
    return session.get(Message, message_id, options=[defer(Message.body)])


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
    # A message whose body retention purged has nothing left to send: its deliveries stay as they are.
    chosen = chosen.where(~select(Message.id).where(Message.id == Delivery.message_id,
                                                    Message.purged_at.is_not(None)).exists())
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


def reset_circuit(session: Session, name: str, *, actor: str, reason: str = "",
                  now: datetime | None = None) -> str | None:
    """Close `name`'s circuit by hand and make the deliveries it held due at once; the state it was in."""
    before = circuits.reset(session, name, actor, now)
    woken = wake(session, name, now) if before not in (None, circuits.CLOSED) else 0
    audit.record(session, actor=actor, action="circuit_reset", target=name, reason=reason,
                 details={"was": before or circuits.CLOSED, "woken": woken})
    return before


def link_resend(session: Session, new_id: str, original_id: str, *, actor: str, reason: str = "") -> None:
    """Record that message `new_id` is an edited copy of `original_id` sent again (which stays as it was)."""
    session.add(MessageLink(message_id=new_id, original_id=original_id, actor=actor[:audit.ACTOR_LIMIT]))
    audit.record(session, actor=actor, action="resend", target=original_id, reason=reason,
                 details={"new_message_id": new_id})


__all__ = ["accept", "claim_due", "release", "begin_attempt", "begin_attempts", "extend_lease", "finish_attempt", "finish_attempts", "wake", "trace", "retry_delay",
           "replay", "pause_destination", "resume_destination", "destination_summary", "reset_circuit", "link_resend", "NewMessage", "Claimed",
           "Ticket", "Outcome", "Stored", "NOTIFY_CHANNEL", "DEAD", "DELIVERED", "REPLAYABLE", "REPLAY_LIMIT"]
