"""Fixtures of the integration tests: a throwaway PostgreSQL database migrated by Alembic, a per-run
RabbitMQ queue prefix, the store, the app and its client, tokens.

Tests talk to the real PostgreSQL and RabbitMQ on localhost (the defaults of `make test`,
docs/operations.md), overridable with TEST_DATABASE_URL / TEST_BROKER_URL
(tests/support/services.py). Each run gets its own database and queue names, so runs never see
each other's rows or tasks. Nothing connects at import: only a fixture that is used does.
"""
from __future__ import annotations

import secrets

import pytest
from sqlalchemy import text

from courier.app import create_app
from courier.app.store.db import Store
from tests.support.config import settings_for, write_config
from tests.support.services import BROKER_URL, fresh_database

TABLES = ("courier_attempts", "courier_deliveries", "courier_messages", "courier_api_tokens", "courier_circuits",
          "courier_audit", "courier_rate_limits", "courier_patient_keys", "courier_message_links",
          "courier_console_sessions", "courier_alerts")


@pytest.fixture(scope="session")
def pg_url():
    """A fresh database for this test run, at Alembic head; dropped afterwards."""
    from alembic import command

    from courier.app.store.schema import alembic_config

    with fresh_database("courier_test") as url:
        command.upgrade(alembic_config(url), "head")
        yield url


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


@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "courier.yml", {"billing": "http://127.0.0.1:9/billing",
                                                   "erp": f"file://{tmp_path}/erp"})


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
