"""Embedded mode's throughput: `emit` commits from a host, then delivery threads inside one process.

    .venv/bin/python bench/embedded.py [--events 2000] [--threads 4]

A fresh PostgreSQL database; a host app with Courier embedded (`Courier(app, engine=...)`);
`--events` emits, each in its own host transaction (the host's commit rate with an outbox row
per event); then `start_embedded(threads)` delivers them all to bench/sink.py on loopback, and
the drain time gives deliveries/s. One destination. Prints numbers; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from flask import Flask
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from courier.app.store.schema import migrate  # noqa: E402
from courier.app.store.models import Delivery  # noqa: E402
from bench.infra import free_port  # noqa: E402
from courier import Courier  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def delivered(engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status == "delivered"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    port = free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "bench" / "sink.py"), str(port)], stdout=subprocess.DEVNULL)
    name = f"courier_bench_embedded_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "courier.yml").write_text(json.dumps({  # JSON is YAML
                "sources": {"host": {}},
                "destinations": {"erp": {"url": f"http://127.0.0.1:{port}/events", "clearance": "phi"}},
                "routes": [{"match": {"source": "host"}, "to": ["erp"]}]}))
            app = Flask("host", root_path=tmp)
            app.config.update(COURIER_CONFIG="courier.yml", COURIER_SOURCE="host")
            courier = Courier(app, engine=engine)
            migrate(engine, "upgrade", "head")

            t0 = time.perf_counter()
            for i in range(args.events):
                with Session(engine) as session, session.begin():
                    courier.emit(session, "stock.issued", {"n": i, "sku": "gauze-10"}, idempotency_key=f"e-{i}")
            emit_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            handle = courier.start_embedded(threads=args.threads)
            while delivered(engine) < args.events:
                time.sleep(0.05)
            drain_s = time.perf_counter() - t0
            handle.stop()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_count") as r:
            sink_count = json.load(r)
        print(f"events {args.events}, delivery threads {args.threads}, one destination, PostgreSQL, loopback sink")
        print(f"emit, one host transaction each: {args.events / emit_s:8.0f} commits/s")
        print(f"embedded delivery (drain):        {args.events / drain_s:8.0f} deliveries/s")
        print(f"sink: {sink_count['distinct']} distinct keys, {sink_count['requests']} requests; load average "
              f"{os.getloadavg()[0]:.2f}")
    finally:
        sink.terminate()
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


if __name__ == "__main__":
    main()
