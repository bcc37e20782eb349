"""`courier config check`: validate the routing file and the environment, exit 1 with file:line per problem."""
from __future__ import annotations

import sys

import click

from courier.app.config import load_settings
from courier.app.settings import ConfigError


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
