"""Where the tests find PostgreSQL and RabbitMQ, and a throwaway database on that PostgreSQL.

The machine's own servers by default (docs/operations.md, `make test`), overridable with
TEST_DATABASE_URL / TEST_BROKER_URL. Nothing here connects at import.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


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
