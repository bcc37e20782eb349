"""The store's tables: messages, their deliveries, the attempt log, API tokens.

Only `courier.app.store.outbox` changes a delivery's status; everything else reads.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone

from sqlalchemy import (BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, TypeDecorator,
                        UniqueConstraint, literal_column, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from courier.app.store.crypto import EncryptedBytes, EncryptedText

# Stable constraint names, so Alembic migrations can drop and alter them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Delivery statuses (docs/api.md). The first three are "open": the relay may still act on them.
PENDING, IN_FLIGHT, RETRYING, DELIVERED, DEAD = "pending", "in_flight", "retrying", "delivered", "dead"
OPEN_STATUSES = (PENDING, IN_FLIGHT, RETRYING)

# Message statuses: accepted with deliveries, or stored with none because no route matched.
ACCEPTED, UNROUTED = "accepted", "unrouted"

# Prefix of a delivery's last_error while a circuit breaker or a pause holds it back (courier.app.store.circuits):
# kept readable when last_error is encrypted, as outbox.wake selects by it.
WAITING = "waiting: "

BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite only autoincrements INTEGER PRIMARY KEY


def is_open(status: ColumnElement) -> ColumnElement[bool]:
    """`status IN ('pending', 'in_flight', 'retrying')` with the values written into the SQL.

    The partial indexes on open deliveries have this list as their predicate, and PostgreSQL
    can use them only if it sees the values: bound as parameters, a prepared statement's generic
    plan (psycopg prepares a statement after five runs) cannot, and the relay's claim turned
    into a scan of the whole table with an anti-join per row (measured: 20 s per claim at
    50,000 rows, the relay stalled).
    """
    return status.in_([literal_column(f"'{s}'") for s in OPEN_STATUSES])


class UtcDateTime(TypeDecorator):
    """DateTime(timezone=True) that reads back aware: SQLite stores no zone and returns naive
    values (always UTC here), which Python refuses to compare with aware ones."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A UUIDv7-style id: time-ordered, so new rows land at the right edge of the primary-key index."""
    ms = time.time_ns() // 1_000_000
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    digits = raw.hex()  # str(uuid.UUID(bytes=raw)), without building the UUID (three ids per message stored)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime()}


class Message(Base):
    __tablename__ = "courier_messages"
    __table_args__ = (
        UniqueConstraint("source", "dedup_key", name="uq_courier_messages_source_dedup_key"),
        Index("ix_courier_messages_received_at", "received_at"),
        Index("ix_courier_messages_source_received_at", "source", "received_at"),
        # Two statuses, and accepted ones are found by received_at: only the unrouted ones need an index.
        Index("ix_courier_messages_unrouted", "received_at", postgresql_where=text("status = 'unrouted'"),
              sqlite_where=text("status = 'unrouted'")),
        Index("ix_courier_messages_type_received_at", "type", "received_at"),
        # GET /api/v1/messages?idempotency_key=... without a source: the unique index leads with source.
        Index("ix_courier_messages_dedup_key", "dedup_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    source: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(128))
    content_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(EncryptedBytes)  # encrypted when COURIER_ENCRYPTION_KEY is set
    size: Mapped[int] = mapped_column(Integer)
    # Idempotency-Key header, event id or MSH-10; NULL means "no duplicate detection".
    dedup_key: Mapped[str | None] = mapped_column(String(255))
    correlation_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when retention removed the body (now b""); the row, its deliveries and attempts stay.
    purged_at: Mapped[datetime | None] = mapped_column()

    deliveries: Mapped[list["Delivery"]] = relationship(back_populates="message", order_by="Delivery.destination")


class Delivery(Base):
    __tablename__ = "courier_deliveries"
    __table_args__ = (
        # The relay's query: open deliveries whose due time has come. A partial index stays
        # as small as the backlog, however many millions of delivered rows pile up.
        Index("ix_courier_deliveries_due", "due_at",
              postgresql_where=text("status IN ('pending', 'in_flight', 'retrying')"),
              sqlite_where=text("status IN ('pending', 'in_flight', 'retrying')")),
        Index("ix_courier_deliveries_destination_status", "destination", "status"),
        Index("ix_courier_deliveries_message_id", "message_id"),
        # Ordered destinations: the relay asks "is there an earlier open delivery with my key?"
        Index("ix_courier_deliveries_order", "destination", "order_key", "id",
              postgresql_where=text("order_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying')"),
              sqlite_where=text("order_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying')")),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    message_id: Mapped[str] = mapped_column(ForeignKey("courier_messages.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Incremented by every relay dispatch; a task carries the number it was sent with, so a
    # stale duplicate (an expired lease dispatched again) is recognised and ignored.
    dispatches: Mapped[int] = mapped_column(Integer, default=0)
    # pending/retrying: when the next attempt is due; in_flight: when the lease expires; else NULL.
    due_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(EncryptedText(clear_prefix=WAITING))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()
    # For destinations with `ordered_by`: deliveries with the same key go out in acceptance order.
    order_key: Mapped[str | None] = mapped_column(String(255))

    message: Mapped[Message] = relationship(back_populates="deliveries")
    attempt_log: Mapped[list["Attempt"]] = relationship(order_by="Attempt.id", viewonly=True)


class Attempt(Base):
    __tablename__ = "courier_attempts"
    __table_args__ = (Index("ix_courier_attempts_delivery_id", "delivery_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("courier_deliveries.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    duration_ms: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered | temporary | permanent
    status_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(EncryptedText, default="")


class Circuit(Base):
    """One row per destination: its breaker and its pause switch, shared by every worker process."""

    __tablename__ = "courier_circuits"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="closed")  # closed | open | half_open
    failures: Mapped[int] = mapped_column(Integer, default=0)  # consecutive temporary failures
    trips: Mapped[int] = mapped_column(Integer, default=0)  # consecutive openings; open_for grows with it
    open_until: Mapped[datetime | None] = mapped_column()
    probe_delivery_id: Mapped[str | None] = mapped_column(String(36))
    probe_until: Mapped[datetime | None] = mapped_column()
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(EncryptedText)
    paused_at: Mapped[datetime | None] = mapped_column()
    paused_by: Mapped[str | None] = mapped_column(String(128))
    pause_reason: Mapped[str | None] = mapped_column(Text)


class AuditRecord(Base):
    """Append-only log of operator actions: who did what, to what, when and why."""

    __tablename__ = "courier_audit"
    __table_args__ = (Index("ix_courier_audit_at", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[str] = mapped_column(Text, default="{}")  # JSON


class ApiToken(Base):
    __tablename__ = "courier_api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), default="")
    source: Mapped[str | None] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))  # ingest | operate | admin
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class RateLimitState(Base):
    """One row per rate-limited source: its GCRA theoretical arrival time (courier.app.store.ratelimit).

    Shared by every web worker and MLLP listener through the store, so a source's limit holds
    however many processes or hosts take its messages. Created on the source's first message.
    """

    __tablename__ = "courier_rate_limits"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Microseconds since the epoch on the store's clock; integers, so the arithmetic in SQL is exact.
    tat: Mapped[int] = mapped_column(BigInteger)


class PatientKey(Base):
    """A message's patient identifier as a keyed hash, for the console's search (courier.app.store.search).

    Never the identifier itself: HMAC-SHA256 under COURIER_PSEUDONYM_KEY of PID-3.1 (HL7) or the
    event's data.patient (JSON), written with the message. The index is (key, received_at), so a
    patient's messages come newest first without touching the rest of the table.
    """

    __tablename__ = "courier_patient_keys"
    __table_args__ = (Index("ix_courier_patient_keys_key_received_at", "patient_key", "received_at"),)

    message_id: Mapped[str] = mapped_column(ForeignKey("courier_messages.id", ondelete="CASCADE"), primary_key=True)
    patient_key: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class MessageLink(Base):
    """A message made by editing another and sending it again (the console's edit-then-resend).

    The original is never changed; this row says which message the new one replaces and who made it.
    """

    __tablename__ = "courier_message_links"
    __table_args__ = (Index("ix_courier_message_links_original_id", "original_id"),)

    message_id: Mapped[str] = mapped_column(ForeignKey("courier_messages.id", ondelete="CASCADE"), primary_key=True)
    original_id: Mapped[str] = mapped_column(ForeignKey("courier_messages.id", ondelete="CASCADE"))
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsoleSession(Base):
    """A console login (courier.app.web.console): the SHA-256 of the cookie's random value, never the value.

    Kept in the store, not in a signed cookie, so a logout or a revoked token ends it at once in every
    web process, and it survives restarts without a shared signing secret.
    """

    __tablename__ = "courier_console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie value
    token_id: Mapped[str] = mapped_column(ForeignKey("courier_api_tokens.id", ondelete="CASCADE"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertState(Base):
    """One row per alert rule (courier.app.store.alerts): firing or not, since when, the last value seen."""

    __tablename__ = "courier_alerts"

    rule: Mapped[str] = mapped_column(String(128), primary_key=True)
    firing: Mapped[bool] = mapped_column(default=False)
    since: Mapped[datetime | None] = mapped_column()
    value: Mapped[float | None] = mapped_column()  # Double (the default for float), as migration 0006 makes it
    summary: Mapped[str] = mapped_column(Text, default="")
    checked_at: Mapped[datetime | None] = mapped_column()
    notified_at: Mapped[datetime | None] = mapped_column()
