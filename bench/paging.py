"""Paging benchmark: GET /api/v1/messages and /api/v1/deliveries at millions of rows.

    .venv/bin/python bench/paging.py [--messages 10000000] [--seed-budget 420] [--pages 100]

Needs the local PostgreSQL (as `make test`). Creates a scratch database, migrates it as
`courier db upgrade` does (Alembic head: the real schema and indexes), seeds messages with
INSERT ... SELECT FROM generate_series (5 sources and 20 types, skewed; 3 % unrouted; received_at
over 90 days, many sharing a second; idempotency keys) and deliveries for a third of them, then
ANALYZE. For each filter it times the first page and the page after following `--pages` cursors
through the Flask test client, and prints median/p95 ms with the top node and the scan of the
plan PostgreSQL chooses. Asserts nothing; drops the database at the end.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alembic import command  # noqa: E402
from sqlalchemy import text  # noqa: E402

from courier.app.web import api
from courier.app import create_app
from courier.app.store import tokens  # noqa: E402
from courier.app.store.schema import alembic_config  # noqa: E402
from courier.app.store.db import Store  # noqa: E402
from courier.app.store.models import Delivery, Message  # noqa: E402
from tests.support.config import settings_for, write_config  # noqa: E402
from tests.support.services import fresh_database  # noqa: E402

BATCH = 1_000_000
END = datetime(2026, 11, 21, tzinfo=timezone.utc)
START = END - timedelta(days=90)

# One batch of messages, rows :lo..:hi of :n spread evenly over 90 days (truncated to the second,
# so ties on received_at are common). The id is UUIDv7-like from received_at, as new_id makes it.
MESSAGES = """
INSERT INTO courier_messages (id, source, type, content_type, body, size, dedup_key, correlation_id,
                              status, received_at)
SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(h, 14, 3) || '-8' || substr(h, 18, 3)
       || '-' || substr(h, 21, 12),
       's' || floor(5 * r1 * r1)::int, 't' || floor(20 * r2 * r2 * r2)::int, 'application/json', '\\x7b7d', 2,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'evt-' || g END, g::text,
       CASE WHEN g % 33 = 0 THEN 'unrouted' ELSE 'accepted' END, at
FROM (SELECT g, at, random() AS r1, random() AS r2,
             lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || md5(g::text) AS h
      FROM (SELECT g, date_trunc('second', CAST(:start AS timestamptz)
                                     + (CAST(:end AS timestamptz) - CAST(:start AS timestamptz))
                                     * (g::float8 / CAST(:n AS bigint))) AS at
            FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS g) t) s
"""

# A delivery for every third message to one of four destinations: mostly delivered, some dead/open.
DELIVERIES = """
INSERT INTO courier_deliveries (id, message_id, destination, status, attempts, dispatches, created_at, updated_at)
SELECT m.id, m.id, 'd' || (abs(hashtext(m.id)) % 4),
       CASE WHEN abs(hashtext(m.correlation_id)) % 200 = 0 THEN 'dead'
            WHEN abs(hashtext(m.correlation_id)) % 100 = 1 THEN 'pending' ELSE 'delivered' END,
       1, 1, m.received_at, m.received_at
FROM courier_messages m WHERE m.correlation_id::bigint % 3 = 0
"""


def seed(store: Store, n: int, budget: float) -> int:
    """Messages (as many of n as fit in `budget` seconds, whole batches), deliveries, indexes, ANALYZE."""
    with store.engine.begin() as conn:
        # Bulk load without the secondary indexes, then build the very definitions the migrations made.
        uniques = conn.execute(text("SELECT conname, conrelid::regclass::text, pg_get_constraintdef(oid) "
                                    "FROM pg_constraint WHERE contype = 'u' AND conrelid = "
                                    "'courier_messages'::regclass")).all()
        for name, table, _ in uniques:
            conn.execute(text(f"ALTER TABLE {table} DROP CONSTRAINT {name}"))
        defs = conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN "
                                 "('courier_messages', 'courier_deliveries') AND indexname NOT LIKE 'pk_%'")).all()
        for name, _ in defs:
            conn.execute(text(f"DROP INDEX {name}"))
        defs += [(name, f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
                 for name, table, definition in uniques]
    t0, seeded = time.monotonic(), 0
    for lo in range(1, n + 1, BATCH):
        hi = min(lo + BATCH - 1, n)
        with store.engine.begin() as conn:
            conn.execute(text(MESSAGES), {"lo": lo, "hi": hi, "n": n, "start": START, "end": END})
        seeded = hi
        print(f"  seeded {seeded:,} messages in {time.monotonic() - t0:.0f} s", flush=True)
        if time.monotonic() - t0 > budget and seeded < n:
            print(f"  seed budget {budget:.0f} s spent: measuring at {seeded:,} messages", flush=True)
            break
    with store.engine.begin() as conn:
        conn.execute(text(DELIVERIES))
        print(f"  deliveries in {time.monotonic() - t0:.0f} s", flush=True)
        conn.execute(text("SET maintenance_work_mem = '1GB'"))
        for name, ddl in defs:
            conn.execute(text(ddl))
            print(f"  {name} in {time.monotonic() - t0:.0f} s", flush=True)
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE courier_messages"))
        conn.execute(text("VACUUM ANALYZE courier_deliveries"))
    print(f"  seeded and analyzed in {time.monotonic() - t0:.0f} s", flush=True)
    return seeded


def plan(app, store: Store, path: str, params: dict) -> str:
    """Top node and scan of the plan for the query the endpoint builds from these parameters."""
    with app.test_request_context(f"{path}?{urlencode(params)}"):
        if path.endswith("messages"):
            query = api.keyset(api.messages_query(), Message.id, Message.received_at, params.get("cursor"))
        else:
            query = api.keyset(api.deliveries_query(), Delivery.id, None, params.get("cursor"))
        sql = str(query.limit(101).compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        lines = [r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}")]
    top = lines[0].split("  (")[0].strip()
    scans = [ln.strip().lstrip("-> ").split("  (")[0] for ln in lines if "Scan" in ln]
    return f"{top} / {scans[0] if scans else '-'}"


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"{statistics.median(s):7.1f} {s[min(len(s) - 1, int(len(s) * 0.95))]:7.1f}"


def measure(app, store: Store, client, headers, path: str, params: dict, pages: int, repeat: int) -> str:
    def get(extra):
        t = time.perf_counter()
        r = client.get(f"{path}?{urlencode({**params, **extra})}", headers=headers)
        elapsed = (time.perf_counter() - t) * 1000
        assert r.status_code == 200, r.get_json()
        return elapsed, r.get_json()
    first = [get({})[0] for _ in range(repeat)]
    cursor, walked = get({})[1]["next_cursor"], 1
    while cursor and walked < pages:
        cursor, walked = get({"cursor": cursor})[1]["next_cursor"], walked + 1
    row = f"{ms(first)}  {plan(app, store, path, params)}"
    if cursor:
        deep = [get({"cursor": cursor})[0] for _ in range(repeat)]
        row += f"\n{'':36}deep page {walked + 1:>4}: {ms(deep)}  {plan(app, store, path, {**params, 'cursor': cursor})}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--seed-budget", type=float, default=420, help="seconds of seeding before measuring")
    parser.add_argument("--pages", type=int, default=100, help="cursors followed before the deep page")
    parser.add_argument("--repeat", type=int, default=20, help="timings per page")
    args = parser.parse_args()
    with fresh_database("courier_paging") as url, tempfile.TemporaryDirectory() as tmp:
        command.upgrade(alembic_config(url), "head")  # what `courier db upgrade` runs
        store = Store(url)
        seeded = seed(store, args.messages, args.seed_budget)
        with store.engine.connect() as conn:
            deliveries = conn.scalar(text("SELECT count(*) FROM courier_deliveries"))
        config = write_config(Path(tmp) / "courier.yml", {"d0": "http://127.0.0.1:9/"})
        app = create_app(settings_for(config, url, "courier_paging"), {"TESTING": True})
        app.extensions["courier.store"].dispose()
        app.extensions["courier.store"] = store
        logging.getLogger("courier").setLevel(logging.WARNING)  # a log line per request is not the measurement
        with store.session() as session:
            _, plaintext = tokens.create(session, scope="operate", source=None)
        headers, client = {"Authorization": f"Bearer {plaintext}"}, app.test_client()
        day = START + timedelta(days=60)
        cases = [
            ("messages", {}), ("messages", {"status": "unrouted"}), ("messages", {"source": "s3"}),
            ("messages", {"type": "t7"}), ("messages", {"type": "t19"}),
            ("messages", {"since": day.isoformat(), "until": (day + timedelta(days=1)).isoformat()}),
            ("messages", {"idempotency_key": f"evt-{seeded // 2 + 1}"}),
            ("messages", {"idempotency_key": f"evt-{seeded // 2 + 1}", "source": "s0"}),
            ("messages", {"source": "s4", "type": "t19"}),
            ("messages", {"status": "unrouted", "source": "s4", "since": day.isoformat()}),
            ("deliveries", {}), ("deliveries", {"status": "dead"}), ("deliveries", {"destination": "d1"}),
            ("deliveries", {"destination": "d1", "status": "dead"}),
            ("deliveries", {"destination": "d1", "status": "pending"}),
        ]
        print(f"\n{seeded:,} messages, {deliveries:,} deliveries; limit 100; {args.repeat} timings per page; "
              f"deep page after following {args.pages} cursors\n")
        print(f"{'endpoint and filter':<52}{'median':>7} {'p95 ms':>7}  plan: top node / first scan")
        for kind, params in cases:
            label = f"{kind} {' '.join(f'{k}={v[:19]}' for k, v in params.items()) or '(none)'}"
            print(f"{label:<52}{measure(app, store, client, headers, f'/api/v1/{kind}', params, args.pages, args.repeat)}",
                  flush=True)
        store.dispose()


if __name__ == "__main__":
    main()
