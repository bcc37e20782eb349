"""The operator console at /console/ (docs/console.md): server-rendered pages for the people who run Courier.

Views only. Every read and every action calls what the JSON API calls (courier.app.web.api's queries,
courier.app.store.outbox's replay, pause, resume and circuit reset, courier.app.store.tokens), and
every action lands in the audit log under the token's name, as the API's do.

Login is with an API token: POST /console/login starts a session kept in the store
(courier_console_sessions, by the SHA-256 of a random cookie value), so a logout or a revoked token
ends it in every web process at once. The cookie is HttpOnly, SameSite=Strict, Secure over TLS; a
session idle for IDLE ends. Each session has a CSRF token that every form carries; the login form,
before any session, uses a double-submit cookie. Pages send a strict Content-Security-Policy: no
inline script or style, nothing from another origin.

Roles are the token's scope: `view` sees counts, statuses, attempts and errors, never a body or a
PHI field; `operate` also sees bodies (decrypted on view, and the viewing is audited), replays,
pauses, resumes and resends; `admin` also manages tokens.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import wraps

from flask import Blueprint, Flask, abort, g, make_response, redirect, render_template, request, url_for
from sqlalchemy import delete, exists, select
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from courier.app.ingest import IngestError, ingest
from courier.app.store import alerts, audit, circuits, crypto, models, outbox, reports, search, tokens
from courier.app.store.models import (ApiToken, AuditRecord, ConsoleSession, Delivery, Message, MessageLink,
                                      utcnow)
from courier.app.web import api, charts

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static", static_url_path="/static")

COOKIE = "courier_console"
LOGIN_COOKIE = "courier_console_login"  # the login form's double-submit CSRF value
IDLE = timedelta(minutes=30)
TOUCH_EVERY = timedelta(minutes=1)  # last_seen_at is written at most this often per session
PAGE = 50
DEAD_SCAN = 20_000  # dead deliveries read to group them by error (errors may be encrypted: grouped here)
BULK_CAP = 1000  # deliveries per "replay everything matching": press again for the next batch
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; connect-src 'self'")


@dataclass(frozen=True)
class User:
    token: ApiToken
    session_id: str
    csrf: str

    @property
    def name(self) -> str:
        return audit.token_actor(self.token)

    def may(self, action: str) -> bool:
        return tokens.allows(self.token, action)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _secure() -> bool:
    """Secure cookies when the console is reached over TLS (gunicorn's own, or a proxy that says so)."""
    return request.is_secure or bool(os.environ.get("COURIER_TLS_CERT"))


def _current_user() -> User | None:
    raw = request.cookies.get(COOKIE)
    if not raw or len(raw) > 200:
        return None
    now = utcnow()
    with api.store().session() as session:
        row = session.get(ConsoleSession, _hash(raw))
        if row is None:
            return None
        token = session.get(ApiToken, row.token_id)
        if token is None or token.revoked_at is not None or now - row.last_seen_at > IDLE:
            session.delete(row)  # idle too long or its token revoked: the session is over
            return None
        if now - row.last_seen_at > TOUCH_EVERY:
            row.last_seen_at = now
        session.flush()
        session.expunge(token)
        return User(token, row.id, row.csrf)


def page(action: str = "read"):
    """A console view: a live session whose token grants `action`; a POST must carry the session's CSRF token."""
    def decorator(view):
        @wraps(view)
        def wrapper(*args, **kwargs):
            user = _current_user()
            if user is None:
                if request.method == "GET":
                    return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
                abort(401)
            if request.method == "POST" and not hmac.compare_digest(request.form.get("csrf", ""), user.csrf):
                abort(400, "the form's CSRF token is missing or stale: reload the page and try again")
            if not user.may(action):
                abort(403, f"a {user.token.scope} token may not do this")
            g.user = user
            return view(*args, **kwargs)
        return wrapper
    return decorator


@bp.after_request
def _headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith("/console/static/"):
        response.headers["Cache-Control"] = "no-store"  # pages may hold message bodies
    return response


@bp.app_template_global()
def age(seconds: int | float | None) -> str:
    """An age as an operator reads it: 45s, 12m 5s, 3h 20m, 2d 4h."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    for big, size, small, rest in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size}{big} {seconds % size // rest}{small}"
    return f"{seconds}s"


@bp.app_template_filter("when")
def when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _done(message: str, endpoint: str, **values):
    """After an action: back to a page, with what was done in the URL (no cookie needed)."""
    return redirect(url_for(endpoint, done=message[:300], **values), code=303)


# --- login, logout --------------------------------------------------------

def _safe_next(target: str | None) -> str:
    # Only a path of this console: never another site (an open redirect after login).
    if target and target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("console.dashboard")


@bp.route("/login", methods=["GET", "POST"])
def login():
    error, status = None, 200
    if request.method == "POST":
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(request.form.get("csrf", ""), expected):
            error, status = "The form expired: try again.", 400
        else:
            credential = request.form.get("token", "").strip()
            with api.store().session() as session:
                token = tokens.authenticate(session, credential)
                if token is None or not tokens.allows(token, "read"):
                    error, status = "This token is unknown, revoked, or may not use the console.", 401
                else:
                    raw = secrets.token_urlsafe(32)
                    session.add(ConsoleSession(id=_hash(raw), token_id=token.id, csrf=secrets.token_urlsafe(32)))
                    audit.record(session, actor=audit.token_actor(token), action="console_login", target=token.id)
            if error is None:
                response = redirect(_safe_next(request.form.get("next")), code=303)
                response.set_cookie(COOKIE, raw, httponly=True, samesite="Strict", secure=_secure(), path="/console/")
                response.delete_cookie(LOGIN_COOKIE, path="/console/")
                return response
    nonce = secrets.token_urlsafe(32)
    response = make_response(render_template("console/login.html", csrf=nonce, error=error,
                                             next=request.values.get("next", "")), status)
    response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="Strict", secure=_secure(), path="/console/",
                        max_age=3600)
    return response


@bp.post("/logout")
@page()
def logout():
    with api.store().session() as session:
        session.execute(delete(ConsoleSession).where(ConsoleSession.id == g.user.session_id))
        audit.record(session, actor=g.user.name, action="console_logout", target=g.user.token.id)
    response = redirect(url_for("console.login"), code=303)
    response.delete_cookie(COOKIE, path="/console/")
    return response


# --- dashboard ------------------------------------------------------------

@bp.get("/")
@page()
def dashboard():
    with api.store().session() as session:
        activity = reports.activity(session)
        firing = alerts.firing(session)
    rows = []
    for dest in api._destinations():
        act = activity.get(dest["name"]) or reports.activity_row()
        rows.append({**dest, **act, "rate_1h": act["delivered_1h"], "rate_24h": round(act["delivered_24h"] / 24, 1),
                     "chart": charts.bars(act["hourly"][models.DELIVERED], act["hourly"][models.DEAD])})
    return render_template("console/dashboard.html", rows=rows, firing=firing)


# --- message browser and detail --------------------------------------------

def _filters() -> dict:
    return {k: request.args.get(k, "").strip() for k in
            ("window", "since", "until", "status", "delivery_status", "source", "destination", "type", "id",
             "idempotency_key", "patient")}


def _message_search(f: dict):
    """api.messages_query (status, source, type, idempotency_key = MSH-10, since, until) and the console's own."""
    query = api.messages_query()
    if f["window"] in WINDOWS:
        query = query.where(Message.received_at >= utcnow() - WINDOWS[f["window"]])
    if f["id"]:
        query = query.where(Message.id == f["id"])
    status = api._choice("delivery_status", api.DELIVERY_STATUSES)
    if status is not None and status != models.DELIVERED:
        # A status that few deliveries have (dead, open): their messages are found first, through the
        # (destination, status, updated_at) index (asked of each configured destination when none is given,
        # as the index leads with it), then sorted. Left to itself PostgreSQL walks the messages newest first
        # and probes each, which at a million messages took 0.5-1.3 s a page (bench/console_search.py).
        names = [f["destination"]] if f["destination"] else list(api.settings().routing.destinations)
        chosen = (select(Delivery.message_id).where(Delivery.destination.in_(names), Delivery.status == status)
                  .distinct().cte("chosen").prefix_with("MATERIALIZED"))
        query = query.join(chosen, chosen.c.message_id == Message.id)
    elif f["destination"] or status:
        match = select(Delivery.id).where(Delivery.message_id == Message.id)
        if f["destination"]:
            match = match.where(Delivery.destination == f["destination"])
        if status:
            match = match.where(Delivery.status == status)
        query = query.where(exists(match))
    if f["patient"]:
        hashed = search.search_key(f["patient"])
        if hashed is None:
            raise IngestError(400, "malformed", "patient search is off: COURIER_PSEUDONYM_KEY is not set")
        query = query.where(Message.id.in_(search.messages_of(hashed)))
    return query


@bp.get("/messages")
@page()
def messages():
    f, error, items, next_cursor, deliveries = _filters(), None, [], None, {}
    try:
        query = api.keyset(_message_search(f), Message.id, Message.received_at, request.args.get("cursor"))
        with api.store().session() as session:
            rows = session.scalars(query.limit(PAGE + 1)).all()
            items = [reports.message_doc(m) for m in rows[:PAGE]]
            if len(rows) > PAGE:
                next_cursor = api._encode_cursor(rows[PAGE - 1].received_at, rows[PAGE - 1].id)
            for message_id, name, status in session.execute(
                    select(Delivery.message_id, Delivery.destination, Delivery.status)
                    .where(Delivery.message_id.in_([m["id"] for m in items])).order_by(Delivery.destination)):
                deliveries.setdefault(message_id, []).append((name, status))
    except IngestError as exc:
        error = exc.message
    routing = api.settings().routing
    return render_template("console/messages.html", f=f, items=items, next_cursor=next_cursor, error=error,
                           deliveries=deliveries, sources=sorted(routing.sources),
                           destinations=sorted(routing.destinations), windows=list(WINDOWS),
                           statuses=api.MESSAGE_STATUSES, delivery_statuses=api.DELIVERY_STATUSES,
                           patient_search=search.search_key("x") is not None)


def _transformed(message: Message, body: bytes, delivery: Delivery) -> dict:
    """What the destination is sent: its transform applied to the stored body, as the worker does."""
    from courier.app.domain import transforms

    dest = api.settings().routing.destinations.get(delivery.destination)
    if dest is None:
        return {"error": "this destination is no longer in the routing config"}
    envelope = transforms.Envelope(message_id=message.id, source=message.source, message_type=message.type,
                                   content_type=message.content_type, body=body, destination=dest.name,
                                   clearance=dest.clearance)
    try:
        sent, content_type = transforms.apply(dest.transform, envelope)
    except Exception as exc:  # a transform is operator code: its failure is shown, as the dead delivery says
        return {"error": str(exc)[:1000]}
    return {"content_type": content_type, "text": sent.decode("utf-8", "replace"),
            "transform": dest.transform or "passthrough"}


def _body_view(message: Message, body: bytes) -> dict:
    text = body.decode("utf-8", "replace")
    view = {"text": text, "segments": None}
    if message.content_type.startswith("application/hl7-v2") or text.startswith("MSH"):
        from courier.app.hl7 import fields

        view["segments"] = fields.segments(text)
    return view


@bp.get("/messages/<message_id>")
@page()
def message(message_id: str):
    show_body = g.user.may("body")
    with api.store().session() as session:
        msg = outbox.trace(session, message_id)
        if msg is None:
            abort(404, f"no message {message_id}")
        doc = reports.message_doc(msg)
        deliveries = [reports.delivery_doc(d, with_log=True) for d in msg.deliveries]
        links = {"original": session.scalar(select(MessageLink.original_id).where(MessageLink.message_id == msg.id)),
                 "resends": list(session.scalars(select(MessageLink.message_id)
                                                 .where(MessageLink.original_id == msg.id)))}
        body = sent = None
        if show_body and msg.purged_at is None:
            try:
                raw = session.scalar(select(Message.body).where(Message.id == msg.id))
                body = _body_view(msg, raw)
                sent = {d.id: _transformed(msg, raw, d) for d in msg.deliveries}
            except crypto.Unreadable as exc:
                body = {"error": str(exc)}
            # Reading a body is reading PHI: who read which message is in the audit log.
            audit.record(session, actor=g.user.name, action="view_body", target=msg.id)
    return render_template("console/message.html", m=doc, deliveries=deliveries, body=body, sent=sent,
                           show_body=show_body, links=links)


@bp.post("/messages/<message_id>/resend")
@page("replay")
def resend(message_id: str):
    """Edit-then-resend: the edited body is ingested as a new message of the same source (the same path as
    POST /api/v1/messages), linked to the original, which is never changed."""
    edited = request.form.get("body", "").replace("\r\n", "\n")
    reason = request.form.get("reason", "").strip()
    with api.store().session() as session:
        original = session.get(Message, message_id)
        if original is None:
            abort(404, f"no message {message_id}")
        source, content_type = original.source, original.content_type
    if content_type.startswith("application/hl7-v2"):
        edited = edited.replace("\n", "\r")
    try:
        results, _ = ingest(api.store(), api.settings().routing, source=source, content_type=content_type,
                            body=edited.encode("utf-8"), idempotency_key=f"resend:{models.new_id()}")
    except IngestError as exc:
        return _done(f"not resent: {exc.message}", "console.message", message_id=message_id)
    new_id = results[0].message.id
    with api.store().session() as session:
        outbox.link_resend(session, new_id, message_id, actor=g.user.name, reason=reason)
    return _done(f"resent as a new message {new_id}", "console.message", message_id=new_id)


# --- dead letters ---------------------------------------------------------

def _dead(destination: str, error: str) -> tuple[list[tuple[str, str, int]], list[Delivery]]:
    """Dead deliveries grouped by (destination, error), and those matching the filter (newest first; DEAD_SCAN read)."""
    query = select(Delivery).where(Delivery.status == models.DEAD).order_by(Delivery.id.desc()).limit(DEAD_SCAN)
    if destination:
        query = query.where(Delivery.destination == destination)
    with api.store().session() as session:
        rows = session.scalars(query).all()
        session.expunge_all()
    groups = Counter((d.destination, _error_group(d.last_error)) for d in rows)
    matching = [d for d in rows if not error or _error_group(d.last_error) == error]
    return [(dest, err, n) for (dest, err), n in groups.most_common()], matching


def _error_group(last_error: str | None) -> str:
    return (last_error or "(no error recorded)")[:160]


@bp.get("/dead")
@page()
def dead():
    destination, error = request.args.get("destination", ""), request.args.get("error", "")
    groups, matching = _dead(destination, error)
    return render_template("console/dead.html", groups=groups, rows=matching[:200], total=len(matching),
                           destination=destination, error=error, cap=BULK_CAP, scan=DEAD_SCAN,
                           destinations=sorted(api.settings().routing.destinations))


@bp.post("/dead/replay")
@page("replay")
def replay_dead():
    """Replay one, a selection, or everything matching the filter (at most BULK_CAP per press)."""
    destination, error = request.form.get("destination", ""), request.form.get("error", "")
    reason = request.form.get("reason", "").strip() or "replayed from the console's dead letters"
    if request.form.get("all"):
        ids = [d.id for d in _dead(destination, error)[1]]
    else:
        ids = request.form.getlist("ids")
    if not ids:
        return _done("nothing selected", "console.dead", destination=destination, error=error)
    chosen, left = ids[:BULK_CAP], len(ids) - BULK_CAP
    with api.store().session() as session:
        replayed = outbox.replay(session, chosen, actor=g.user.name, reason=reason)
    more = f"; {left} more match: replay again for the next {BULK_CAP}" if left > 0 else ""
    return _done(f"replayed {len(replayed)} of {len(chosen)}{more}", "console.dead",
                 destination=destination, error=error)


# --- destination controls -------------------------------------------------

def _destination(name: str) -> dict:
    found = api._destinations(only=name)
    if not found:
        abort(404, f"no destination {name} in the routing config")
    return found[0]


@bp.get("/destinations/<name>")
@page()
def destination(name: str):
    dest = _destination(name)
    with api.store().session() as session:
        act = reports.activity(session).get(name) or reports.activity_row()
    chart = charts.bars(act["hourly"][models.DELIVERED], act["hourly"][models.DEAD], width=480, height=80)
    return render_template("console/destination.html", d=dest, act=act, chart=chart)


@bp.post("/destinations/<name>/<action>")
@page("replay")
def destination_action(name: str, action: str):
    _destination(name)
    reason = request.form.get("reason", "").strip()
    with api.store().session() as session:
        if action == "pause":
            if not reason:
                return _done("not paused: give a reason", "console.destination", name=name)
            outbox.pause_destination(session, name, actor=g.user.name, reason=reason)
            done = "paused"
        elif action == "resume":
            woken = outbox.resume_destination(session, name, actor=g.user.name, reason=reason)
            done = "was not paused" if woken is None else f"resumed; {woken} deliveries due now"
        elif action == "reset":
            before = outbox.reset_circuit(session, name, actor=g.user.name, reason=reason)
            done = f"circuit reset (it was {before or circuits.CLOSED})"
        elif action == "replay":
            try:
                since = datetime.fromisoformat(request.form.get("since", "").strip().replace("Z", "+00:00"))
            except ValueError:
                return _done("not replayed: give a time like 2026-12-07T21:00Z", "console.destination", name=name)
            since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            ids = outbox.replay(session, actor=g.user.name, reason=reason or "replay dead since", destination=name,
                                status=models.DEAD, since=since, limit=BULK_CAP)
            done = f"replayed {len(ids)} dead since {since.isoformat()}" + (
                f" (the cap of {BULK_CAP}: press again for more)" if len(ids) >= BULK_CAP else "")
        else:
            abort(404)
    return _done(done, "console.destination", name=name)


# --- audit, alerts, tokens ------------------------------------------------

@bp.get("/audit")
@page()
def audit_log():
    q, action, actor = (request.args.get(k, "").strip() for k in ("q", "action", "actor"))
    cursor = request.args.get("cursor", "")
    query = select(AuditRecord)
    if action:
        query = query.where(AuditRecord.action == action)
    if actor:
        query = query.where(AuditRecord.actor.contains(actor, autoescape=True))
    if q:
        query = query.where(AuditRecord.target.contains(q, autoescape=True) | AuditRecord.reason.contains(
            q, autoescape=True))
    if cursor.isdigit():
        query = query.where(AuditRecord.id < int(cursor))
    with api.store().session() as session:
        rows = session.scalars(query.order_by(AuditRecord.id.desc()).limit(PAGE + 1)).all()
        items = [api._audit(r) for r in rows[:PAGE]]
        actions = sorted(session.scalars(select(AuditRecord.action).distinct()))
    next_cursor = items[-1]["id"] if len(rows) > PAGE else None
    return render_template("console/audit.html", items=items, q=q, action=action, actor=actor, actions=actions,
                           next_cursor=next_cursor)


@bp.get("/alerts")
@page()
def alert_list():
    with api.store().session() as session:
        states = alerts.states(session)
    return render_template("console/alerts.html", states=states, rules=alerts.rules_of(api.settings()),
                           webhook=bool(alerts.webhook_url()))


@bp.route("/tokens", methods=["GET", "POST"])
@page("admin")
def token_admin():
    created = None
    if request.method == "POST":
        with api.store().session() as session:
            if request.form.get("revoke"):
                token_id = request.form["revoke"]
                row = tokens.revoke(session, token_id)
                if row is not None:
                    audit.record(session, actor=g.user.name, action="token_revoke", target=token_id,
                                 details={"scope": row.scope, "name": row.name})
            else:
                scope, source = request.form.get("scope", ""), request.form.get("source") or None
                if source is not None and source not in api.settings().routing.sources:
                    abort(400, f"no source {source} in the routing config")
                try:
                    row, plaintext = tokens.create(session, scope=scope, source=source,
                                                   name=request.form.get("name", "")[:128])
                except ValueError as exc:
                    abort(400, str(exc))
                audit.record(session, actor=g.user.name, action="token_create", target=row.id,
                             details={"scope": scope, "source": source, "name": row.name})
                created = {"id": row.id, "plaintext": plaintext}
    with api.store().session() as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.created_at.desc())).all()
        items = [{"id": t.id, "name": t.name, "scope": t.scope, "source": t.source, "created_at": t.created_at,
                  "last_used_at": t.last_used_at, "revoked_at": t.revoked_at} for t in rows]
    return render_template("console/tokens.html", items=items, created=created, scopes=tokens.SCOPES,
                           sources=sorted(api.settings().routing.sources))


# --- errors ---------------------------------------------------------------

@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    user = g.get("user")
    return render_template("console/error.html", code=exc.code, message=exc.description or exc.name,
                           user=user), exc.code or 500


@bp.errorhandler(SQLAlchemyError)
def _store_error(exc: SQLAlchemyError):
    api.log.error("console: store error: %s", type(exc).__name__)
    return render_template("console/error.html", code=503, message="The store is unreachable; try again.",
                           user=g.get("user")), 503


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)


__all__ = ["bp", "init_app", "page", "User"]
