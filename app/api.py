"""The HTTP API of SPEC.md: ingest, message traces, delivery lists, health.

Errors are always `{"error": {"code", "message", "details"}}`. Handlers stay
thin: parsing and storing live in `app.ingest`, status changes in `app.outbox`.
"""
from __future__ import annotations

import logging
from datetime import datetime
from functools import wraps

from flask import Blueprint, Flask, current_app, g, jsonify, request, url_for
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from app import outbox, tokens
from app.db import Store
from app.ingest import IngestError, ingest
from app.models import Attempt, Delivery, Message, OPEN_STATUSES, DEAD, DELIVERED
from app.settings import Settings

log = logging.getLogger("courier.api")
bp = Blueprint("courier", __name__)
PAGE_SIZE = 100


def store() -> Store:
    return current_app.extensions["courier.store"]


def settings() -> Settings:
    return current_app.extensions["courier.settings"]


def error(status: int, code: str, message: str, details=None):
    return jsonify({"error": {"code": code, "message": message, "details": details or {}}}), status


def require(action: str):
    """Bearer-token check: 401 without a valid token, 403 when its scope does not grant `action`."""
    def decorator(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            header = request.headers.get("Authorization", "")
            scheme, _, credential = header.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                return error(401, "unauthorized", "send Authorization: Bearer <token>")
            try:
                with store().session() as session:
                    token = tokens.authenticate(session, credential.strip())
                    if token is not None:
                        session.expunge(token)
            except SQLAlchemyError:
                return error(503, "store_unavailable", "the store is unreachable; try again")
            if token is None:
                return error(401, "unauthorized", "the token is unknown or revoked")
            if not tokens.allows(token, action):
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
        return error(exc.status, exc.code, exc.message, exc.details)
    bodies = [_accepted(r.message, r.deliveries, r.created) for r in results]
    status = 202 if any(r.created for r in results) else 200
    if is_batch:
        return jsonify({"messages": bodies}), status
    response = jsonify(bodies[0])
    response.status_code = status
    response.headers["Location"] = url_for("courier.get_message", message_id=results[0].message.id)
    return response


def _accepted(message: Message, deliveries: list[dict], created: bool) -> dict:
    return {"id": message.id, "status": "accepted", "duplicate": not created,
            "routed": message.status == "accepted", "type": message.type, "deliveries": deliveries}


# --- read side ------------------------------------------------------------

def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _delivery(d: Delivery, with_log: bool = False) -> dict:
    body = {"id": d.id, "message_id": d.message_id, "destination": d.destination, "status": d.status,
            "attempts": d.attempts, "last_error": d.last_error,
            "next_attempt_at": _iso(d.due_at) if d.status in ("pending", "retrying") else None,
            "lease_expires_at": _iso(d.due_at) if d.status == "in_flight" else None,
            "delivered_at": _iso(d.delivered_at), "created_at": _iso(d.created_at),
            "updated_at": _iso(d.updated_at)}
    if with_log:
        body["attempt_log"] = [_attempt(a) for a in d.attempt_log]
    return body


def _attempt(a: Attempt) -> dict:
    return {"number": a.number, "started_at": _iso(a.started_at), "duration_ms": a.duration_ms,
            "outcome": a.outcome, "status_code": a.status_code, "detail": a.detail}


def _message(m: Message) -> dict:
    return {"id": m.id, "source": m.source, "type": m.type, "status": m.status,
            "content_type": m.content_type, "size": m.size, "idempotency_key": m.dedup_key,
            "correlation_id": m.correlation_id, "received_at": _iso(m.received_at)}


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


def _page(query, id_column, render):
    """Keyset paging on time-ordered ids: newest first, `cursor` is the last id of the previous page."""
    limit = _limit()
    cursor = request.args.get("cursor")
    if cursor:
        query = query.where(id_column < cursor)
    with store().session() as session:
        rows = session.scalars(query.order_by(id_column.desc()).limit(limit + 1)).all()
        items = [render(r) for r in rows[:limit]]
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@bp.get("/api/v1/messages")
@require("read")
def list_messages():
    query = select(Message)
    for arg, column in (("status", Message.status), ("source", Message.source), ("type", Message.type)):
        if request.args.get(arg):
            query = query.where(column == request.args[arg])
    since = _since()
    if since:
        query = query.where(Message.received_at >= since)
    return _page(query, Message.id, _message)


@bp.get("/api/v1/messages/<message_id>")
@require("read")
def get_message(message_id: str):
    with store().session() as session:
        message = outbox.trace(session, message_id)
        if message is None:
            return error(404, "not_found", f"no message {message_id!r}")
        body = _message(message)
        body["deliveries"] = [_delivery(d, with_log=True) for d in message.deliveries]
    return jsonify(body)


@bp.get("/api/v1/deliveries")
@require("read")
def list_deliveries():
    query = select(Delivery)
    for arg, column in (("status", Delivery.status), ("destination", Delivery.destination)):
        if request.args.get(arg):
            query = query.where(column == request.args[arg])
    return _page(query, Delivery.id, _delivery)


@bp.get("/api/v1/destinations")
@require("read")
def list_destinations():
    with store().session() as session:
        counts = dict(((d, s), n) for d, s, n in session.execute(
            select(Delivery.destination, Delivery.status, func.count())
            .where(Delivery.status.in_(OPEN_STATUSES + (DEAD,)))
            .group_by(Delivery.destination, Delivery.status)))
        last = dict(session.execute(select(Delivery.destination, func.max(Delivery.delivered_at))
                                    .where(Delivery.status == DELIVERED).group_by(Delivery.destination)).all())
    items = []
    for name, dest in settings().routing.destinations.items():
        items.append({"name": name, "owner": dest.owner, "clearance": dest.clearance,
                      "backlog": sum(counts.get((name, s), 0) for s in OPEN_STATUSES),
                      "dead": counts.get((name, DEAD), 0), "last_success_at": _iso(last.get(name))})
    return jsonify({"items": items})


@bp.get("/api/v1/reconciliation")
@require("read")
def reconciliation():
    """Per destination: accepted = delivered + pending + dead, for deliveries of messages since `since`."""
    since = _since()
    query = (select(Delivery.destination, Delivery.status, func.count())
             .group_by(Delivery.destination, Delivery.status))
    if since:
        query = query.join(Message, Message.id == Delivery.message_id).where(Message.received_at >= since)
    totals: dict[str, dict[str, int]] = {}
    with store().session() as session:
        for destination, status, n in session.execute(query):
            row = totals.setdefault(destination, {"accepted": 0, "delivered": 0, "pending": 0, "dead": 0})
            row["accepted"] += n
            row["pending" if status in OPEN_STATUSES else status] += n
    return jsonify({"since": _iso(since), "destinations": totals})


# --- health ---------------------------------------------------------------

@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


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
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # kombu raises transport-specific errors; any failure means not ready
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), 200 if ready else 503


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)

    @app.errorhandler(IngestError)
    def _ingest_error(exc: IngestError):
        return error(exc.status, exc.code, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {413: "too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.code, "http_error")
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"the body is larger than the limit of {settings().max_message_bytes} bytes"
        return error(exc.code or 500, code, message)

    @app.errorhandler(SQLAlchemyError)
    def _store_error(exc: SQLAlchemyError):
        log.error("store error: %s", type(exc).__name__)
        return error(503, "store_unavailable", "the store is unreachable; try again")
