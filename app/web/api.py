"""The HTTP API (docs/api.md): ingest, message traces, delivery lists, operator actions, health.

Errors are always `{"error": {"code", "message", "details"}}`. Handlers stay
thin: parsing and storing live in `courier.app.ingest`, status changes in `courier.app.store.outbox`.
"""
from __future__ import annotations

import base64
import logging
from datetime import datetime
from functools import wraps

from flask import Blueprint, Flask, current_app, g, jsonify, request, url_for
from marshmallow import Schema, ValidationError
from sqlalchemy import literal_column, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import defer
from werkzeug.exceptions import HTTPException

from courier.app.ingest import IngestError, ingest, json_object
from courier.app.settings import Settings
from courier.app.store import audit, circuits, models, outbox, reports, tokens
from courier.app.store.db import Store
from courier.app.store.models import AuditRecord, Delivery, Message, utcnow
from courier.app.web.schemas import PauseSchema, ReasonSchema, ReplayFilterSchema

log = logging.getLogger("courier.api")
bp = Blueprint("courier", __name__)
PAGE_SIZE = 100
MESSAGE_STATUSES = (models.ACCEPTED, models.UNROUTED)
DELIVERY_STATUSES = (models.PENDING, models.IN_FLIGHT, models.RETRYING, models.DELIVERED, models.DEAD)


def store() -> Store:
    return current_app.extensions["courier.store"]


def settings() -> Settings:
    return current_app.extensions["courier.settings"]


def error(status: int, code: str, message: str, details=None):
    return jsonify({"error": {"code": code, "message": message, "details": details or {}}}), status


ANY_SCOPE = "any"  # require(ANY_SCOPE): a valid token of any scope will do


def require(action: str):
    """Bearer-token check: 401 without a valid token, 403 when its scope does not grant `action`
    (courier.app.store.tokens.GRANTS; ANY_SCOPE: any live token)."""
    def decorator(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            header = request.headers.get("Authorization", "")
            scheme, _, credential = header.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return error(401, "unauthorized", "send Authorization: Bearer <token>")
            credential = credential.strip()
            token = tokens.cached(credential)
            if token is None:
                try:
                    with store().session() as session:
                        token = tokens.authenticate(session, credential)
                        if token is not None:
                            session.expunge(token)
                except SQLAlchemyError:
                    return error(503, "store_unavailable", "the store is unreachable; try again")
                if token is not None:
                    tokens.remember(credential, token)
            if token is None:
                return error(401, "unauthorized", "the token is unknown or revoked")
            if action != ANY_SCOPE and not tokens.allows(token, action):
                return error(403, "forbidden", f"a {token.scope} token may not {action}")
            g.token = token
            return view(*args, **kwargs)
        return wrapper
    return decorator


# --- ingest ---------------------------------------------------------------

@bp.post("/api/v1/messages")
@require("ingest")
def post_message():
    token = g.token
    source = token.source or request.headers.get("X-Courier-Source")
    if not source:
        return error(400, "malformed", "an admin token must name the source in the X-Courier-Source header")
    try:
        results, is_batch = ingest(
            store(), settings().routing, source=source, content_type=request.content_type or "",
            body=request.get_data(cache=False), idempotency_key=request.headers.get("Idempotency-Key"),
            correlation_id=request.headers.get("X-Correlation-ID"))
    except IngestError as exc:
        if exc.status >= 500:
            log.error("ingest failed for source %s: %s (%s)", source, exc.message, exc.__cause__)
        return _ingest_error(exc)
    bodies = [_accepted(r.message, r.deliveries, r.created) for r in results]
    status = 202 if any(r.created for r in results) else 200
    if is_batch:
        return jsonify({"messages": bodies}), status
    response = jsonify(bodies[0])
    response.status_code = status
    response.headers["Location"] = url_for("courier.get_message", message_id=results[0].message.id)
    return response


def _accepted(message: outbox.Stored, deliveries: list[dict], created: bool) -> dict:
    return {"id": message.id, "status": "accepted", "duplicate": not created,
            "routed": message.status == "accepted", "type": message.type, "deliveries": deliveries}


# --- read side ------------------------------------------------------------

def _since(name: str = "since") -> datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise IngestError(400, "malformed", f"query parameter {name}: not an ISO 8601 time: {raw!r}",
                          {"parameter": name}) from None
    if value.tzinfo is None:
        raise IngestError(400, "malformed", f"query parameter {name}: give a time zone (e.g. Z)",
                          {"parameter": name})
    return value


def _limit() -> int:
    try:
        return max(1, min(int(request.args.get("limit", PAGE_SIZE)), 1000))
    except ValueError:
        raise IngestError(400, "malformed", "query parameter limit: not an integer",
                          {"parameter": "limit"}) from None


def _until() -> datetime | None:
    """The `until` query parameter: an exclusive upper bound, validated like `since`."""
    return _since("until")


def _choice(name: str, allowed: tuple[str, ...]) -> str | None:
    """A query parameter that must be one of `allowed`: a typo gets a 400, not an empty list."""
    value = request.args.get(name)
    if value and value not in allowed:
        raise IngestError(400, "malformed", f"query parameter {name}: one of {', '.join(allowed)}, not {value!r}",
                          {"parameter": name})
    return value or None


def _decode_cursor(raw: str) -> tuple[datetime, str]:
    """The (received_at, id) of the last row of the previous page, from `next_cursor`."""
    try:
        at, _, last_id = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4)).decode().partition("|")
        value = datetime.fromisoformat(at)
        if not last_id or "\x00" in last_id or value.tzinfo is None:  # PostgreSQL refuses NUL in text
            raise ValueError(raw)
    except (ValueError, UnicodeError):
        raise IngestError(400, "malformed", f"query parameter cursor: not a cursor from this list: {raw!r}",
                          {"parameter": "cursor"}) from None
    return value, last_id


def _encode_cursor(at: datetime, last_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{last_id}".encode()).decode().rstrip("=")


def keyset(query, id_column, time_column=None, cursor: str | None = None):
    """`query` ordered newest first and started after `cursor` (the last row of the previous page).

    With `time_column` the order is (time, id) descending and the cursor carries both, so a
    filtered list walks the (filter, time) index backwards and stops after a page of rows; many
    rows may share a time, the id breaks the tie. Without it the order is the time-ordered id.
    """
    if time_column is None:
        if cursor:
            query = query.where(id_column < cursor)
        return query.order_by(id_column.desc())
    if cursor:
        at, last_id = _decode_cursor(cursor)
        # The plain `<=` is implied by the row comparison; it is there so the planner can use it
        # as an index bound on indexes that end in the time column (they do not hold the id).
        query = query.where(time_column <= at, tuple_(time_column, id_column) < tuple_(at, last_id))
    return query.order_by(time_column.desc(), id_column.desc())


def _page(query, id_column, render, time_column=None):
    """One page of `query` as {"items", "next_cursor"}; see `keyset` for the order and the cursor."""
    limit = _limit()
    query = keyset(query, id_column, time_column, request.args.get("cursor"))
    with store().session() as session:
        rows = session.scalars(query.limit(limit + 1)).all()
        items = [render(r) for r in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        if last is None:
            next_cursor = None
        elif time_column is None:
            next_cursor = last.id
        else:
            next_cursor = _encode_cursor(getattr(last, time_column.key), last.id)
    return jsonify({"items": items, "next_cursor": next_cursor})


def messages_query():
    """The search behind GET /api/v1/messages, without paging (bench/paging.py times it too)."""
    query = select(Message).options(defer(Message.body))  # a page never shows bodies: don't fetch, decrypt
    status = _choice("status", MESSAGE_STATUSES)
    if status:
        # Written into the SQL (it is one of MESSAGE_STATUSES), so a prepared statement's generic plan
        # can still use the partial index of unrouted messages (models.is_open says why).
        query = query.where(Message.status == literal_column(f"'{status}'"))
    for value, column in ((request.args.get("source"), Message.source), (request.args.get("type"), Message.type),
                          (request.args.get("idempotency_key"), Message.dedup_key)):
        if value:
            query = query.where(column == value)
    since, until = _since(), _until()
    if since:
        query = query.where(Message.received_at >= since)
    if until:
        query = query.where(Message.received_at < until)
    return query


@bp.get("/api/v1/messages")
@require("read")
def list_messages():
    """Messages newest first, filtered by status, source, type, idempotency_key and a [since, until) window."""
    return _page(messages_query(), Message.id, reports.message_doc, Message.received_at)


@bp.get("/api/v1/messages/<message_id>")
@require("read")
def get_message(message_id: str):
    with store().session() as session:
        message = outbox.trace(session, message_id)
        if message is None:
            return error(404, "not_found", f"no message {message_id!r}")
        body = reports.message_doc(message)
        body["deliveries"] = [reports.delivery_doc(d, with_log=True) for d in message.deliveries]
    return jsonify(body)


@bp.get("/api/v1/deliveries")
@require("read")
def list_deliveries():
    """Deliveries newest first (time-ordered ids), filtered by status and destination."""
    return _page(deliveries_query(), Delivery.id, reports.delivery_doc)


def deliveries_query():
    """The search behind GET /api/v1/deliveries, without paging (bench/paging.py times it too)."""
    query = select(Delivery)
    status = _choice("status", DELIVERY_STATUSES)
    for value, column in ((status, Delivery.status), (request.args.get("destination"), Delivery.destination)):
        if value:
            query = query.where(column == value)
    return query


@bp.get("/api/v1/destinations")
@require("read")
def list_destinations():
    return jsonify({"items": _destinations()})


def _destinations(only: str | None = None) -> list[dict]:
    """Each configured destination's counts, circuit and pause switch (all of them, or `only` one)."""
    with store().session() as session:
        summary = outbox.destination_summary(session)
        rows = circuits.states(session)
    now = utcnow()
    items = []
    for name, dest in settings().routing.destinations.items():
        if only is not None and name != only:
            continue
        counts = summary.get(name, {"backlog": 0, "dead": 0, "last_success_at": None})
        row = rows.get(name)
        items.append({
            "name": name, "owner": dest.owner, "clearance": dest.clearance,
            "backlog": counts["backlog"], "dead": counts["dead"], "last_success_at": reports.iso(counts["last_success_at"]),
            "circuit": circuits.shown_state(row, now),
            "circuit_open_until": reports.iso(row.open_until) if row and row.state != circuits.CLOSED else None,
            "circuit_changed_at": reports.iso(row.changed_at) if row else None,
            "consecutive_failures": row.failures if row else 0,
            "paused": bool(row and row.paused_at), "paused_at": reports.iso(row.paused_at) if row else None,
            "paused_by": row.paused_by if row else None, "pause_reason": row.pause_reason if row else None,
        })
    return items


@bp.get("/api/v1/reconciliation")
@require("read")
def reconciliation():
    """Per destination: accepted = delivered + pending + dead, for deliveries of messages since `since`."""
    since = _since()
    with store().session() as session:
        totals = reports.reconciliation(session, since)
    return jsonify({"since": reports.iso(since), "destinations": totals})


# --- operator actions: replay, pause, resume, audit ------------------------

def _body(schema: Schema) -> dict:
    """The JSON body validated by `schema`; an empty body counts as `{}` (every field optional or reported)."""
    raw = request.get_data(cache=True)
    doc = json_object(raw, "the body") if raw.strip() else {}
    try:
        return schema.load(doc)
    except ValidationError as exc:
        raise IngestError(422, "invalid", "the body has field errors", {"fields": exc.messages}) from None


def _actor() -> str:
    return audit.token_actor(g.token)


@bp.post("/api/v1/deliveries/<delivery_id>/replay")
@require("replay")
def replay_delivery(delivery_id: str):
    """Dead or delivered -> pending again, same id, fresh attempt budget; 409 for any other status."""
    body = _body(ReasonSchema())
    with store().session() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True)
        if delivery is None:
            return error(404, "not_found", f"no delivery {delivery_id!r}")
        if delivery.status not in outbox.REPLAYABLE:
            return error(409, "not_replayable", f"delivery {delivery_id} is {delivery.status}; only dead or "
                         "delivered deliveries can be replayed", {"status": delivery.status})
        outbox.replay(session, [delivery_id], actor=_actor(), reason=body["reason"])
        session.refresh(delivery)
        return jsonify(reports.delivery_doc(delivery, with_log=True))


@bp.post("/api/v1/deliveries/replay")
@require("replay")
def replay_deliveries():
    """Replay a destination's dead (or delivered) deliveries, optionally created in [since, until)."""
    body = _body(ReplayFilterSchema())
    with store().session() as session:
        ids = outbox.replay(session, actor=_actor(), reason=body["reason"], destination=body["destination"],
                            status=body["status"], since=body["since"], until=body["until"], limit=body["limit"])
    # limit_reached: more may match; the same call again takes the next batch.
    return jsonify({"replayed": len(ids), "ids": ids[:outbox.AUDIT_IDS], "limit_reached": len(ids) >= body["limit"]})


def _configured(name: str):
    if name not in settings().routing.destinations:
        return error(404, "not_found", f"no destination {name!r} in the routing config")
    return None


def _act_on_destination(name: str, schema: Schema, act):
    """Pause, resume or reset: the outbox function `act` on a configured destination; its view afterwards."""
    if (missing := _configured(name)) is not None:
        return missing
    body = _body(schema)
    with store().session() as session:
        act(session, name, actor=_actor(), reason=body["reason"])
    return jsonify(_destinations(only=name)[0])


@bp.post("/api/v1/destinations/<name>/pause")
@require("replay")
def pause_destination(name: str):
    return _act_on_destination(name, PauseSchema(), outbox.pause_destination)


@bp.post("/api/v1/destinations/<name>/resume")
@require("replay")
def resume_destination(name: str):
    return _act_on_destination(name, ReasonSchema(), outbox.resume_destination)


@bp.post("/api/v1/destinations/<name>/reset")
@require("replay")
def reset_circuit(name: str):
    """Close the destination's circuit breaker by hand; the deliveries it held are due at once."""
    return _act_on_destination(name, ReasonSchema(), outbox.reset_circuit)


def _audit(r: AuditRecord) -> dict:
    return {"id": str(r.id), "at": reports.iso(r.at), "actor": r.actor, "action": r.action, "target": r.target,
            "reason": r.reason, "details": audit.details_of(r)}


@bp.get("/api/v1/audit")
@require("read")
def list_audit():
    """Operator actions, newest first; `next_cursor` gives the next page."""
    raw_cursor = request.args.get("cursor")
    try:
        cursor = int(raw_cursor) if raw_cursor else None
        if cursor is not None and not 0 < cursor < 2**63:  # ids are positive BIGINTs; past it the store errs (503)
            raise ValueError(raw_cursor)
    except ValueError:
        return error(400, "malformed", f"query parameter cursor: not a cursor from this list: {raw_cursor!r}",
                     {"parameter": "cursor"})
    since, limit = _since(), _limit()
    with store().session() as session:
        rows, next_cursor = audit.listing(session, since=since, action=request.args.get("action") or None,
                                          limit=limit, cursor=cursor)
        items = [_audit(r) for r in rows]
    return jsonify({"items": items, "next_cursor": str(next_cursor) if next_cursor is not None else None})


# --- health ---------------------------------------------------------------

@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/api/openapi.json")
@require(ANY_SCOPE)
def openapi():
    """The OpenAPI 3 document (courier.app.web.openapi), paths as this app mounts them. Every /api/ route needs a
    token (issue 9): the document maps the attack surface, so any valid token, of any scope, reads it."""
    from courier.app.web.openapi import document

    return jsonify(document(bp.name))


@bp.get("/metrics")
def metrics_view():
    """Prometheus text: every process's counters and the store's gauges (courier.app.metrics); no PHI."""
    from courier.app import metrics

    body, content_type = metrics.exposition(store(), settings())
    return body, 200, {"Content-Type": content_type}


@bp.get("/readyz")
def readyz():
    """Ready when the store answers and the broker accepts a connection."""
    from kombu import Connection

    checks = {}
    try:
        store().ping()
        checks["store"] = "ok"
    except SQLAlchemyError as exc:
        checks["store"] = f"unreachable: {type(exc).__name__}"
    try:
        with Connection(settings().broker_url, connect_timeout=2) as conn:
            # One try per broker of a BROKER_URL list (at least two, as for a single broker).
            brokers = max(len(conn.alt), 1)
            conn.ensure_connection(max_retries=max(brokers, 2) - 1, timeout=2 * brokers)
        checks["broker"] = "ok"
    except Exception as exc:  # kombu raises transport-specific errors; any failure means not ready
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), 200 if ready else 503


# --- errors and limits ----------------------------------------------------

@bp.before_request
def _limit_body():
    # Per request, not app-wide MAX_CONTENT_LENGTH: inside a host app the limit is Courier's own.
    limit = settings().max_message_bytes
    request.max_content_length = limit
    if request.content_length is None and "wsgi.input_terminated" in request.environ:
        # A chunked body (no Content-Length): Werkzeug stops reading at max_content_length without
        # an error, so a longer body arrived cut short and an HL7 message cut in a later segment
        # was accepted truncated. Werkzeug may read one byte more; _Capped raises (413) on it.
        request.max_content_length = limit + 1
        request.environ["wsgi.input"] = _Capped(request.environ["wsgi.input"], limit)


class _Capped:
    """A WSGI input stream that raises 413 once more than `limit` bytes have been read from it."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.seen = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        return self._count(self.stream.read(size))

    def readline(self, size: int = -1) -> bytes:
        return self._count(self.stream.readline(size))

    def _count(self, data: bytes) -> bytes:
        from werkzeug.exceptions import RequestEntityTooLarge

        self.seen += len(data)
        if self.seen > self.limit:
            raise RequestEntityTooLarge()
        return data


@bp.before_request
def _refuse_nul():
    # PostgreSQL text cannot hold NUL: a NUL in a path or query parameter reached the store as a
    # DataError, answered 503 "try again" for what is the caller's mistake. One check for every route.
    params = [*(request.view_args or {}).items(), *request.args.items(multi=True)]
    for name, value in params:
        if isinstance(value, str) and "\x00" in value:
            return error(400, "malformed", f"parameter {name}: contains a NUL character", {"parameter": name})
    return None


@bp.errorhandler(IngestError)
def _ingest_error(exc: IngestError):
    body, status = error(exc.status, exc.code, exc.message, exc.details)
    if exc.status == 429:  # rate limited: when to send again, in whole seconds (RFC 9110 10.2.3)
        body.headers["Retry-After"] = str(exc.details["retry_after"])
    return body, status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    code = {413: "too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.code, "http_error")
    message = exc.description or exc.name
    if exc.code == 413:
        message = f"the body is larger than the limit of {settings().max_message_bytes} bytes"
    return error(exc.code or 500, code, message)


@bp.errorhandler(SQLAlchemyError)
def _store_error(exc: SQLAlchemyError):
    log.error("store error: %s", type(exc).__name__)
    return error(503, "store_unavailable", "the store is unreachable; try again")


@bp.errorhandler(Exception)
def _unexpected_error(exc: Exception):
    # A bug, not the caller's mistake. Flask's own answer was an HTML page; this one has the usual
    # shape and nothing of the exception (its text may quote the body); the log has the traceback.
    log.error("unexpected %s in %s %s", type(exc).__name__, request.method, request.path, exc_info=exc)
    from courier.app.observability import current_correlation_id

    return error(500, "internal_error", "an internal error, logged under this request's correlation id",
                 {"correlation_id": current_correlation_id()})


def init_app(app: Flask, url_prefix: str | None = None, *, own_app: bool = True) -> None:
    """Mount the API on `app` under `url_prefix`.

    `own_app`: Courier's standalone app also answers unknown URLs (404/405 raised before any
    blueprint is chosen) in its JSON error format; a host app keeps its own error pages.
    """
    app.register_blueprint(bp, url_prefix=url_prefix or None)
    if own_app:
        app.register_error_handler(HTTPException, _http_error)
