"""`courier replay`, `courier destinations` and `courier audit`: the operator actions, each in the audit log."""
from __future__ import annotations

import click
from flask import current_app

from courier.app.cli.common import ISO_TIME, check_destination, store, with_appcontext
from courier.app.store import audit, circuits, outbox


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
    check_destination(destination)
    limit = limit or outbox.REPLAY_LIMIT
    with store().session() as session:
        ids = outbox.replay(session, actor=actor, reason=reason, destination=destination, status=status,
                            since=since, until=until, limit=limit)
    click.echo(f"replayed {len(ids)} {status} deliveries to {destination}")
    if len(ids) >= limit:
        click.echo(f"stopped at the limit of {limit}: run the same command again for the rest", err=True)


def _replay_ids(ids: list[str], actor: str, reason: str) -> None:
    """Replay what can be, report the rest, and exit 1 if anything was not replayed."""
    from sqlalchemy import select

    from courier.app.store.models import Delivery, Message

    with store().session() as session:
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
    with store().session() as session:
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
    check_destination(name)
    if not reason.strip():
        raise click.UsageError("--reason must say why")
    with store().session() as session:
        outbox.pause_destination(session, name, actor=audit.cli_actor(), reason=reason)
    click.echo(f"paused {name}; resume with: courier destinations resume {name}")


@destinations_group.command("resume")
@click.argument("name")
@click.option("--reason", default="", help="why, for the audit log")
@with_appcontext
def destinations_resume(name: str, reason: str):
    """Lift a pause on NAME; the deliveries it held are due at once."""
    check_destination(name)
    with store().session() as session:
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
    with store().session() as session:
        rows, more = audit.listing(session, since=since, action=action, limit=limit)
        lines = ["\t".join((r.at.isoformat(timespec="seconds"), r.actor, r.action, r.target, r.reason or "-",
                            r.details)) for r in rows]
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo("no audit records", err=True)
    elif more is not None:
        click.echo(f"(showing the newest {limit}; use --limit or --since for more)", err=True)
