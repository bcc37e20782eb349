"""`courier keys rotate`: re-encrypt stored values under the first key of COURIER_ENCRYPTION_KEY.

Every column of an encrypted type (courier.app.store.crypto, used in courier.app.store.models) whose stored value is
plaintext or under another key is read raw, decrypted with the process's key ring and written
back through its column type, so it is sealed under the current key. Work goes in keyset
batches on the primary key, each its own short transaction that locks its rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL (on SQLite, BEGIN IMMEDIATE already serialises
writers): ingest and the workers go on meanwhile, and a row they hold is picked up by the
next pass. Passes repeat until one changes nothing (at most MAX_PASSES).

Order keys (`ordered_by`) are not encrypted but stored as keyed pseudonyms while a key is set
(courier.app.store.ordering.stored); keys written in the clear before encryption was turned on are replaced
by their pseudonyms here, in the same batches.

Rotating a key: put the new key first and keep the old ones in every process's
COURIER_ENCRYPTION_KEY, restart them, run `courier keys rotate` until it leaves nothing,
then drop the old keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import Column, bindparam, func, literal, select, type_coerce, update
from sqlalchemy.orm import Session

from courier.app.domain import governance
from courier.app.store import audit, crypto, ordering
from courier.app.store.db import Store
from courier.app.store.models import Base, Delivery

DEFAULT_BATCH = 500
MAX_PASSES = 3


@dataclass
class ColumnResult:
    rotated: int = 0  # values re-encrypted (or, in a dry run, that would be)
    unreadable: dict[str, int] = field(default_factory=dict)  # key id (or "corrupted") -> values left as they are
    left: int = 0  # values still not under the current key after the run (unreadable, locked, or written meanwhile)


@dataclass
class RotationResult:
    key_id: str
    batch: int
    dry_run: bool = False
    columns: dict[str, ColumnResult] = field(default_factory=dict)  # "table.column"

    @property
    def left(self) -> int:
        return sum(c.left for c in self.columns.values())

    def details(self) -> dict:
        """The audit record's details: counts and key ids, never a key or a value."""
        return {"key_id": self.key_id, "batch": self.batch,
                "columns": {name: {"rotated": c.rotated, "unreadable": c.unreadable, "left": c.left}
                            for name, c in self.columns.items()}}


def encrypted_columns() -> list[Column]:
    """The columns stored encrypted, found by type, so a new one is rotated without being listed here."""
    return sorted((c for t in Base.metadata.tables.values() for c in t.columns
                   if isinstance(c.type, (crypto.EncryptedBytes, crypto.EncryptedText))),
                  key=lambda c: (c.table.name, c.name))  # a stable order for the report


def _raw(column: Column):
    """The column as stored, bypassing its encryption."""
    return type_coerce(column, column.type.impl_instance)


def _not_current(column: Column, current_id: str) -> list:
    """SQL conditions: a non-empty value not sealed under `current_id` (clear prefix allowed)."""
    raw, marker = _raw(column), f"{crypto.PREFIX}{current_id}:"
    markers = [marker] + ([column.type.clear_prefix + marker] if getattr(column.type, "clear_prefix", "") else [])
    as_stored = (lambda m: literal(m.encode("ascii"), column.type.impl_instance)) if isinstance(
        column.type, crypto.EncryptedBytes) else (lambda m: literal(m, column.type.impl_instance))
    return [column.is_not(None), func.length(raw) > 0] + [
        func.substr(raw, 1, len(m)) != as_stored(m) for m in markers]


def _count(store: Store, column: Column, conditions: list) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(column.table).where(*conditions))


def _batch(session: Session, column: Column, raw, conditions: list, convert, after, batch: int,
           unreadable: dict) -> tuple[list, int]:
    """One transaction's work: (primary keys selected, values rewritten); notes unreadable ones."""
    (pk,) = column.table.primary_key.columns
    query = select(pk, raw).where(*conditions)
    if after is not None:
        query = query.where(pk > after)
    query = query.order_by(pk).limit(batch)
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = session.execute(query).all()
    updates = []
    for key, stored in rows:
        try:
            updates.append({"b_key": key, "b_value": convert(stored, dialect)})
        except crypto.Unreadable as exc:
            unreadable[key] = exc.key_id or "corrupted"
    if updates:  # Core, written through the column's type (an encrypted one seals under the current key)
        session.execute(update(column.table).where(pk == bindparam("b_key"))
                        .values({column.name: bindparam("b_value")}), updates)
    return [key for key, _ in rows], len(updates)


def _rewrite(store: Store, column: Column, raw, conditions: list, convert, *, batch: int, dry_run: bool,
             on_batch: Callable[[str, int], None] | None, name: str) -> ColumnResult:
    """Every value of `column` matching `conditions` rewritten as convert(stored, dialect), in keyset
    batches of their own transactions; passes repeat until one changes nothing (rows others held)."""
    done = ColumnResult()
    if dry_run:
        done.rotated = _count(store, column, conditions)
        return done
    unreadable: dict = {}  # primary key -> key id, counted once however many passes see it
    for _ in range(MAX_PASSES):
        changed, after = 0, None
        while True:
            with store.session() as session:
                keys, rewritten = _batch(session, column, raw, conditions, convert, after, batch, unreadable)
            changed += rewritten
            if on_batch and rewritten:
                on_batch(name, rewritten)
            if len(keys) < batch:
                break
            after = keys[-1]
        done.rotated += changed
        if not changed:
            break
    for kid in unreadable.values():
        done.unreadable[kid] = done.unreadable.get(kid, 0) + 1
    done.left = _count(store, column, conditions)
    return done


ORDER_KEYS = "courier_deliveries.order_key"


def rotate(store: Store, *, actor: str, batch: int = DEFAULT_BATCH, dry_run: bool = False,
           on_batch: Callable[[str, int], None] | None = None) -> RotationResult:
    """Re-encrypt every stored value not under the current key, and replace order keys stored in
    the clear by their pseudonyms; one audit record per run (none for a dry run).

    A dry run counts what would be rewritten and changes nothing. Values under a key that
    is not configured are left as they are and counted by key id.
    """
    current = store.keys.current_id
    if current is None:
        raise ValueError(f"{crypto.KEY_VARIABLE} is not set: there is no key to re-encrypt under")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    result = RotationResult(key_id=current, batch=batch, dry_run=dry_run)
    options = dict(batch=batch, dry_run=dry_run, on_batch=on_batch)
    for column in encrypted_columns():
        name = f"{column.table.name}.{column.name}"
        result.columns[name] = _rewrite(
            store, column, _raw(column), _not_current(column, current),
            lambda stored, dialect, column=column: column.type.process_result_value(stored, dialect),
            name=name, **options)
    order_key = Delivery.__table__.c.order_key  # not encrypted: a keyed pseudonym (courier.app.store.ordering.stored)
    result.columns[ORDER_KEYS] = _rewrite(
        store, order_key, order_key, [order_key.is_not(None), ~order_key.startswith(governance.PREFIX)],
        lambda stored, dialect: ordering.stored(stored, crypto.ring_of(dialect)), name=ORDER_KEYS, **options)
    if not dry_run:
        with store.session() as session:
            audit.record(session, actor=actor, action="key_rotate", target=f"stored values, to key id {current}",
                         details=result.details())
    return result


__all__ = ["rotate", "encrypted_columns", "RotationResult", "ColumnResult", "DEFAULT_BATCH"]
