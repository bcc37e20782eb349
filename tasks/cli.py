"""The `courier` command: a Flask CLI group with the operator commands and the relay."""
from __future__ import annotations

import signal

import click
from flask import current_app
from flask.cli import FlaskGroup

from courier.app import create_app
from courier.app.cli import actions, config, db, keys, purge, routes, tokens, views
from courier.app.cli.common import with_appcontext
from courier.app.hl7.listener import mllp_command  # imports python-hl7 only when a listener starts
from courier.tasks.alerts import alerts_command
from courier.tasks.flower import flower_command
from courier.tasks.install import install_group


def _create_app():
    from courier.tasks.celery_app import celery_init_app

    flask_app = create_app()
    celery_init_app(flask_app)
    return flask_app


@click.command("relay")
@with_appcontext
def relay_command():
    """Dispatch due deliveries from the outbox to RabbitMQ until stopped."""
    from courier.tasks.celery_app import celery_for
    from courier.tasks.relay import Relay

    ext = current_app.extensions
    relay = Relay(ext["courier.settings"], ext["courier.store"], celery_for(current_app))
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish the round in hand, then stop
        signal.signal(sig, lambda *_: relay.stopping.set())
    relay.run()


class CourierGroup(FlaskGroup):
    """All commands are registered here, so listing or finding one never loads the app (or its config)."""

    def list_commands(self, ctx):
        return sorted(self.commands)

    def get_command(self, ctx, name):
        return self.commands.get(name)


cli = CourierGroup(name="courier", create_app=_create_app, add_version_option=False,
                   help="Courier: durable message delivery for healthcare integration.")
# The same commands under `flask --app HOST courier ...`, configured by the host's COURIER_* keys.
host_cli = click.Group("courier", help="Courier's commands, configured by this app's COURIER_* settings.")
COMMANDS = (db.db_group, config.config_group, tokens.tokens_group, actions.replay_command,
            actions.destinations_group, actions.audit_command, routes.routes_group, views.messages_group,
            views.deliveries_group, views.stats_command, purge.purge_command, keys.keys_group)
for command in COMMANDS + (relay_command, mllp_command, alerts_command):
    cli.add_command(command)
    host_cli.add_command(command)
cli.add_command(flower_command)  # Courier's own worker app only (courier.tasks.worker), not a host's
cli.add_command(install_group)  # writes unit files: needs neither the app nor its config


def main() -> None:
    cli.main()
