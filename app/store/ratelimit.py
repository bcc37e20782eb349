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
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Engine

from courier.app.settings import RateLimit
from courier.app.store.db import Store

US = 1_000_000  # tat and costs are integer microseconds: exact arithmetic in SQL, no float drift

# The store's clock, not the process's: web workers and MLLP listeners on several hosts share
# one PostgreSQL, and hosts' clocks differ by more than a burst's worth at high rates; the store's
# clock is one for all of them. SQLite is one file on one host, whose clock is the store's.
# Both are stable within one statement, so every use of {now} below is the same instant. A statement
# that waited for the row lock reads a `now` older than the tat its predecessor wrote: it is judged
# as if it had come a little earlier, which can refuse early by that wait (milliseconds) but never admit more.
# `:now` (microseconds) replaces the clock when given: the unit tests walk time forward with it.
_CLOCK = {
    "postgresql": "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT)",
    "sqlite": "CAST(round((julianday('now') - 2440587.5) * 86400000000.0) AS INTEGER)",
}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "max"}

# On PostgreSQL the charge is one statement in autocommit: its own transaction in one round
# trip, and set_config(..., true) lets that transaction alone commit without waiting for the WAL
# flush (measured: about 3x the charges per second; bench/ratelimit.py). A database crash may then
# forget the last fraction of a second of charges, so a source could once send that many more;
# messages are still committed by the ingest's own transaction, which waits for the flush.
# SQLite (one host, `make run`) keeps a plain transaction.
_ROW = {
    "postgresql": "SELECT :source, {now} + :cost FROM (SELECT set_config('synchronous_commit', 'off', true)) AS c",
    "sqlite": "VALUES (:source, {now} + :cost)",
}

# First use inserts the row already charged; later uses update it only if the cost fits.
# A refused upsert returns no row (PostgreSQL and SQLite both skip RETURNING when the
# DO UPDATE's WHERE is false).
_TAKE = """
INSERT INTO courier_rate_limits AS r (source, tat) {row}
ON CONFLICT (source) DO UPDATE SET tat = {greatest}(r.tat, {now}) + :cost
WHERE {greatest}(r.tat, {now}) + :cost - :window <= {now}
RETURNING tat
"""
_WAIT = "SELECT {greatest}(tat, {now}) + :cost - :window - {now} FROM courier_rate_limits WHERE source = :source"


def _sql(template: str, dialect: str):
    now = f"COALESCE(CAST(:now AS BIGINT), {_CLOCK[dialect]})"
    return text(template.format(row=_ROW[dialect].format(now=now), now=now, greatest=_GREATEST[dialect]))


_STATEMENTS = {dialect: (_sql(_TAKE, dialect), _sql(_WAIT, dialect)) for dialect in _CLOCK}


@contextmanager
def _connect(engine: Engine):
    """A PostgreSQL connection in autocommit (the pool resets it on return), or a SQLite transaction."""
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def take(store: Store, source: str, limit: RateLimit, n: int = 1, now: float | None = None) -> int | None:
    """Let `n` messages of `source` in, or not: None when they may be stored, else whole seconds
    (at least 1) until they would be let in. `now`: seconds since the epoch instead of the store's clock.

    `n` must not exceed the burst (such a batch could never pass: the caller refuses it outright).
    """
    if not 1 <= n <= limit.burst:
        raise ValueError(f"{n} messages cannot pass a burst of {limit.burst}")
    charge, wait = _STATEMENTS[store.engine.dialect.name]
    interval = max(1, round(limit.period * US / limit.count))  # 0 would make every message free
    params = {"source": source, "cost": n * interval, "window": limit.burst * interval,
              "now": None if now is None else round(now * US)}
    with _connect(store.engine) as conn:
        if conn.execute(charge, params).first() is not None:
            return None
        wait_us = conn.execute(wait, params).scalar_one()
    return max(1, math.ceil(wait_us / US))
