"""`courier messages show`, `courier deliveries list`, `courier stats`: where messages are, as the API says it."""
from __future__ import annotations

import click
from flask import current_app

from courier.app.cli.common import ISO_TIME, clean, echo_json, echo_table, json_option, store, with_appcontext
from courier.app.store import circuits, outbox, reports  # reports: the API's documents, so both show the same


@click.group("messages")
def messages_group():
    """Where a message is: its trace."""


@messages_group.command("show")
@click.argument("message_id")
@json_option
@with_appcontext
def messages_show(message_id: str, as_json: bool):
    """A message's metadata and each delivery with its attempt log (never the body), as GET /api/v1/messages/ID."""

    with store().session() as session:
        message = outbox.trace(session, message_id)
        if message is None:
            raise click.ClickException(f"no message {message_id!r}")
        doc = reports.message_doc(message)
        doc["deliveries"] = [reports.delivery_doc(d, with_log=True) for d in message.deliveries]
    if as_json:
        echo_json(doc)
        return
    body = f"{doc['size']} bytes, {doc['content_type']}"
    if doc["body_purged"]:
        body += f" (body purged by retention at {doc['purged_at']})"
    echo_table([("message", doc["id"]), ("source", doc["source"]), ("type", doc["type"]),
                 ("status", doc["status"]), ("received", doc["received_at"]), ("body", body),
                 ("idempotency key", clean(doc["idempotency_key"]) or None),
                 ("correlation id", clean(doc["correlation_id"]))])
    for d in doc["deliveries"]:
        click.echo("")
        echo_table([("delivery", d["id"]), ("destination", d["destination"]), ("status", d["status"]),
                     ("attempts", d["attempts"]), ("next attempt", d["next_attempt_at"]),
                     ("lease expires", d["lease_expires_at"]), ("delivered", d["delivered_at"]),
                     ("last error", clean(d["last_error"]) or None)])
        if d["attempt_log"]:
            echo_table([("  #", "STARTED", "MS", "OUTCOME", "STATUS", "DETAIL")] +
                        [(f"  {a['number']}", a["started_at"], a["duration_ms"], a["outcome"], a["status_code"],
                          clean(a["detail"], 80)) for a in d["attempt_log"]])
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

    from courier.app.store.models import Delivery

    query = select(Delivery)
    if status:
        query = query.where(Delivery.status == status)
    if destination:
        query = query.where(Delivery.destination == destination)
    with store().session() as session:
        items = [reports.delivery_doc(d) for d in session.scalars(query.order_by(Delivery.id.desc()).limit(limit))]
    if as_json:
        echo_json({"items": items})
        return
    if not items:
        click.echo("no deliveries", err=True)
        return
    echo_table([("ID", "MESSAGE", "DESTINATION", "STATUS", "ATTEMPTS", "UPDATED", "LAST_ERROR")] +
                [(d["id"], d["message_id"], d["destination"], d["status"], d["attempts"], d["updated_at"],
                  clean(d["last_error"], 60) or None) for d in items])
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
    with store().session() as session:
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
        echo_json({"since": since.isoformat() if since else None, "destinations": doc})
        return
    echo_table([("DESTINATION", "ACCEPTED", "DELIVERED", "PENDING", "DEAD", "BACKLOG", "CIRCUIT", "PAUSED",
                  "LAST_SUCCESS")] +
                [(name + ("" if d["configured"] else " (not configured)"), d["accepted"], d["delivered"],
                  d["pending"], d["dead"], d["backlog"], d["circuit"], "yes" if d["paused"] else "no",
                  d["last_success_at"]) for name, d in doc.items()])
    if since:
        click.echo(f"(counts for messages received since {since.isoformat()}; BACKLOG is all open deliveries)",
                   err=True)
