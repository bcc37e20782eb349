"""Operator commands that need only the store and the config: db, config, tokens, replay,
destinations, audit, keys, and `routes test` (the config alone: a dry run).

`courier.tasks.cli` assembles these with the relay into the `courier` console script.
"""
from __future__ import annotations

import base64
import codecs
import json
import os
import re
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from functools import update_wrapper
from pathlib import Path
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import ScriptInfo

from courier import migrations
from courier.app.store import audit, circuits, outbox
from courier.app import ingest
from courier.app.domain import transforms
from courier.app.store import tokens as token_store
from courier.app.store.db import make_engine, store_outage, store_problem
from courier.app.settings import DEFAULT_DATABASE_URL, ConfigError, RoutingConfig, parse_duration
from courier.app.config import load_settings


def alembic_config(url: str):
    """An Alembic config for Courier's migrations (shipped inside the package) against `url`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def with_appcontext(f):
    """flask.cli.with_appcontext, but a broken config exits 1 with its problems, not a traceback."""

    @click.pass_context
    def decorator(ctx, /, *args, **kwargs):
        if not current_app:
            try:
                app = ctx.ensure_object(ScriptInfo).load_app()
            except ConfigError as exc:
                for problem in exc.problems:
                    click.echo(problem, err=True)
                ctx.exit(1)
            ctx.with_resource(app.app_context())
        return ctx.invoke(f, *args, **kwargs)

    return update_wrapper(decorator, f)


def migrate(engine, command_name: str = "upgrade", *args: str) -> None:
    """Run an Alembic command (upgrade, downgrade, current) of Courier's migrations on `engine`.

    The engine may be a host application's: Courier's migrations touch only its own tables
    and its own version table (migrations/env.py).
    """
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        cfg.attributes["connection"] = connection
        getattr(command, command_name)(cfg, *args)


@contextmanager
def _store_engine():
    """The store of the app in hand (`flask --app host courier db ...`), else DATABASE_URL's.

    The standalone `courier db` loads no app, so it migrates even while the routing file is broken.
    """
    if current_app:
        yield current_app.extensions["courier.store"].engine
        return
    engine = make_engine(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    try:
        yield engine
    finally:
        engine.dispose()


@click.group("db")
def db_group():
    """Create and migrate the outbox store (DATABASE_URL)."""


UPGRADE_RETRY = 2.0  # seconds between `db upgrade`'s attempts to reach the database


class _Stderr:
    """What courier.app.observability.Outage logs to, for a command: its lines on stderr, its DEBUG ones nowhere."""

    def error(self, message: str) -> None:
        click.echo(message, err=True)

    info = error

    def debug(self, message: str) -> None:
        pass


def _wait_limit(value: str) -> float | None:
    """--wait: seconds, or None for forever."""
    if value.strip().lower() in ("forever", "inf", "infinite", "none", ""):
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--wait") from None
    if seconds < 0:
        raise click.BadParameter("must not be negative", param_hint="--wait")
    return seconds


def _wait_for_database(engine, limit: float | None) -> None:
    """Return once the database answers; while it is unreachable (not started yet, restarting) say so once
    and try again every UPGRADE_RETRY seconds, for `limit` seconds (None: forever). What waiting cannot
    fix (a refused login, a database that does not exist, SQLite's file) fails at once."""
    from sqlalchemy import text

    outage = store_outage(_Stderr(), engine.url, f"every {UPGRADE_RETRY:g}s",
                          "" if limit is None else f" for up to {limit:g}s (--wait)")
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            problem = store_problem(exc)
            if problem is None or not problem.retryable:
                reason = problem.reason if problem else f"{type(exc).__name__}: {_first_line(exc)}"
                raise click.ClickException(f"cannot use the database at {outage.where}: {reason}; check "
                                           "DATABASE_URL") from None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                waited = f" after {limit:g}s" if limit else ""
                raise click.ClickException(f"{outage.service} at {outage.where} is not reachable{waited} "
                                           f"({problem.reason}); {problem.hint}") from None
            outage.failed(problem.reason, problem.hint)
            time.sleep(UPGRADE_RETRY if left is None else min(UPGRADE_RETRY, left))
            continue
        outage.ok()
        return


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0][:200]


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.option("--wait", "wait", default="forever", show_default=True, envvar="COURIER_DB_WAIT", metavar="DURATION",
              help="How long to wait for a database that is not reachable yet (not started, restarting), "
                   f"trying every {UPGRADE_RETRY:g}s with one line saying so: e.g. 0 (fail at once), 90s, 10m, "
                   "forever (also COURIER_DB_WAIT). What waiting cannot fix (a bad DATABASE_URL, a refused login, "
                   "a missing database, a failing migration) fails at once.")
def db_upgrade(revision: str, wait: str):
    """Migrate the store up to REVISION (default: head), waiting for the database to be reachable (--wait)."""
    from alembic.util import CommandError
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    limit = _wait_limit(wait)
    with ExitStack() as stack:
        try:
            engine = stack.enter_context(_store_engine())
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise click.ClickException(f"DATABASE_URL is not usable: {exc}") from None
        _wait_for_database(engine, limit)
        try:
            migrate(engine, "upgrade", revision)
        except (SQLAlchemyError, CommandError) as exc:
            raise click.ClickException(f"migration to {revision} failed: {type(exc).__name__}: "
                                       f"{_first_line(exc)}") from None
    click.echo(f"database at {revision}")


@db_group.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str):
    """Migrate the store down to REVISION (e.g. -1, or base to drop Courier's tables)."""
    with _store_engine() as engine:
        migrate(engine, "downgrade", revision)
    click.echo(f"database at {revision}")


@db_group.command("current")
def db_current():
    """Show the store's migration revision."""
    with _store_engine() as engine:
        migrate(engine, "current")


@click.group("config")
def config_group():
    """Check the routing file (COURIER_CONFIG)."""


@config_group.command("check")
@click.option("--file", "path", default=None, help="the file to check (default: COURIER_CONFIG)")
def config_check(path: str | None):
    """Validate sources, destinations and routes; exit 1 with file:line for each problem."""
    try:
        settings = load_settings(config_path=path) if path else load_settings()
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(1)
    r = settings.routing
    click.echo(f"{r.path}: ok ({len(r.sources)} sources, {len(r.destinations)} destinations, "
               f"{len(r.routes)} routes)")


def cli_actor(name: str | None) -> str:
    """The audit log's actor for a command: `cli:<--actor>` if given, else `cli:<OS user>`."""
    return f"cli:{name}" if name else audit.cli_actor()


actor_option = click.option("--actor", default=None, metavar="NAME",
                            help="who is acting, for the audit log (default: the OS user)")


@click.group("tokens")
def tokens_group():
    """Create and revoke API tokens (only their hashes are stored)."""


@tokens_group.command("create")
@click.option("--source", default=None, help="the source an ingest token posts as")
@click.option("--scope", type=click.Choice(token_store.SCOPES), default="ingest", show_default=True)
@click.option("--name", default="", help="a label, e.g. who holds the token")
@actor_option
@with_appcontext
def tokens_create(source: str | None, scope: str, name: str, actor: str | None):
    """Create a token and print it once."""
    settings = current_app.extensions["courier.settings"]
    if source is not None and source not in settings.routing.sources:
        raise click.BadParameter(f"source {source!r} is not in {settings.config_path}", param_hint="--source")
    try:
        with current_app.extensions["courier.store"].session() as session:
            row, plaintext = token_store.create(session, scope=scope, source=source, name=name)
            # The token's id and grant, never its plaintext: the log is readable by every operator.
            audit.record(session, actor=cli_actor(actor), action="token_create", target=row.id,
                         details={"scope": scope, "source": source, "name": name})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"id: {row.id}", err=True)
    click.echo(f"scope: {scope}" + (f", source: {source}" if source else ""), err=True)
    click.echo("token (shown once, store it now):", err=True)
    click.echo(plaintext)


@tokens_group.command("revoke")
@click.argument("token_id")
@actor_option
@with_appcontext
def tokens_revoke(token_id: str, actor: str | None):
    """Revoke a token by its id; it stops working at once."""
    from courier.app.store.models import ApiToken

    with current_app.extensions["courier.store"].session() as session:
        before = session.get(ApiToken, token_id)
        already = before is not None and before.revoked_at is not None
        row = token_store.revoke(session, token_id)
        if row is not None:  # an unknown id changed nothing: no record
            audit.record(session, actor=cli_actor(actor), action="token_revoke", target=token_id,
                         details={"already_revoked": already, "scope": row.scope, "name": row.name})
    if row is None:
        raise click.ClickException(f"no token with id {token_id}")
    click.echo(f"revoked {token_id}")


# --- operator actions: replay, pause, resume, audit ---------------------------

class IsoTime(click.ParamType):
    """An ISO 8601 time; without an offset it is taken as UTC (said in --help)."""

    name = "ISO-TIME"

    def convert(self, value, param, ctx):
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"not an ISO 8601 time: {value!r} (e.g. 2026-11-21T10:00:00Z)", param, ctx)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


ISO_TIME = IsoTime()


def _store():
    return current_app.extensions["courier.store"]


def _check_destination(name: str) -> None:
    settings = current_app.extensions["courier.settings"]
    if name not in settings.routing.destinations:
        raise click.ClickException(f"unknown destination {name!r}: not in {settings.config_path} "
                                   f"(destinations: {', '.join(settings.routing.destinations) or 'none'})")


@click.command("replay")
@click.argument("delivery_ids", nargs=-1, metavar="[DELIVERY_ID]...")
@click.option("--destination", default=None, help="replay this destination's deliveries (filter form)")
@click.option("--status", type=click.Choice(outbox.REPLAYABLE), default=None, help="which ones (filter form)")
@click.option("--since", type=ISO_TIME, default=None, help="created at or after (UTC unless an offset is given)")
@click.option("--until", type=ISO_TIME, default=None, help="created before (UTC unless an offset is given)")
@click.option("--limit", type=click.IntRange(1, outbox.REPLAY_LIMIT), default=None,
              help=f"at most this many (default and maximum {outbox.REPLAY_LIMIT}); run again for more")
@click.option("--reason", default="", help="why, for the audit log")
@with_appcontext
def replay_command(delivery_ids, destination, status, since, until, limit, reason):
    """Make dead or delivered deliveries pending again (same id, fresh attempts).

    Either DELIVERY_ID..., or --destination NAME --status dead|delivered [--since] [--until].
    """
    filtered = any(v is not None for v in (destination, status, since, until, limit))
    if delivery_ids and filtered:
        raise click.UsageError("give delivery ids or a filter (--destination, --status, ...), not both")
    if not delivery_ids and not filtered:
        raise click.UsageError("give delivery ids, or --destination NAME --status dead|delivered")
    actor = audit.cli_actor()
    if delivery_ids:
        _replay_ids(list(dict.fromkeys(delivery_ids)), actor, reason)
        return
    if destination is None:
        raise click.UsageError("a filter needs --destination NAME (one destination per replay)")
    if status is None:
        raise click.UsageError("a filter needs --status dead|delivered")
    if since and until and since >= until:
        raise click.UsageError("--until must be later than --since")
    _check_destination(destination)
    limit = limit or outbox.REPLAY_LIMIT
    with _store().session() as session:
        ids = outbox.replay(session, actor=actor, reason=reason, destination=destination, status=status,
                            since=since, until=until, limit=limit)
    click.echo(f"replayed {len(ids)} {status} deliveries to {destination}")
    if len(ids) >= limit:
        click.echo(f"stopped at the limit of {limit}: run the same command again for the rest", err=True)


def _replay_ids(ids: list[str], actor: str, reason: str) -> None:
    """Replay what can be, report the rest, and exit 1 if anything was not replayed."""
    from sqlalchemy import select

    from courier.app.store.models import Delivery, Message

    with _store().session() as session:
        found = dict(session.execute(select(Delivery.id, Delivery.status).where(Delivery.id.in_(ids))).all())
        purged = set(session.scalars(select(Delivery.id).join(Message, Message.id == Delivery.message_id)
                                     .where(Delivery.id.in_(ids), Message.purged_at.is_not(None))))
        replayed: list[str] = []
        # Only when something can be replayed: a mistyped id leaves no audit record behind.
        if any(s in outbox.REPLAYABLE for s in found.values()):
            try:
                replayed = outbox.replay(session, ids, actor=actor, reason=reason)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
    if replayed:
        click.echo(f"replayed {len(replayed)} deliveries")
    done = set(replayed)
    left = [i for i in ids if i not in done]
    for i in left:
        why = (f"no delivery {i}" if i not in found else
               f"delivery {i}: retention purged its message's body, there is nothing to send" if i in purged else
               f"delivery {i} is {found[i]}; only dead or delivered deliveries can be replayed")
        click.echo(f"not replayed: {why}", err=True)
    if left:
        raise click.exceptions.Exit(1)


@click.group("destinations")
def destinations_group():
    """List destinations; pause and resume deliveries to one."""


@destinations_group.command("list")
@with_appcontext
def destinations_list():
    """Each destination's circuit, pause switch, backlog and dead deliveries."""
    settings = current_app.extensions["courier.settings"]
    with _store().session() as session:
        summary = outbox.destination_summary(session)
        rows = circuits.states(session)
    table = [("NAME", "CIRCUIT", "PAUSED", "BACKLOG", "DEAD")]
    notes = {}
    for name in settings.routing.destinations:
        row, counts = rows.get(name), summary.get(name, {"backlog": 0, "dead": 0})
        paused = bool(row and row.paused_at)
        table.append((name, circuits.shown_state(row), "yes" if paused else "no", str(counts["backlog"]),
                      str(counts["dead"])))
        if paused:
            notes[name] = f"paused by {row.paused_by} at {row.paused_at.isoformat(timespec='seconds')}: " \
                          f"{row.pause_reason or 'no reason given'}"
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        line = "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
        click.echo(line + (f"  ({notes[r[0]]})" if r[0] in notes else ""))


@destinations_group.command("pause")
@click.argument("name")
@click.option("--reason", required=True, help="why, for the audit log and the held deliveries' last_error")
@with_appcontext
def destinations_pause(name: str, reason: str):
    """Hold every delivery to NAME until resumed: nothing is attempted and no attempt is spent."""
    _check_destination(name)
    if not reason.strip():
        raise click.UsageError("--reason must say why")
    with _store().session() as session:
        outbox.pause_destination(session, name, actor=audit.cli_actor(), reason=reason)
    click.echo(f"paused {name}; resume with: courier destinations resume {name}")


@destinations_group.command("resume")
@click.argument("name")
@click.option("--reason", default="", help="why, for the audit log")
@with_appcontext
def destinations_resume(name: str, reason: str):
    """Lift a pause on NAME; the deliveries it held are due at once."""
    _check_destination(name)
    with _store().session() as session:
        woken = outbox.resume_destination(session, name, actor=audit.cli_actor(), reason=reason)
    if woken is None:
        click.echo(f"{name} was not paused")
    else:
        click.echo(f"resumed {name}; {woken} held deliveries are due now")


@click.command("audit")
@click.option("--since", type=ISO_TIME, default=None, help="at or after (UTC unless an offset is given)")
@click.option("--action", default=None,
              help="only this action: replay, pause, resume, purge, token_create, token_revoke, key_rotate")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@with_appcontext
def audit_command(since, action, limit):
    """Operator actions, newest first: time, actor, action, target, reason, details (tab-separated)."""
    with _store().session() as session:
        rows, more = audit.listing(session, since=since, action=action, limit=limit)
        lines = ["\t".join((r.at.isoformat(timespec="seconds"), r.actor, r.action, r.target, r.reason or "-",
                            r.details)) for r in rows]
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo("no audit records", err=True)
    elif more is not None:
        click.echo(f"(showing the newest {limit}; use --limit or --since for more)", err=True)


# --- routes test: a dry run of routing and transforms -------------------------

DRY_RUN_DEAD = 3  # exit status: the message would be accepted, but a delivery would be dead at once
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # bytes that could drive a terminal


def guess_content_type(body: bytes) -> str | None:
    """application/json for what starts like a JSON object, application/hl7-v2 for what starts
    with MSH, FHS or BHS (after a BOM and blanks); None when it looks like neither."""
    head = body.removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith((b"MSH", b"FHS", b"BHS")):
        return "application/hl7-v2"
    return "application/json" if head.startswith(b"{") else None


def _payload(body: bytes) -> dict:
    """{"payload": text}, or for bytes that are not printable UTF-8 text {"payload": None,
    "payload_base64": ...}: a dry run never writes control characters to a terminal."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _CONTROL.search(text):
        return {"payload": text}
    return {"payload": None, "payload_base64": base64.b64encode(body).decode("ascii")}


def dry_run(routing: RoutingConfig, plans: list[ingest.Plan], source: str) -> list[dict]:
    """Each planned message's destinations and what each would be sent, or why its transform
    refuses. The transform is called as courier.tasks.deliver.attempt() calls it (transforms.apply), on the body as it
    would be stored; only the message id is made up ('dry-run-<n>': nothing is stored)."""
    messages = []
    for number, plan in enumerate(plans, 1):
        parsed, outs = plan.parsed, []
        for name in plan.destinations:
            d = routing.destinations[name]
            # The URL's scheme only: the rest may hold passwords (sql+, amqp) or private hosts.
            out = {"name": name, "scheme": urlsplit(d.url).scheme, "clearance": d.clearance,
                   "transform": d.transform or "passthrough", "ordered_by": d.ordered_by,
                   "order_key": plan.order_keys.get(name), "content_type": None, "bytes": None,
                   "payload": None, "error": None}
            envelope = transforms.Envelope(f"dry-run-{number}", source, parsed.message_type, parsed.content_type,
                                           parsed.body, d.name, d.clearance)
            try:
                body, content_type = transforms.apply(d.transform, envelope)
            except transforms.TransformFailed as exc:  # as in the worker: dead at once, with this reason
                out["error"] = str(exc)
            else:
                out.update(content_type=content_type, bytes=len(body), **_payload(body))
            outs.append(out)
        messages.append({"type": parsed.message_type, "destinations": outs})
    return messages


def _echo_dry_run(name: str, source: str, content_type: str, messages: list[dict]) -> None:
    count = f"{len(messages)} messages (a batch)" if len(messages) > 1 else "1 message"
    click.echo(f"{name}: {count} from source {source} as {content_type}; dry run: nothing stored or sent")
    for number, message in enumerate(messages, 1):
        where = f"message {number} of {len(messages)}: " if len(messages) > 1 else ""
        if not message["destinations"]:
            click.echo(f"\n{where}{message['type']}: no route matches; it would be stored as unrouted, "
                       "with no deliveries")
            continue
        click.echo(f"\n{where}{message['type']} -> {', '.join(d['name'] for d in message['destinations'])}")
        for d in message["destinations"]:
            key = f"key {d['order_key']!r}" if d["order_key"] is not None else "no key: unordered"
            order = f", ordered by {d['ordered_by']} ({key})" if d["ordered_by"] else ""
            click.echo(f"\n=== {d['name']} ({d['scheme']}, clearance {d['clearance']}, "
                       f"transform {d['transform']}{order})")
            if d["error"]:
                click.echo(f"REFUSED, the delivery would be dead at once: {d['error']}")
            elif d["payload"] is None:
                click.echo(f"{d['content_type']}, {d['bytes']} bytes, not printable text; base64:")
                click.echo(d["payload_base64"])
            else:
                text = d["payload"]
                if "\r" in text.replace("\r\n", ""):  # HL7 segments end in CR, which a terminal would overprint
                    click.echo(f"{d['content_type']}, {d['bytes']} bytes (segments end in CR; one per line here)")
                    text = re.sub(r"\r\n?", "\n", text)
                else:
                    click.echo(f"{d['content_type']}, {d['bytes']} bytes")
                click.echo(text, nl=not text.endswith("\n"))


@click.group("routes")
def routes_group():
    """Try the routing file (COURIER_CONFIG) on a message, without storing or sending anything."""


@routes_group.command("test")
@click.argument("file", type=click.File("rb"))
@click.option("--source", default=None, help="the source it comes from (default: the only source configured)")
@click.option("--content-type", default=None,
              help="default: application/json for a JSON object, application/hl7-v2 for MSH/FHS/BHS")
@click.option("--config", "config_path", default=None, help="the routing file (default: COURIER_CONFIG)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (payloads exact)")
def routes_test(file, source: str | None, content_type: str | None, config_path: str | None, as_json: bool):
    """Show where FILE (a JSON event or HL7 v2; - for stdin) would go and what each destination would get.

    Parses, checks and routes it as ingest would, and runs each destination's transform as the
    worker would; the database and the broker are never touched. Exit 1 if the message would be
    refused, 3 if a destination's transform would refuse it (that delivery would be dead).
    """
    if current_app and "courier.settings" in current_app.extensions and not config_path:
        settings = current_app.extensions["courier.settings"]  # flask --app HOST courier routes test
    else:
        try:
            settings = load_settings(config_path=config_path) if config_path else load_settings()
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(problem, err=True)
            raise click.exceptions.Exit(1) from None
    routing = settings.routing
    if source is None:
        if len(routing.sources) != 1:
            raise click.UsageError(f"{routing.path} has {len(routing.sources)} sources: name one with --source "
                                   f"({', '.join(routing.sources) or 'none configured'})")
        (source,) = routing.sources
    elif source not in routing.sources:
        raise click.BadParameter(f"{source!r} is not a source in {routing.path} "
                                 f"(sources: {', '.join(routing.sources) or 'none'})", param_hint="--source")
    body = file.read()
    content_type = content_type or guess_content_type(body)
    if content_type is None:
        raise click.UsageError(f"cannot tell what {file.name} is (neither a JSON object nor HL7 v2 starting with "
                               "MSH, FHS or BHS): give --content-type")
    try:
        if len(body) > settings.max_message_bytes:  # as the API and the MLLP listener refuse it
            raise ingest.IngestError(413, "too_large", f"the body is larger than the limit of "
                                     f"{settings.max_message_bytes} bytes")
        plans, _ = ingest.plan(routing, source=source, content_type=content_type, body=body)
    except ingest.IngestError as exc:
        if as_json:
            click.echo(json.dumps({"error": {"code": exc.code, "message": exc.message, "details": exc.details}}))
        else:
            click.echo(f"refused ({exc.status} {exc.code}): {exc.message}", err=True)
            if exc.details:
                click.echo(f"details: {json.dumps(exc.details, ensure_ascii=False)}", err=True)
        raise click.exceptions.Exit(1) from None
    messages = dry_run(routing, plans, source)
    if as_json:
        click.echo(json.dumps({"file": file.name, "source": source, "content_type": content_type,
                               "messages": messages}, ensure_ascii=False, indent=2))
    else:
        _echo_dry_run(file.name, source, content_type, messages)
    if any(d["error"] for m in messages for d in m["destinations"]):
        raise click.exceptions.Exit(DRY_RUN_DEAD)


# --- operator views and retention: messages, deliveries, stats, purge ------------

def _clean(text: str | None, width: int = 0) -> str:
    """A value fit for a table cell: control characters replaced (they could drive a terminal), cut to width."""
    text = _CONTROL.sub("?", text or "").replace("\n", " ").replace("\t", " ")
    return text[:width - 1] + "…" if width and len(text) > width else text


def _echo_table(rows: list[tuple]) -> None:
    """Rows of cells as aligned columns; the first row is the header."""
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


json_option = click.option("--json", "as_json", is_flag=True, help="JSON for machines instead of a table")


@click.group("messages")
def messages_group():
    """Where a message is: its trace."""


@messages_group.command("show")
@click.argument("message_id")
@json_option
@with_appcontext
def messages_show(message_id: str, as_json: bool):
    """A message's metadata and each delivery with its attempt log (never the body), as GET /api/v1/messages/ID."""
    from courier.app.web.api import _delivery, _message  # the API's documents: the CLI shows exactly what it serves

    with _store().session() as session:
        message = outbox.trace(session, message_id)
        if message is None:
            raise click.ClickException(f"no message {message_id!r}")
        doc = _message(message)
        doc["deliveries"] = [_delivery(d, with_log=True) for d in message.deliveries]
    if as_json:
        _echo_json(doc)
        return
    body = f"{doc['size']} bytes, {doc['content_type']}"
    if doc["body_purged"]:
        body += f" (body purged by retention at {doc['purged_at']})"
    _echo_table([("message", doc["id"]), ("source", doc["source"]), ("type", doc["type"]),
                 ("status", doc["status"]), ("received", doc["received_at"]), ("body", body),
                 ("idempotency key", _clean(doc["idempotency_key"]) or None),
                 ("correlation id", _clean(doc["correlation_id"]))])
    for d in doc["deliveries"]:
        click.echo("")
        _echo_table([("delivery", d["id"]), ("destination", d["destination"]), ("status", d["status"]),
                     ("attempts", d["attempts"]), ("next attempt", d["next_attempt_at"]),
                     ("lease expires", d["lease_expires_at"]), ("delivered", d["delivered_at"]),
                     ("last error", _clean(d["last_error"]) or None)])
        if d["attempt_log"]:
            _echo_table([("  #", "STARTED", "MS", "OUTCOME", "STATUS", "DETAIL")] +
                        [(f"  {a['number']}", a["started_at"], a["duration_ms"], a["outcome"], a["status_code"],
                          _clean(a["detail"], 80)) for a in d["attempt_log"]])
    if not doc["deliveries"]:
        click.echo("\nno deliveries (no route matched)")


@click.group("deliveries")
def deliveries_group():
    """List deliveries: what is stuck, what is dead."""


@deliveries_group.command("list")
@click.option("--status", type=click.Choice(("pending", "in_flight", "retrying", "delivered", "dead")), default=None)
@click.option("--destination", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@json_option
@with_appcontext
def deliveries_list(status: str | None, destination: str | None, limit: int, as_json: bool):
    """Deliveries newest first, e.g. `--status dead --destination billing`, as GET /api/v1/deliveries."""
    from sqlalchemy import select

    from courier.app.web.api import _delivery
    from courier.app.store.models import Delivery

    query = select(Delivery)
    if status:
        query = query.where(Delivery.status == status)
    if destination:
        query = query.where(Delivery.destination == destination)
    with _store().session() as session:
        items = [_delivery(d) for d in session.scalars(query.order_by(Delivery.id.desc()).limit(limit))]
    if as_json:
        _echo_json({"items": items})
        return
    if not items:
        click.echo("no deliveries", err=True)
        return
    _echo_table([("ID", "MESSAGE", "DESTINATION", "STATUS", "ATTEMPTS", "UPDATED", "LAST_ERROR")] +
                [(d["id"], d["message_id"], d["destination"], d["status"], d["attempts"], d["updated_at"],
                  _clean(d["last_error"], 60) or None) for d in items])
    if len(items) == limit:
        click.echo(f"(showing the newest {limit}; use --limit for more)", err=True)


@click.command("stats")
@click.option("--since", type=ISO_TIME, default=None,
              help="count deliveries of messages received at or after (UTC unless an offset is given)")
@json_option
@with_appcontext
def stats_command(since, as_json: bool):
    """Per destination: accepted = delivered + pending + dead (the reconciliation), backlog, circuit, pause."""
    from courier.app.store import reports

    settings = current_app.extensions["courier.settings"]
    with _store().session() as session:
        totals = reports.reconciliation(session, since)
        summary = outbox.destination_summary(session)
        rows = circuits.states(session)
    doc = {}
    # Configured destinations, and any that still has deliveries after leaving the config.
    for name in list(settings.routing.destinations) + sorted(set(totals) - set(settings.routing.destinations)):
        counts = totals.get(name, {"accepted": 0, "delivered": 0, "pending": 0, "dead": 0})
        health, row = summary.get(name, {"backlog": 0, "last_success_at": None}), rows.get(name)
        last = health["last_success_at"]
        doc[name] = {**counts, "backlog": health["backlog"], "circuit": circuits.shown_state(row),
                     "paused": bool(row and row.paused_at), "configured": name in settings.routing.destinations,
                     "last_success_at": last.isoformat() if last else None}
    if as_json:
        _echo_json({"since": since.isoformat() if since else None, "destinations": doc})
        return
    _echo_table([("DESTINATION", "ACCEPTED", "DELIVERED", "PENDING", "DEAD", "BACKLOG", "CIRCUIT", "PAUSED",
                  "LAST_SUCCESS")] +
                [(name + ("" if d["configured"] else " (not configured)"), d["accepted"], d["delivered"],
                  d["pending"], d["dead"], d["backlog"], d["circuit"], "yes" if d["paused"] else "no",
                  d["last_success_at"]) for name, d in doc.items()])
    if since:
        click.echo(f"(counts for messages received since {since.isoformat()}; BACKLOG is all open deliveries)",
                   err=True)


@click.command("purge")
@click.option("--older-than", "older_than", required=True, metavar="AGE",
              help="messages received more than AGE ago, e.g. 30d, 12h")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="messages per transaction")
@click.option("--dry-run", is_flag=True, help="count what would be purged; change nothing")
@actor_option
@with_appcontext
def purge_command(older_than: str, batch: int, dry_run: bool, actor: str | None):
    """Remove the bodies of old messages delivered to every destination; metadata and audit stay."""
    from courier.app.store import retention
    from courier.app.settings import parse_duration

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    if age <= 0:
        raise click.BadParameter("must be longer than zero", param_hint="--older-than")
    result = retention.purge(_store(), age, actor=cli_actor(actor), batch=batch, dry_run=dry_run)
    cutoff = result.cutoff.isoformat(timespec="seconds")
    if dry_run:
        click.echo(f"would purge {result.purged} message bodies received before {cutoff} (dry run: nothing changed)")
        return
    click.echo(f"purged {result.purged} message bodies received before {cutoff} in {result.batches} batches")
    if result.skipped:
        click.echo(f"{len(result.skipped)} messages were locked by other work and are left for the next run",
                   err=True)


@click.group("keys")
def keys_group():
    """Encryption at rest (COURIER_ENCRYPTION_KEY): make a key, re-encrypt stored values under the first key.

    \b
    Rotating: 1. put a new key first in COURIER_ENCRYPTION_KEY, keep the old ones after it
              2. restart every process (web, worker, relay, MLLP) with that list
              3. courier keys rotate   (until it reports nothing left)
              4. drop the old keys and restart again
    """


@keys_group.command("generate")
def keys_generate():
    """Print a new random key (nothing is stored); its key id goes to stderr."""
    from cryptography.fernet import Fernet

    from courier.app.store import crypto

    key = Fernet.generate_key().decode("ascii")
    click.echo(f"key id {crypto.key_id(key)}; put the key first in {crypto.KEY_VARIABLE}:", err=True)
    click.echo(key)


@keys_group.command("rotate")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="rows per transaction (lower it for large bodies)")
@click.option("--dry-run", is_flag=True, help="count what would be re-encrypted; change nothing")
@actor_option
@with_appcontext
def keys_rotate(batch: int, dry_run: bool, actor: str | None):
    """Re-encrypt every stored body and attempt detail that is plaintext or under an older key.

    Runs while ingest and the workers go on. Exit 1 if values are left that are not under the
    first key (under a key that is not configured, or locked until the end): keep the old keys.
    """
    from courier.app.domain import governance
    from courier.app.store import rotation

    try:
        result = rotation.rotate(_store(), actor=cli_actor(actor), batch=batch, dry_run=dry_run)
    except (ValueError, governance.MissingKey) as exc:
        raise click.ClickException(str(exc)) from None
    for name, done in result.columns.items():
        if name == rotation.ORDER_KEYS:
            click.echo(f"{name}: {done.rotated} {'to replace' if dry_run else 'replaced'} by keyed pseudonyms"
                       + ("" if dry_run else f", {done.left} left"))
            continue
        if dry_run:
            click.echo(f"{name}: {done.rotated} to re-encrypt under key id {result.key_id}")
            continue
        unreadable = ", ".join(f"{n} under key id {k}" if k != "corrupted" else f"{n} corrupted"
                               for k, n in sorted(done.unreadable.items()))
        click.echo(f"{name}: {done.rotated} re-encrypted under key id {result.key_id}, {done.left} left"
                   + (f" (unreadable: {unreadable})" if unreadable else ""))
    if dry_run:
        click.echo("(dry run: nothing changed)", err=True)
    elif result.left:
        click.echo(f"{result.left} values are not under key id {result.key_id}: keep the old keys; run again, "
                   "or add the missing keys named above", err=True)
        sys.exit(1)


COMMANDS = (db_group, config_group, tokens_group, replay_command, destinations_group, audit_command,
            routes_group, messages_group, deliveries_group, stats_command, purge_command, keys_group)
