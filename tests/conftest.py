"""Fixtures: a throwaway PostgreSQL database migrated by Alembic, a per-run RabbitMQ queue prefix.

Tests talk to the real PostgreSQL and RabbitMQ on localhost (SPEC.md's defaults,
overridable with TEST_DATABASE_URL / TEST_BROKER_URL). Each run gets its own
database and queue names, so runs never see each other's rows or tasks.
"""
from __future__ import annotations

import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from courier.app import create_app
from courier.app.store.db import Store
from courier.app.config import load_routing, load_settings

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
TABLES = ("courier_attempts", "courier_deliveries", "courier_messages", "courier_api_tokens", "courier_circuits",
          "courier_audit", "courier_rate_limits")
HL7_SAMPLES = Path(__file__).resolve().parent / "data" / "hl7"


def _admin_engine():
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database; dropped afterwards (its connections cut first)."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url():
    """A fresh database for this test run, at Alembic head; dropped afterwards."""
    from alembic import command

    from courier.app.store.schema import alembic_config

    with fresh_database("courier_test") as url:
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture
def closed_port():
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="session")
def queue_prefix():
    """Queue names of this run; the queues are deleted at the end."""
    prefix = f"courier-test-{secrets.token_hex(4)}"
    yield prefix
    from kombu import Connection

    with Connection(BROKER_URL) as conn:
        channel = conn.default_channel
        for dest in ("billing", "erp"):
            for kind in ("deliver", "dead"):
                channel.queue_delete(f"{prefix}.{kind}.{dest}")
        for kind in ("deliver", "dead"):
            channel.exchange_delete(f"{prefix}.{kind}")


@pytest.fixture
def store(pg_url):
    s = Store(pg_url)
    yield s
    with s.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    s.dispose()


@pytest.fixture
def sqlite_store(tmp_path):
    """A SQLite store in tmp_path, migrated by Alembic: for the tests about SQLite support."""
    from alembic import command

    from courier.app.store.schema import alembic_config

    url = f"sqlite:///{tmp_path}/courier.db"
    command.upgrade(alembic_config(url), "head")
    s = Store(url)
    yield s
    s.dispose()


def write_config(path: Path, destinations: dict[str, str], routes: list[tuple[str, str, list[str]]] | None = None,
                 allowed_types: list[str] | None = None, **destination_options) -> Path:
    """A routing file with sources `lab` and `other` (no routes); by default every type of `lab` goes everywhere.

    Destinations have clearance phi unless told otherwise: they get messages as received
    (passthrough), which the configuration check allows only to destinations cleared for PHI.
    """
    routes = routes if routes is not None else [("lab", "*", list(destinations))]
    options = {"clearance": "phi", "timeout": "2s", "retry": {"max_attempts": 3, "initial": "100ms", "max": "1s"},
               **destination_options}
    doc = {
        "sources": {"lab": {"allowed_types": allowed_types or ["*"]}, "other": {}},
        "destinations": {name: {"url": url, **options} for name, url in destinations.items()},
        "routes": [{"match": {"source": s, "type": t}, "to": to} for s, t, to in routes],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "courier.yml", {"billing": "http://127.0.0.1:9/billing",
                                                   "erp": f"file://{tmp_path}/erp"})


def settings_for(config_path: Path, database_url: str, queue_prefix: str, **overrides):
    return load_settings(env={}, config_path=str(config_path), routing=load_routing(config_path, {}),
                         database_url=database_url, broker_url=BROKER_URL, queue_prefix=queue_prefix,
                         **overrides)


@pytest.fixture
def app(config_file, store, queue_prefix):
    flask_app = create_app(settings_for(config_file, store.url, queue_prefix), {"TESTING": True})
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    return flask_app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_token(store):
    from courier.app.store import tokens

    def make(scope="ingest", source="lab"):
        with store.session() as session:
            _, plaintext = tokens.create(session, scope=scope, source=source if scope == "ingest" else None)
        return {"Authorization": f"Bearer {plaintext}"}
    return make
