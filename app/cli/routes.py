"""`courier routes test`: a dry run of routing and transforms for one message, from the config alone."""
from __future__ import annotations

import base64
import codecs
import json
import re
from urllib.parse import urlsplit

import click
from flask import current_app

from courier.app import ingest
from courier.app.cli.common import CONTROL
from courier.app.config import load_settings
from courier.app.domain import transforms
from courier.app.settings import ConfigError, RoutingConfig

DRY_RUN_DEAD = 3  # exit status: the message would be accepted, but a delivery would be dead at once
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
    if text is not None and not CONTROL.search(text):
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
