"""Fixtures every test may use, unit and integration: nothing here needs a server or connects to one.

The fixtures that need PostgreSQL or RabbitMQ (pg_url, queue_prefix, store, app, ...) are in
tests/integration/conftest.py; plain helpers are in tests/support/ (tests/README.md).
"""
from __future__ import annotations

import socket

import pytest


@pytest.fixture
def closed_port():
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()
