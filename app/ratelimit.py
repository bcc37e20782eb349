"""Per-source rate limits, shared by every web worker and MLLP listener through the store.

GCRA (the generic cell rate algorithm): one row per source holds its theoretical arrival
time `tat`. A message costs `interval` (period / count); n messages are let in when
`max(tat, now) + n * interval - burst * interval <= now`, and then `tat` moves to
`max(tat, now) + n * interval`. That is one upsert of one row in its own short transaction,
taken before the ingest transaction, so no lock is held while the message is stored. A
refusal changes nothing, so a sender that keeps retrying early does not push its own
allowance further away.
"""
from __future__ import annotations

import math

from sqlalchemy import text

from app.db import Store
from app.settings import RateLimit

US = 1_000_000  # tat and costs are integer microseconds: exact arithmetic in SQL, no float drift

# The store's clock, not the process's: web workers and MLLP listeners on several hosts share
# one PostgreSQL, and hosts' clocks differ by more than a burst's worth at high rates; the store's
# clock is one for all of them. SQLite is one file on one host, whose clock is the store's.
# Both are stable within one statement, so every use of {now} below is the same instant.
# `:now` (microseconds) replaces the clock when given: the unit tests walk time forward with it.
_CLOCK = {
    "postgresql": "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT)",
    "sqlite": "CAST(round((julianday('now') - 2440587.5) * 86400000000.0) AS INTEGER)",
}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "max"}

# First use inserts the row already charged; later uses update it only if the cost fits.
# A refused upsert returns no row (PostgreSQL and SQLite both skip RETURNING when the
# DO UPDATE's WHERE is false).
_TAKE = """
INSERT INTO courier_rate_limits AS r (source, tat) VALUES (:source, {now} + :cost)
ON CONFLICT (source) DO UPDATE SET tat = {greatest}(r.tat, {now}) + :cost
WHERE {greatest}(r.tat, {now}) + :cost - :window <= {now}
RETURNING tat
"""
_WAIT = "SELECT {greatest}(tat, {now}) + :cost - :window - {now} FROM courier_rate_limits WHERE source = :source"


def _sql(template: str, dialect: str) -> str:
    now = f"COALESCE(CAST(:now AS BIGINT), {_CLOCK[dialect]})"
    return template.format(now=now, greatest=_GREATEST[dialect])


def take(store: Store, source: str, limit: RateLimit, n: int = 1, now: float | None = None) -> int | None:
    """Let `n` messages of `source` in, or not: None when they may be stored, else whole seconds
    (at least 1) until they would be let in. `now`: seconds since the epoch instead of the store's clock.

    `n` must not exceed the burst (such a batch could never pass: the caller refuses it outright).
    """
    if not 1 <= n <= limit.burst:
        raise ValueError(f"{n} messages cannot pass a burst of {limit.burst}")
    dialect = store.engine.dialect.name
    interval = round(limit.period * US / limit.count)
    params = {"source": source, "cost": n * interval, "window": limit.burst * interval,
              "now": None if now is None else round(now * US)}
    with store.engine.begin() as conn:
        if conn.execute(text(_sql(_TAKE, dialect)), params).first() is not None:
            return None
        wait_us = conn.execute(text(_sql(_WAIT, dialect)), params).scalar_one()
    return max(1, math.ceil(wait_us / US))
