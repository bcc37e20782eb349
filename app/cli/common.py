"""What every operator command shares: loading the app (a broken config exits 1 with its problems), the
--actor and --json options, ISO times, and output fit for a terminal."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from functools import update_wrapper

import click
from flask import current_app
from flask.cli import ScriptInfo

from courier.app.settings import ConfigError
from courier.app.store import audit


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


def cli_actor(name: str | None) -> str:
    """The audit log's actor for a command: `cli:<--actor>` if given, else `cli:<OS user>`."""
    return f"cli:{name}" if name else audit.cli_actor()


actor_option = click.option("--actor", default=None, metavar="NAME",
                            help="who is acting, for the audit log (default: the OS user)")


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


def store():
    return current_app.extensions["courier.store"]


def check_destination(name: str) -> None:
    settings = current_app.extensions["courier.settings"]
    if name not in settings.routing.destinations:
        raise click.ClickException(f"unknown destination {name!r}: not in {settings.config_path} "
                                   f"(destinations: {', '.join(settings.routing.destinations) or 'none'})")


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # bytes that could drive a terminal


def clean(text: str | None, width: int = 0) -> str:
    """A value fit for a table cell: control characters replaced (they could drive a terminal), cut to width."""
    text = CONTROL.sub("?", text or "").replace("\n", " ").replace("\t", " ")
    return text[:width - 1] + "…" if width and len(text) > width else text


def echo_table(rows: list[tuple]) -> None:
    """Rows of cells as aligned columns; the first row is the header."""
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


json_option = click.option("--json", "as_json", is_flag=True, help="JSON for machines instead of a table")
