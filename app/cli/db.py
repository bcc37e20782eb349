"""`courier db`: create and migrate the outbox store (DATABASE_URL), waiting for the database when asked."""
from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager

import click
from flask import current_app

from courier.app.settings import DEFAULT_DATABASE_URL, parse_duration
from courier.app.store.db import make_engine, store_outage, store_problem
from courier.app.store.schema import migrate


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
