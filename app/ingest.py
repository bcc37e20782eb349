"""Ingest: the one path by which a message enters Courier (HTTP today, MLLP too).

Parse and validate the body, check the source may send its type, route it,
and commit the message with its deliveries in one transaction. The caller
answers "accepted" only after `ingest()` returns: then the message is durable.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError, fields, validate
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from courier.app import metrics
from courier.app.config import StrictSchema
from courier.app.settings import RateLimit, RoutingConfig
from courier.app.store import crypto, ordering, outbox, ratelimit, search
from courier.app.store.db import Store, store_problem

JSON_TYPES = {"application/json"}
HL7_TYPES = {"application/hl7-v2", "x-application/hl7-v2+er7"}
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,255}\Z")  # \Z: marshmallow's Regexp only anchors the start


class IngestError(Exception):
    """A refusal with an HTTP status, a stable code, a message that says what and where, and details."""

    def __init__(self, status: int, code: str, message: str, details: dict | list | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class EventSchema(StrictSchema):
    """The JSON event envelope. `data` is the payload; its own schema belongs to the event type."""

    type = fields.String(required=True, validate=[
        validate.Length(min=1, max=128),
        # PostgreSQL refuses NUL in text: refused here, it is a 422 the sender can fix, not a 503 to retry.
        validate.Regexp(r"[^\x00]*\Z", error="must not contain NUL characters")])
    id = fields.String(validate=validate.Regexp(_SAFE_ID, error="1-255 characters of A-Z a-z 0-9 . _ : @ / + = -"))
    occurred_at = fields.AwareDateTime(default_timezone=None)
    version = fields.Integer(validate=validate.Range(min=1))
    data = fields.Dict(required=True)


_EVENT = EventSchema()  # one instance: building a schema costs more than loading an event with it


@dataclass(frozen=True)
class Parsed:
    """One message ready to store: its type, the key duplicates are recognised by, and the
    parsed document (JSON envelope or Hl7Message) that order keys are read from."""

    message_type: str
    body: bytes
    content_type: str
    dedup_key: str | None
    document: Any = field(default=None, repr=False, compare=False)


@dataclass
class Result:
    message: outbox.Stored
    created: bool
    deliveries: list = field(default_factory=list)


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def parse_body(content_type: str, body: bytes, default_charset: str | None = None) -> tuple[list[Parsed], bool]:
    """Split and validate a request body; returns (messages, is_batch). Raises IngestError.

    default_charset: how HL7 v2 without MSH-18 is read (the source's `charset`; ASCII when None)."""
    kind = media_type(content_type)
    if kind in JSON_TYPES:
        return [_parse_json(body)], False
    if kind in HL7_TYPES:
        return _parse_hl7(body, default_charset)
    raise IngestError(415, "unsupported_media_type",
                      f"Content-Type {kind or '(none)'!r} is not accepted",
                      {"accepted": sorted(JSON_TYPES | HL7_TYPES)})


MAX_JSON_DEPTH = 64  # arrays and objects inside each other; no event needs more, and later recursion is bounded


class _Refused(ValueError):
    """Raised by json_object's decoder hooks: JSON that Python would take but Courier does not."""


def _unique_keys(pairs: list) -> dict:
    # Duplicate keys are legal JSON, but parsers disagree on which value wins: the type Courier
    # routes by could differ from the one a destination reads. Refused at every level.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"duplicate key {duplicate[:40]!r}")
    return doc


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: no destination could read it back as a number
        raise _Refused(f"number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _depth_within(doc, limit: int) -> None:
    """Refuse nesting deeper than `limit` (iteratively: the check itself must not recurse)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise _Refused(f"arrays and objects are nested more than {limit} levels deep")
                stack.append((child, depth + 1))


def _no_constant(name: str):
    raise _Refused(f"{name} is not JSON")  # Python's json takes NaN and Infinity; RFC 8259 does not


def json_object(body: bytes, what: str = "a JSON event") -> dict:
    """Decode a body that must be one JSON object; IngestError says where it is not."""
    try:
        doc = json.loads(body.decode("utf-8-sig"), object_pairs_hook=_unique_keys, parse_float=_finite,
                         parse_constant=_no_constant)
        _depth_within(doc, MAX_JSON_DEPTH)
    except UnicodeDecodeError as exc:
        raise IngestError(400, "malformed", f"body is not UTF-8: byte {exc.start}",
                          {"position": exc.start}) from None
    except json.JSONDecodeError as exc:
        # removesuffix: some of json's messages end in " at" ("Invalid control character at").
        raise IngestError(400, "malformed", f"body is not valid JSON: {exc.msg.removesuffix(' at')} at line "
                          f"{exc.lineno} column {exc.colno}", {"line": exc.lineno, "column": exc.colno}) from None
    except RecursionError:  # the decoder recurses per level: 100,000 '[' was a 500
        raise IngestError(400, "malformed", "body is not acceptable JSON: arrays and objects are nested "
                          f"more than {MAX_JSON_DEPTH} levels deep", {"reason": "nested too deeply"}) from None
    except _Refused as exc:
        raise IngestError(400, "malformed", f"body is not acceptable JSON: {exc}", {"reason": str(exc)}) from None
    except ValueError:  # int() of more digits than sys.get_int_max_str_digits(); it was a 500
        raise IngestError(400, "malformed", "body is not acceptable JSON: an integer has more than "
                          f"{sys.get_int_max_str_digits()} digits", {"reason": "integer too long"}) from None
    if not isinstance(doc, dict):
        raise IngestError(422, "invalid", f"{what} must be an object",
                          {"fields": {"_schema": ["expected an object"]}})
    return doc


def _parse_json(body: bytes) -> Parsed:
    doc = json_object(body)
    try:
        event = _EVENT.load(doc)
    except ValidationError as exc:
        raise IngestError(422, "invalid", "the event does not match the envelope schema",
                          {"fields": exc.messages}) from None
    # The order key is read from the envelope as sent (occurred_at a string, not a datetime).
    return Parsed(event["type"], body, "application/json", event.get("id"), doc)


def _parse_hl7(body: bytes, default_charset: str | None) -> tuple[list[Parsed], bool]:
    try:
        from courier.app.hl7 import er7
    except ImportError:  # python-hl7 comes with the [mllp] extra; a JSON-only install refuses HL7 clearly
        raise IngestError(415, "unsupported_media_type", "HL7 v2 support is not installed here "
                          "(pip install 'courier[mllp]')") from None
    try:
        parts = er7.split_raw(body)
        messages = []
        for index, part in enumerate(parts):
            try:
                messages.append(er7.parse_raw(part, default_charset))
            except er7.Hl7Error as exc:
                if len(parts) > 1:
                    raise IngestError(400, "malformed", f"HL7 message {index + 1} of the batch: {exc}",
                                      {"message_index": index, **_hl7_details(exc)}) from None
                raise
    except er7.Hl7Error as exc:
        raise IngestError(400, "malformed", f"not a valid HL7 v2 message: {exc}", _hl7_details(exc)) from None
    return _hl7_parsed(messages, body)


def _hl7_parsed(messages: list, body: bytes) -> tuple[list[Parsed], bool]:
    """parse_body's answer for HL7 v2 `messages` (er7.parse_all of `body`, in the source's charset)."""
    is_batch = len(messages) > 1 or body.lstrip(b" \t\r\n\x0b\xef\xbb\xbf").startswith((b"FHS", b"BHS"))
    # Stored as received, byte for byte; the content type names the charset it was read in (MSH-18,
    # or the source's default), so every later reading decodes it the same way.
    return [Parsed(m.message_type, m.raw, f"application/hl7-v2; charset={m.charset}", m.control_id or None, m)
            for m in messages], is_batch


def _hl7_details(exc) -> dict:
    """IngestError details of an Hl7Error: what, where, and for an MLLP ACK its table 0357 code and location."""
    return {"reason": exc.reason, "where": exc.where, "error_code": exc.error_code,
            "location": list(exc.location) if exc.location else None}


@dataclass(frozen=True)
class Plan:
    """A validated message and where it goes: what `store_plans` writes."""

    parsed: Parsed
    destinations: list[str]
    order_keys: dict[str, str | None]


def plan(routing: RoutingConfig, *, source: str, content_type: str, body: bytes,
         idempotency_key: str | None = None, hl7_messages: list | None = None) -> tuple[list[Plan], bool]:
    """Parse, validate and route without touching the store; returns (plans, is_batch). Raises IngestError.

    hl7_messages: `body` already read, as er7.parse_all(body, the source's charset) reads it (the MLLP
    listener has done so to pick the source): used instead of parsing it again."""
    if source not in routing.sources:
        raise IngestError(403, "unknown_source", f"source {source!r} is not configured")
    if idempotency_key is not None and not _SAFE_ID.fullmatch(idempotency_key):
        raise IngestError(400, "malformed", "Idempotency-Key header: 1-255 characters of "
                          "A-Z a-z 0-9 . _ : @ / + = -", {"header": "Idempotency-Key"})
    allowed = routing.sources[source]
    if hl7_messages is not None and media_type(content_type) in HL7_TYPES:
        parsed, is_batch = _hl7_parsed(hl7_messages, body)
    else:
        parsed, is_batch = parse_body(content_type, body, allowed.charset)
    refused = [p.message_type for p in parsed if not allowed.allows(p.message_type)]
    if refused:
        raise IngestError(422, "type_not_allowed", f"source {source!r} may not send {refused[0]!r}",
                          {"fields": {"type": [f"not in allowed_types of source {source!r}"]},
                           "allowed_types": list(allowed.allowed_types)})
    if idempotency_key is not None and not is_batch:
        parsed = [dataclasses.replace(parsed[0], dedup_key=idempotency_key)]
    specs = {name: d.ordered_by for name, d in routing.destinations.items() if d.ordered_by}
    plans = []
    for p in parsed:
        destinations = routing.destinations_for(source, p.message_type)
        plans.append(Plan(p, destinations, ordering.keys_for(destinations, specs, p.document)))
    return plans, is_batch


def store_plans(session: Session, plans: list[Plan], *, source: str,
                correlation_id: str | None = None, locked: bool = False) -> list[Result]:
    """Write planned messages and their deliveries in `session`'s transaction; the caller commits.

    locked: the caller has already taken the order keys' locks (`_lock_keys`, for a group commit)."""
    if correlation_id is not None and not _SAFE_ID.fullmatch(correlation_id[:64] or "-"):
        correlation_id = None  # an unusable correlation id is replaced, not an error: it is ours to make
    if len(plans) > 1 and not locked:
        _lock_keys(session, plans)
    results = []
    for p in plans:
        message, created = outbox.accept(session, outbox.NewMessage(
            source=source, message_type=p.parsed.message_type, content_type=p.parsed.content_type,
            body=p.parsed.body, dedup_key=p.parsed.dedup_key, correlation_id=correlation_id,
        ), p.destinations, p.order_keys)
        search.index_patient(session, message, created, p.parsed.document)  # issue 20: console patient search
        results.append(Result(message, created, [
            {"id": d.id, "destination": d.destination, "status": d.status} for d in message.deliveries]))
    return results


def _lock_keys(session: Session, plans: list[Plan]) -> None:
    """Take the order-key locks of several messages up front, in one sorted pass (ordering.lock): locking
    message by message, two batches holding the same patients in opposite order would deadlock.
    Named by their stored form, as outbox.accept names them."""
    ring = crypto.ring_for(session)
    ordering.lock(session, [(d, ordering.stored(k, ring)) for p in plans for d, k in p.order_keys.items()])


def ingest(store: Store, routing: RoutingConfig, *, source: str, content_type: str, body: bytes,
           idempotency_key: str | None = None, correlation_id: str | None = None,
           hl7_messages: list | None = None) -> tuple[list[Result], bool]:
    """Validate, route and durably store; returns (results, is_batch). Raises IngestError.

    hl7_messages: `body` as already read (see `plan`)."""
    plans, is_batch = plan(routing, source=source, content_type=content_type, body=body,
                           idempotency_key=idempotency_key, hl7_messages=hl7_messages)
    charge(store, routing, source, len(plans))
    return commit(store, [Batch(source, plans, correlation_id)])[0], is_batch


def charge(store: Store, routing: RoutingConfig, source: str, n: int) -> None:
    """Charge `n` messages to the source's rate limit, if it has one; IngestError 429 (or 413, 503) if not allowed."""
    limit = routing.sources[source].rate_limit
    if limit is not None:  # only limited sources pay this round trip
        _within_rate(store, source, limit, n)


@dataclass(frozen=True)
class Batch:
    """What one request or frame stores: its planned messages, all or none."""

    source: str
    plans: list[Plan]
    correlation_id: str | None = None


def commit(store: Store, batches: list[Batch]) -> list[list[Result]]:
    """Store each batch's messages and deliveries, all batches in one transaction; the Results of each.

    IngestError 503 (store_unavailable, the driver's error as __cause__) when the store could not commit:
    then nothing of any batch is stored. Several batches in one transaction (GroupCommit) take all
    their order-key locks up front, as one batch does.
    """
    try:
        with store.session() as session:
            if len(batches) > 1:
                _lock_keys(session, [p for b in batches for p in b.plans])
            results = [store_plans(session, b.plans, source=b.source, correlation_id=b.correlation_id,
                                   locked=len(batches) > 1) for b in batches]
    except (OperationalError, DBAPIError) as exc:
        raise IngestError(503, "store_unavailable", "the message store could not commit; nothing was "
                          "accepted, send again", {"retryable": True}) from exc
    for batch, stored in zip(batches, results):
        metrics.accepted(batch.source, stored)  # after the commit: only what is durable is counted
    return results


class GroupCommit:
    """`commit` for batches handed in by concurrent threads, several in one transaction ("group commit").

    `commit(batch)` returns the batch's Results only after the transaction holding it has committed, and
    raises as `commit` does. Up to `leaders` transactions run at once; a batch that comes while they all
    run waits, and the next transaction takes every batch waiting (at most `max_group`): under load one
    BEGIN, COMMIT and WAL flush serve many frames, while a lone frame commits at once. That transaction
    is run by the thread of the first waiting batch, so the group needs no thread of its own.

    Several leaders, so that a transaction waiting on a row lock (say, a duplicate of a message another
    process has not committed yet) holds up only the batches in it; and a batch that has waited
    `patience` seconds while every leader is stuck like that runs a transaction of its own. A group
    that fails other than by an outage is committed again batch by batch: each batch is stored, or
    refused, as it would be alone.
    """

    def __init__(self, store: Store, *, leaders: int = 4, max_group: int = 32, patience: float = 0.5):
        self.store, self.leaders, self.max_group, self.patience = store, leaders, max_group, patience
        self._lock = threading.Lock()
        self._waiting: deque[_Waiter] = deque()
        self._running = 0  # transactions being run (leaders)
        self.batches = self.transactions = 0  # handed in, and transactions run for them (tests, the stop log line)

    def commit(self, batch: Batch) -> list[Result]:
        me = _Waiter(batch)
        with self._lock:
            me.leads = self._running < self.leaders
            if me.leads:
                self._running += 1
            else:
                self._waiting.append(me)
        # Until a leader has committed this batch, or handed this thread the lead.
        while not me.leads and not me.event.wait(self.patience):
            with self._lock:
                if me in self._waiting:  # no leader came for it in time: they are stuck, lead anyway
                    self._waiting.remove(me)
                    self._running += 1
                    me.leads = True
        if me.leads:
            self._lead(me)
        if me.error is not None:
            raise me.error
        return me.results

    def _lead(self, me: _Waiter) -> None:
        with self._lock:
            group = [me]
            while self._waiting and len(group) < self.max_group:
                group.append(self._waiting.popleft())
            self.batches += len(group)
        try:
            self._run(group)
        finally:
            with self._lock:
                if self._waiting:  # the lead passes on to the first waiting batch's thread
                    successor = self._waiting.popleft()
                    successor.leads = True
                    successor.event.set()
                else:
                    self._running -= 1
            for waiter in group:
                if waiter is not me:
                    waiter.event.set()

    def _run(self, group: list[_Waiter]) -> None:
        # One order for every group: two groups holding the same duplicates take their unique-key locks alike.
        group.sort(key=lambda w: w.key)
        with self._lock:
            self.transactions += 1
        try:
            for waiter, results in zip(group, commit(self.store, [w.batch for w in group])):
                waiter.results, waiter.error = results, None
            return
        except Exception as exc:
            if len(group) == 1 or _outage(exc):  # the store is not there: alone, each would fail too
                for waiter in group:
                    waiter.error = exc
                return
        for waiter in group:  # one batch spoilt the group: each alone, as if never grouped
            with self._lock:
                self.transactions += 1
            try:
                waiter.results, waiter.error = commit(self.store, [waiter.batch])[0], None
            except Exception as exc:
                waiter.error = exc


class _Waiter:
    """One batch in a GroupCommit: the thread waits on `event`, then reads `results` or `error`, unless it `leads`."""

    __slots__ = ("batch", "key", "event", "leads", "results", "error")

    def __init__(self, batch: Batch):
        self.batch = batch
        first = batch.plans[0].parsed.dedup_key if batch.plans else None
        self.key = (batch.source, first or "")
        self.event = threading.Event()
        self.leads = False
        self.results: list[Result] = []
        # Until a commit says otherwise: a waiter woken without an outcome must not be answered as stored.
        self.error: Exception | None = RuntimeError("the group commit ended without committing this batch")


def _outage(exc: Exception) -> bool:
    """Whether a commit failed because the store is unreachable (rather than over one batch's content)."""
    return (isinstance(exc, IngestError) and exc.code == "store_unavailable" and exc.__cause__ is not None
            and store_problem(exc.__cause__) is not None)


def _within_rate(store: Store, source: str, limit: RateLimit, n: int) -> None:
    """Charge `n` messages to the source's rate limit, in a transaction of its own before the
    ingest's (no lock held while storing); IngestError 429 with `retry_after` when over it.

    Messages are counted, not requests: an HL7 batch of 20 costs 20. A duplicate costs too (it
    is known only when stored), and so does a message the store then fails to commit.
    """
    if n > limit.burst:  # could never pass, however long the sender waits
        raise IngestError(413, "too_large", f"a batch of {n} messages is more than source {source!r} may send "
                          f"at once ({limit}): split it", {"messages": n, "burst": limit.burst})
    try:
        wait = ratelimit.take(store, source, limit, n)
    except (OperationalError, DBAPIError) as exc:
        raise IngestError(503, "store_unavailable", "the message store could not check the rate limit; nothing "
                          "was accepted, send again", {"retryable": True}) from exc
    if wait is not None:
        metrics.rate_limited(source, n)
        raise IngestError(429, "rate_limited", f"source {source!r} sent more than {limit}; nothing was accepted, "
                          f"retry after {wait} s", {"retry_after": wait, "count": limit.count,
                                                    "period": limit.period, "burst": limit.burst})
