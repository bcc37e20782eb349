"""Operator commands that need only the store and the config: db, config, tokens.

`tasks.cli` assembles these with the relay into the `courier` console script.
"""
from __future__ import annotations

import sys
from functools import update_wrapper
from pathlib import Path

import click
from flask import current_app
from flask.cli import ScriptInfo

import migrations
from app import tokens as token_store
from app.settings import ConfigError, load_settings


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


def _database_url() -> str:
    import os
    return os.environ.get("DATABASE_URL", "sqlite:///instance/courier.db")


@click.group("db")
def db_group():
    """Create and migrate the outbox store (DATABASE_URL)."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str):
    """Migrate the store up to REVISION (default: head)."""
    from alembic import command
    command.upgrade(alembic_config(_database_url()), revision)
    click.echo(f"database at {revision}")


@db_group.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str):
    """Migrate the store down to REVISION (e.g. -1, or base to drop Courier's tables)."""
    from alembic import command
    command.downgrade(alembic_config(_database_url()), revision)
    click.echo(f"database at {revision}")


@db_group.command("current")
def db_current():
    """Show the store's migration revision."""
    from alembic import command
    command.current(alembic_config(_database_url()))


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


@click.group("tokens")
def tokens_group():
    """Create and revoke API tokens (only their hashes are stored)."""


@tokens_group.command("create")
@click.option("--source", default=None, help="the source an ingest token posts as")
@click.option("--scope", type=click.Choice(token_store.SCOPES), default="ingest", show_default=True)
@click.option("--name", default="", help="a label, e.g. who holds the token")
@with_appcontext
def tokens_create(source: str | None, scope: str, name: str):
    """Create a token and print it once."""
    settings = current_app.extensions["courier.settings"]
    if source is not None and source not in settings.routing.sources:
        raise click.BadParameter(f"source {source!r} is not in {settings.config_path}", param_hint="--source")
    try:
        with current_app.extensions["courier.store"].session() as session:
            row, plaintext = token_store.create(session, scope=scope, source=source, name=name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"id: {row.id}", err=True)
    click.echo(f"scope: {scope}" + (f", source: {source}" if source else ""), err=True)
    click.echo("token (shown once, store it now):", err=True)
    click.echo(plaintext)


@tokens_group.command("revoke")
@click.argument("token_id")
@with_appcontext
def tokens_revoke(token_id: str):
    """Revoke a token by its id; it stops working at once."""
    with current_app.extensions["courier.store"].session() as session:
        row = token_store.revoke(session, token_id)
    if row is None:
        raise click.ClickException(f"no token with id {token_id}")
    click.echo(f"revoked {token_id}")


COMMANDS = (db_group, config_group, tokens_group)
