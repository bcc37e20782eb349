"""`courier tokens`: create and revoke API tokens (only their hashes are stored)."""
from __future__ import annotations

import click
from flask import current_app

from courier.app.cli.common import actor_option, cli_actor, with_appcontext
from courier.app.store import audit
from courier.app.store import tokens as token_store


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
