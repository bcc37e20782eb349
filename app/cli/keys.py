"""`courier keys`: make an encryption key, re-encrypt stored values under the first key."""
from __future__ import annotations

import sys

import click

from courier.app.cli.common import actor_option, cli_actor, store, with_appcontext


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
        result = rotation.rotate(store(), actor=cli_actor(actor), batch=batch, dry_run=dry_run)
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
