"""The supply room's test fixtures: a throwaway PostgreSQL database with both migration histories, a fake ERP.

TEST_DATABASE_URL (default: the local server's `test` database) is only where the throwaway
database is created; TEST_BROKER_URL is the RabbitMQ the Celery worker test uses.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

HOST_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment Courier is installed in: alembic, courier, flask, celery
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BROKER_URL = os.environ.get("TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"  # emit and embedded delivery need no broker


def host_env(database_url: str, **extra: str) -> dict[str, str]:
    """A host process's environment: its own database variable, Courier's settings as FLASK_COURIER_*,
    nothing inherited that could point elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COURIER_", "FLASK_", "SUPPLYROOM_")) and k not in ("DATABASE_URL", "PYTHONPATH")}
    env.update(SUPPLYROOM_DATABASE_URL=database_url, PYTHONUNBUFFERED="1", **extra)
    return env


def run(argv: list[str], env: dict[str, str], *, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=HOST_DIR, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def database_url():
    """A new, empty database on the test server; dropped at the end (its connections cut first)."""
    name = f"supplyroom_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
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
def migrated(database_url):
    """What the supply room's deploy runs: its own Alembic history, then Courier's (`courier db upgrade`).

    Courier's command runs with this folder first on PYTHONPATH, so the host's `migrations` (and `app`,
    `tasks`) are what a bare `import migrations` would find there: Courier must not be one of those."""
    run([str(BIN / "alembic"), "upgrade", "head"], host_env(database_url))
    run([str(BIN / "courier"), "db", "upgrade"],
        host_env(database_url, DATABASE_URL=database_url, PYTHONPATH=str(HOST_DIR)))
    return database_url


class Erp:
    """The ERP's endpoint: records every POST to /supply-events and answers 200."""

    def __init__(self):
        self.received: list[dict] = []
        self._lock = threading.Lock()
        erp = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = self.path == "/supply-events"
                if ok:
                    with erp._lock:
                        erp.received.append(json.loads(body))
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/supply-events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"the ERP got {len(self.received)} events, expected {count}"
        return list(self.received)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def erp(monkeypatch):
    server = Erp()
    monkeypatch.setenv("ERP_URL", server.url)  # app/courier.yml reads ${ERP_URL}
    yield server
    server.close()


@pytest.fixture
def queue_prefix():
    return f"supplyroom-test-{secrets.token_hex(4)}"


@pytest.fixture
def host(migrated, erp, queue_prefix):
    """The supply room in this process, on the migrated database; its rows and Courier's emptied afterwards."""
    from app import create_app

    flask_app = create_app({"DATABASE_URL": migrated, "TESTING": True, "COURIER_QUEUE_PREFIX": queue_prefix,
                            "COURIER_BROKER_URL": UNREACHABLE_BROKER})
    yield flask_app
    engine = flask_app.extensions["supplyroom.engine"]
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE stock_issues, courier_attempts, courier_deliveries, courier_messages, "
                          "courier_api_tokens, courier_circuits, courier_audit CASCADE"))
        conn.execute(text("UPDATE stock_items SET on_hand = CASE sku WHEN 'gauze-10' THEN 40 ELSE 12 END"))
    engine.dispose()


def scalar(flask_app, sql: str, **params):
    with flask_app.extensions["supplyroom.engine"].connect() as conn:
        return conn.scalar(text(sql), params)


def rows(flask_app, sql: str, **params) -> list[tuple]:
    with flask_app.extensions["supplyroom.engine"].connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def delivery_statuses(flask_app) -> list[str]:
    return [r[0] for r in rows(flask_app, "SELECT status FROM courier_deliveries ORDER BY status")]


def wait_statuses(flask_app, expected: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while delivery_statuses(flask_app) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert delivery_statuses(flask_app) == expected
