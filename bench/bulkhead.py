"""Bulkhead benchmark: a healthy destination's delivery rate alone, and next to a dead one.

    .venv/bin/python bench/bulkhead.py [--messages 1000]

Needs the local PostgreSQL and RabbitMQ (as `make test`). Creates a scratch
database, stores N messages routed to `healthy` (an HTTP sink on loopback) and,
in the second run, also to `down` (a port where nothing listens), then starts
the real relay and worker processes and times how long `healthy` takes to
drain. Prints both rates and their ratio; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alembic import command  # noqa: E402
from kombu import Connection  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from courier.app.store import outbox  # noqa: E402
from courier.app.store.schema import alembic_config  # noqa: E402
from courier.app.store.db import Store  # noqa: E402
from courier.app.store.models import Delivery  # noqa: E402
from tests.support.config import write_config  # noqa: E402
from tests.support.services import ADMIN_URL, BROKER_URL  # noqa: E402
from tests.support.processes import Processes  # noqa: E402
from tests.support.sinks import HttpSink  # noqa: E402


def drain_rate(destinations: dict[str, str], n: int, workdir: Path) -> float:
    """Deliveries per second to `healthy` for n messages routed to every destination given."""
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"courier_bench_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    command.upgrade(alembic_config(url), "head")
    store = Store(url)
    prefix = f"courier-bench-{secrets.token_hex(3)}"
    cfg = write_config(workdir / "courier.yml", destinations,
                       retry={"max_attempts": 100, "initial": "200ms", "max": "1s"},
                       circuit={"failure_threshold": 5, "open_for": "5s"})
    with store.session() as s:
        for i in range(n):
            outbox.accept(s, outbox.NewMessage("lab", "service.completed", "application/json",
                                               b'{"type": "service.completed", "data": {}}', f"b{i}"),
                          list(destinations))
    env = {**os.environ, "DATABASE_URL": url, "BROKER_URL": BROKER_URL, "COURIER_CONFIG": str(cfg),
           "COURIER_QUEUE_PREFIX": prefix, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = Processes(env, workdir)
    try:
        procs.start("worker")
        procs.wait_ready()
        t0 = time.monotonic()
        procs.start("relay")
        while True:
            with store.session() as s:
                done = s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.destination == "healthy", Delivery.status == "delivered"))
            if done == n:
                return n / (time.monotonic() - t0)
            time.sleep(0.05)
    finally:
        procs.stop_all()
        store.dispose()
        with Connection(BROKER_URL) as conn:
            for dest in destinations:
                for kind in ("deliver", "dead"):
                    conn.default_channel.queue_delete(f"{prefix}.{kind}.{dest}")
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
            conn.execute(text(f'DROP DATABASE "{name}"'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    with HttpSink() as sink, tempfile.TemporaryDirectory() as tmp:
        solo = drain_rate({"healthy": sink.url}, args.messages, Path(tmp, "solo"))
        beside = drain_rate({"healthy": sink.url, "down": "http://127.0.0.1:9/"}, args.messages,
                            Path(tmp, "beside"))
    print(f"healthy alone:            {solo:8.0f} deliveries/s")
    print(f"healthy next to dead one: {beside:8.0f} deliveries/s")
    print(f"ratio:                    {beside / solo:8.2f}")


if __name__ == "__main__":
    main()
