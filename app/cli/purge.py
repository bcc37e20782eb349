"""`courier purge`: retention by hand (the beat task does the same on COURIER_RETENTION)."""
from __future__ import annotations

import click

from courier.app.cli.common import actor_option, cli_actor, store, with_appcontext
from courier.app.settings import parse_duration


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

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    if age <= 0:
        raise click.BadParameter("must be longer than zero", param_hint="--older-than")
    result = retention.purge(store(), age, actor=cli_actor(actor), batch=batch, dry_run=dry_run)
    cutoff = result.cutoff.isoformat(timespec="seconds")
    if dry_run:
        click.echo(f"would purge {result.purged} message bodies received before {cutoff} (dry run: nothing changed)")
        return
    click.echo(f"purged {result.purged} message bodies received before {cutoff} in {result.batches} batches")
    if result.skipped:
        click.echo(f"{len(result.skipped)} messages were locked by other work and are left for the next run",
                   err=True)
