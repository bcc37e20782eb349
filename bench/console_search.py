"""Console search benchmark: the message browser (GET /console/messages) on a store of a million messages.

    .venv/bin/python bench/console_search.py [--messages 1000000] [--repeat 10] [--pages 20]

Needs the local PostgreSQL (as `make test`). Seeds a scratch database at Alembic head the way
bench/paging.py does (its `seed`: messages over 90 days, 5 sources, 20 skewed types, a delivery for
every third message to d0..d3, mostly delivered, 0.5 % dead), adds a patient search key for every
message (200,000 patients; the probe patient's keys made by courier.app.store.search.search_key, as
ingest makes them), then times each filter of the console's search form through a logged-in Flask
test client: the whole request, query and page rendering. Prints median and p95 ms per filter, and
the page after following `--pages` cursors. Asserts nothing; drops the database at the end.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ["COURIER_PSEUDONYM_KEY"] = "bench-" + "k" * 40  # patient search needs a key

from alembic import command  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.paging import END, seed  # noqa: E402
from courier.app import create_app  # noqa: E402
from courier.app.store import search, tokens  # noqa: E402
from courier.app.store.db import Store  # noqa: E402
from courier.app.store.schema import alembic_config  # noqa: E402
from tests.support.config import settings_for, write_config  # noqa: E402
from tests.support.services import fresh_database  # noqa: E402

PATIENTS = 200_000
PROBE = "MRN-PROBE-1"
# Every message gets a patient; the key of patient p is a stand-in of search_key's shape. The probe
# patient's messages (one in PATIENTS) get the real key of PROBE.
PATIENT_KEYS = """
INSERT INTO courier_patient_keys (message_id, patient_key, received_at)
SELECT id, CASE WHEN correlation_id::bigint % :patients = 7 THEN :probe
                ELSE 'psn:' || substr(md5('p' || (correlation_id::bigint % :patients)), 1, 24) END, received_at
FROM courier_messages
"""
ROWS = re.compile(r'href="/console/messages/[0-9a-f-]{36}"')
NEXT = re.compile(r'id="next-page" href="([^"]+)"')


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"{statistics.median(s):8.1f} {s[min(len(s) - 1, int(len(s) * 0.95))]:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=10, help="timings per filter")
    parser.add_argument("--pages", type=int, default=20, help="cursors followed before the deep page")
    args = parser.parse_args()
    with fresh_database("courier_console_bench") as url, tempfile.TemporaryDirectory() as tmp:
        command.upgrade(alembic_config(url), "head")
        store = Store(url)
        seeded = seed(store, args.messages, budget=3600)
        t0 = time.monotonic()
        with store.engine.begin() as conn:
            conn.execute(text(PATIENT_KEYS), {"patients": PATIENTS, "probe": search.search_key(PROBE)})
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE courier_patient_keys"))
            keys = conn.scalar(text("SELECT count(*) FROM courier_patient_keys"))
            deliveries = conn.scalar(text("SELECT count(*) FROM courier_deliveries"))
            dead_id = conn.scalar(text("SELECT message_id FROM courier_deliveries WHERE status = 'dead' LIMIT 1"))
        print(f"  patient keys in {time.monotonic() - t0:.0f} s", flush=True)
        config = write_config(Path(tmp) / "courier.yml", {f"d{i}": "http://127.0.0.1:9/" for i in range(4)})
        app = create_app(settings_for(config, url, "courier_console_bench"), {"TESTING": True})
        app.extensions["courier.store"].dispose()
        app.extensions["courier.store"] = store
        logging.getLogger("courier").setLevel(logging.WARNING)
        with store.session() as session:
            _, plaintext = tokens.create(session, scope="view", source=None, name="bench")
        client = app.test_client()
        login = client.get("/console/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf" value="([^"]+)"', login).group(1)
        assert client.post("/console/login", data={"token": plaintext, "csrf": csrf}).status_code == 303

        def get(path: str) -> tuple[float, str]:
            t = time.perf_counter()
            r = client.get(path)
            elapsed = (time.perf_counter() - t) * 1000
            assert r.status_code == 200, r.status_code
            return elapsed, r.get_data(as_text=True)

        day = END - timedelta(days=30)
        cases = [
            {}, {"since": (END - timedelta(days=1)).isoformat()},  # the seed ends at END: windows are since=
            {"since": (END - timedelta(days=7)).isoformat(), "source": "s3"},
            {"since": day.isoformat(), "until": (day + timedelta(days=1)).isoformat()},
            {"type": "t19"}, {"status": "unrouted"},
            {"idempotency_key": f"evt-{seeded // 2 + 1}"},  # MSH-10 / event id
            {"patient": PROBE}, {"patient": "MRN-NOBODY"},
            {"id": dead_id},
            {"destination": "d1"}, {"delivery_status": "dead"}, {"destination": "d1", "delivery_status": "dead"},
            {"source": "s4", "type": "t19", "delivery_status": "pending"},
        ]
        print(f"\n{seeded:,} messages, {deliveries:,} deliveries, {keys:,} patient keys; page of 50; "
              f"{args.repeat} timings per filter; deep page after {args.pages} cursors\n")
        print(f"{'GET /console/messages?':<64}{'median':>8} {'p95 ms':>8} rows")
        for params in cases:
            path = f"/console/messages?{urlencode(params)}"
            samples, page = [], ""
            for _ in range(args.repeat):
                elapsed, page = get(path)
                samples.append(elapsed)
            label = " ".join(f"{k}={str(v)[:19]}" for k, v in params.items()) or "(no filter)"
            print(f"{label:<64}{ms(samples)} {len(ROWS.findall(page)):4}", flush=True)
            walked, found = 1, NEXT.search(page)
            while found and walked < args.pages:
                _, page = get(found.group(1).replace("&amp;", "&"))
                walked, found = walked + 1, NEXT.search(page)
            if found:
                deep = [get(found.group(1).replace("&amp;", "&"))[0] for _ in range(args.repeat)]
                print(f"{'':<8}deep page {walked + 1:<46}{ms(deep)}", flush=True)
        store.dispose()


if __name__ == "__main__":
    main()
