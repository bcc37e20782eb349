"""`courier flower`: Flower behind basic auth, with RabbitMQ's management API for queue lengths.

Flower without auth shows every task's arguments and lets anyone revoke tasks or
shut workers down, so this wrapper refuses to start without a credential; there is
no default password anywhere. FLOWER_BASIC_AUTH gives one; failing that,
FLOWER_AUTH_FILE (which `make run` sets to instance/flower-auth) names a file that
holds one, made once with a random password so a fresh clone comes up by itself.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import click

AUTH_HELP = ("FLOWER_BASIC_AUTH is not set: Flower needs basic auth (FLOWER_BASIC_AUTH=user:password, "
             "several separated by commas, or FLOWER_AUTH_FILE=a file to keep a generated one in); "
             "there is no default password")
GENERATED_USER = "courier"


def check_basic_auth(value: str | None) -> None:
    """Raise click.UsageError unless `value` is one or more non-empty `user:password` pairs."""
    if not value or not value.strip():
        raise click.UsageError(AUTH_HELP)
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user.strip() and password):
            raise click.UsageError("FLOWER_BASIC_AUTH must be user:password (several separated by commas)")


def generated_credential(path: Path) -> str:
    """The `courier:<password>` kept in `path`, made on first use (128 random bits, mode 0600 from creation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        check_basic_auth(value)  # a hand-edited file that lost its ':' fails here, naming the rule
        return value
    value = f"{GENERATED_USER}:{secrets.token_urlsafe(16)}"
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def basic_auth(env: dict[str, str]) -> tuple[str, bool]:
    """(the credential Flower is to use, whether it came from FLOWER_AUTH_FILE): FLOWER_BASIC_AUTH wins."""
    if not env.get("FLOWER_BASIC_AUTH") and env.get("FLOWER_AUTH_FILE"):
        return generated_credential(Path(env["FLOWER_AUTH_FILE"])), True
    check_basic_auth(env.get("FLOWER_BASIC_AUTH"))
    return env["FLOWER_BASIC_AUTH"], False


def broker_api_url(broker_url: str) -> str:
    """The RabbitMQ management API URL for `broker_url`: same host and credentials, port 15672 (15671 for amqps).
    For a failover list (`amqp://a;amqp://b`), the first node's: any node's API shows the whole cluster's queues."""
    url = urlsplit(broker_url.split(";")[0].strip())
    secure = url.scheme in ("amqps", "pyamqps")
    user = quote(unquote(url.username or "guest"), safe="")
    password = quote(unquote(url.password or "guest"), safe="")
    host = url.hostname or "localhost"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{'https' if secure else 'http'}://{user}:{password}@{host}:{15671 if secure else 15672}/api/"


@click.command("flower", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=lambda: os.environ.get("FLOWER_PORT", "5555"), show_default="FLOWER_PORT or 5555")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower_command(address: str, port: str, flower_args: tuple[str, ...]) -> None:
    """Run Flower behind basic auth (FLOWER_BASIC_AUTH or FLOWER_AUTH_FILE); FLOWER_BROKER_API overrides the management API."""
    env = dict(os.environ)
    env["FLOWER_BASIC_AUTH"], generated = basic_auth(env)
    if generated:
        user, _, password = env["FLOWER_BASIC_AUTH"].split(",")[0].partition(":")
        shown = "127.0.0.1" if address in ("0.0.0.0", "") else address  # nosec B104  # only compared, not bound
        click.echo(f"Flower: http://{shown}:{port}/ user {user} password {password} "
                   f"(kept in {env['FLOWER_AUTH_FILE']}; set FLOWER_BASIC_AUTH to choose your own)", err=True)
    if not env.get("FLOWER_BROKER_API"):
        # The default derives from BROKER_URL. Flower reads both secrets from the environment itself,
        # so neither the password nor the broker's credentials appear in `ps` output.
        env["FLOWER_BROKER_API"] = broker_api_url(env.get("BROKER_URL", "amqp://guest:guest@localhost:5672//"))
    celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or shutil.which("celery") or "celery"
    argv = [celery, "-A", "courier.tasks.worker", "flower", f"--address={address}", f"--port={port}", *flower_args]
    # Flower becomes this process: signals and exit codes reach it directly. B606 (process without a shell):
    # no shell, a fixed argv list; the extra arguments come from the operator's own command line.
    os.execve(celery, argv, env)  # nosec B606  # see above
