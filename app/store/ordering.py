"""Ordered delivery: a destination's `ordered_by` key, and keeping one key's deliveries in line.

A destination with `ordered_by` gets each message's key at ingest (a dotted path into
the JSON event, or an HL7 v2 field like `PID-3` or `PID-3.1`). Deliveries with the same
(destination, key) go out in acceptance order, which is delivery id order: the relay
claims one only when no earlier open delivery of its key is left (`first_in_line`), and
`courier.app.store.outbox.accept` makes ids follow acceptance order (`lock`, `next_id`).

A key is often PHI (PID-3.1 is an MRN), and SQL only ever compares keys for equality, so
with encryption at rest on, Delivery.order_key holds a keyed pseudonym of it (`stored`).
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import exists, func, select, text
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from courier.app.domain import governance
from courier.app.store import crypto
from courier.app.store.models import Delivery, is_open, new_id

if TYPE_CHECKING:  # HL7 v2 support is the optional [mllp] extra; a JSON-only install lacks it
    from courier.app.hl7.er7 import Hl7Message

MAX_KEY = 255  # Delivery.order_key is VARCHAR(255)
NAMESPACE = "order_key"  # governance.pseudonym's: an order key's pseudonym is no patient pseudonym sent out
_HL7_FIELD = re.compile(r"([A-Z][A-Z0-9]{2})-(\d+)(?:\.(\d+))?")
_HL7_NULL = '""'  # HL7's explicit null: "no value", so no key either


@lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple[str, Any]:
    """`"PID-3.1"` -> ("hl7", ("PID", 3, 1)); `"data.patient_id"` -> ("json", ("data", "patient_id"))."""
    match = _HL7_FIELD.fullmatch(spec)
    if match:
        segment, field, component = match.groups()
        return "hl7", (segment, int(field), int(component) if component else None)
    return "json", tuple(spec.split("."))


def fit(key: str) -> str:
    """A key as stored: longer than the column holds -> its sha256 hex (equal keys still hash equal)."""
    return key if len(key) <= MAX_KEY else hashlib.sha256(key.encode("utf-8")).hexdigest()


def stored(key: str, keys: crypto.KeyRing) -> str:
    """`key` as Delivery.order_key holds it and `lock` names it: with encryption at rest (the store's
    `keys` hold a COURIER_ENCRYPTION_KEY) its keyed pseudonym, else as it is (`fit`).

    Keyed with COURIER_PSEUDONYM_KEY, not the Fernet keys: a waiting delivery's key must
    still equal a new message's after an encryption key rotation. courier.app.config refuses to
    start without it; should it be missing all the same, this raises MissingKey rather
    than store the key in the clear.
    """
    key = fit(key)
    if keys.current_id is None:
        return key
    secret = governance.process_key()
    if secret is None:
        raise governance.MissingKey(f"{governance.KEY_VARIABLE} is not set: with {crypto.KEY_VARIABLE} set, "
                                    "order keys (ordered_by) are stored as keyed pseudonyms")
    return governance.pseudonym(key, NAMESPACE, secret)


def key_for(spec: str, document: Any) -> str | None:
    """The order key `spec` picks from a message (a JSON envelope dict or an Hl7Message), or None.

    None means "no key": that delivery is unordered. A missing or empty field is not an
    error, and neither is a spec of the other kind (an HL7 field asked of a JSON event).
    """
    kind, path = _parse_spec(spec)
    if kind == "hl7":
        value = _hl7_value(document, *path) if hasattr(document, "encoding_characters") else None
    else:
        value = _json_value(document, path) if isinstance(document, dict) else None
    return fit(value) if value else None


def _json_value(document: dict, path: tuple[str, ...]) -> str | None:
    node: Any = document
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    if node is None or isinstance(node, str):
        return node
    # 12345 and "12345" are the same patient; objects and lists get a canonical form.
    return json.dumps(node, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _hl7_value(message: "Hl7Message", segment_id: str, field: int, component: int | None) -> str | None:
    """Raw text (escapes kept) of field `field` of the first `segment_id` segment, or its component.

    Split with the message's own delimiters. A component is taken from the first repetition
    (PID-3.1 of `A^B~C^D` is `A`); a whole field keeps its repetitions.
    """
    sep = message.field_separator
    component_sep, repetition_sep = message.encoding_characters[0], message.encoding_characters[1]
    for segment in message.text.split("\r"):
        if segment[:3] != segment_id or segment[3:4] not in (sep, ""):
            continue
        fields = segment.split(sep)
        if segment_id == "MSH":  # MSH-1 is the separator itself, so MSH-n sits at index n-1
            fields.insert(1, sep)
        if field >= len(fields):
            return None
        value = fields[field]
        if component is not None:
            components = value.split(repetition_sep, 1)[0].split(component_sep)
            value = components[component - 1] if 0 < component <= len(components) else ""
        return None if value == _HL7_NULL else value
    return None


def keys_for(destinations: Iterable[str], specs: dict[str, str | None], document: Any) -> dict[str, str]:
    """{destination: key} for the routed destinations that have `ordered_by` and a key in this message."""
    keys = {}
    for name in destinations:
        spec = specs.get(name)
        key = key_for(spec, document) if spec else None
        if key is not None:
            keys[name] = key
    return keys


def lock(session: Session, pairs: Iterable[tuple[str, str]]) -> None:
    """Take PostgreSQL's transaction-scoped advisory lock of each (destination, stored key), in sorted order.

    Held until commit or rollback, so the ingests of one key take turns. Sorted, so two
    transactions that need the same keys take them in the same order and never deadlock.
    Other backends: nothing to do (SQLite's BEGIN IMMEDIATE already runs one writer at a time).
    Keys come as `stored` made them, so no MRN is sent as a lock name (a statement log would
    keep it, and pg_locks shows an unkeyed hash of it); every caller must name them alike.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    # Destination names cannot contain ':', so "destination:key" names one pair only. A hash
    # collision between two pairs merely makes them take turns too.
    for name in sorted({f"{destination}:{key}" for destination, key in pairs}):
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": name})


def next_id(session: Session, destination: str, key: str) -> str:
    """A new delivery id greater than every id already stored for (destination, key).

    new_id() is only ordered to the millisecond: two messages of one key accepted in the
    same millisecond (a batch, or the next ingest right after the lock is released) would
    get ids in random order. Only rows with an id >= a fresh one can be in the way, so the
    check is a short range scan of the primary key; call it while holding `lock`.
    """
    candidate = new_id()
    latest = session.scalar(select(func.max(Delivery.id)).where(
        Delivery.id >= candidate, Delivery.destination == destination, Delivery.order_key == key))
    return candidate if latest is None else _after(latest)


def _after(previous: str) -> str:
    """A UUIDv7-style id a little greater than `previous`: its 74 timestamp-and-random bits plus 1..2**32."""
    value = uuid.UUID(previous).int
    counter = ((value >> 80) << 74) | (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))
    counter += 1 + secrets.randbelow(1 << 32)  # still unguessable enough for an idempotency key
    ms, rand_a, rand_b = counter >> 74, (counter >> 62) & 0xFFF, counter & ((1 << 62) - 1)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


def first_in_line() -> ColumnElement[bool]:
    """For the relay's claim: no open delivery of the same destination and key has a smaller id.

    Unordered deliveries pass (`order_key = NULL` is never true). PostgreSQL answers it
    from the partial index ix_courier_deliveries_order. A dead delivery is no longer open,
    so the ones behind it go on; replayed, it rejoins the line by its id.
    """
    earlier = aliased(Delivery)
    return ~exists().where(
        earlier.destination == Delivery.destination,
        earlier.order_key == Delivery.order_key,
        is_open(earlier.status),
        earlier.id < Delivery.id,
    )
