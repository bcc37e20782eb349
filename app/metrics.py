"""Prometheus metrics: counters written by every process, gauges read from the store at scrape time.

Counters and the latency histogram are incremented where things happen (web and
MLLP ingest, Celery worker processes) and kept in prometheus_client's
multiprocess files under PROMETHEUS_MULTIPROC_DIR, so `GET /metrics` (served
by any gunicorn worker) sums every process, dead ones included. Backlog, age,
dead letters and circuits are read from the store by `StoreCollector` when
scraped: they are the truth there, and no process has to keep them in step.

No label holds message content: only configured source, type and destination
names, statuses and outcomes. Nothing here reads `last_error` or pause reasons.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
from datetime import datetime

# prometheus_client picks its value class (in-process or mmap files) when it is first imported,
# from the environment: the default must be in place before that import. instance/ under the
# working directory, like the SQLite store: the Procfile's processes all start there (honcho), so
# the web, the workers and the MLLP listener share it without any setting. A host application
# that imported prometheus_client first keeps its in-process mode, and so do we (multiprocess_dir).
DEFAULT_DIR = os.path.join("instance", "metrics")
_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
if not _dir and "prometheus_client" not in sys.modules:
    _dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.abspath(DEFAULT_DIR)
if _dir:
    try:
        os.makedirs(_dir, exist_ok=True)
    except OSError as exc:  # metrics must not stop a process from starting: the hooks log their failures
        logging.getLogger("courier.metrics").error("metrics directory %s unusable: %s", _dir, exc)

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,  # noqa: E402
                               generate_latest, multiprocess, values)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

# SQLAlchemy and the store's models are imported inside the functions that read the store: gunicorn's
# master imports this module for its bookkeeping (clean_dead, process_dead) and needs neither; what it
# loads counts in its RSS besides each worker's.

log = logging.getLogger("courier.metrics")

# registry=None: in multiprocess mode the scrape reads the files, not these objects; in
# single-process mode (prometheus_client imported before us) `registry()` adds them itself.
ACCEPTED = Counter("courier_messages_accepted", "Messages accepted (committed), by source and type",
                   ["source", "type"], registry=None)
DELIVERIES = Counter("courier_deliveries", "Deliveries that reached a final status (delivered or dead)",
                     ["destination", "status"], registry=None)
ATTEMPTS = Counter("courier_delivery_attempts", "Attempts made at deliveries, by outcome "
                   "(delivered, temporary, permanent)", ["destination", "outcome"], registry=None)
# From acceptance to the destination's success: minutes of retries and hours of outages are normal.
LATENCY = Histogram("courier_delivery_latency_seconds", "Seconds from a message's acceptance to its "
                    "delivery", ["destination"], registry=None,
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400))
RATE_LIMITED = Counter("courier_rate_limited", "Messages refused by their source's rate limit (429, AE over "
                       "MLLP)", ["source"], registry=None)
OWN = (ACCEPTED, DELIVERIES, ATTEMPTS, LATENCY, RATE_LIMITED)


def multiprocess_dir() -> str | None:
    """The shared directory, or None when prometheus_client runs in-process (imported before this module)."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


# --- hooks: called after the transaction that made the fact true has committed ---------

def accepted(source: str, results) -> None:
    """Count newly stored messages of one ingest (courier.app.ingest.Result list); duplicates are not new."""
    try:
        for r in results:
            if r.created:
                ACCEPTED.labels(source, r.message.type).inc()
    except Exception:  # metrics must never turn an accepted message into an error
        log.exception("could not count accepted messages")


def rate_limited(source: str, n: int) -> None:
    """Count messages refused by the source's rate limit (a refused batch of 20 counts 20)."""
    try:
        RATE_LIMITED.labels(source).inc(n)
    except Exception:  # metrics must never change the answer
        log.exception("could not count rate-limited messages")


def delivered(store, results: dict, statuses: dict[str, str]) -> None:
    """Count a run_batch's attempts, final statuses and latencies.

    `results`: {destination: [(Ticket, Outcome | None)]}; `statuses`: {delivery id: status}.
    """
    from sqlalchemy import select

    from courier.app.store.models import DEAD, DELIVERED, Delivery, utcnow

    try:
        now = utcnow()
        destination_of = {}
        for name, sent in results.items():
            for ticket, outcome in sent:
                destination_of[ticket.delivery_id] = name
                if outcome is not None:
                    ATTEMPTS.labels(name, outcome.result).inc()
                if statuses.get(ticket.delivery_id) == DELIVERED:
                    LATENCY.labels(name).observe(max((now - ticket.received_at).total_seconds(), 0.0))
        unknown = [i for i, s in statuses.items() if s == DEAD and i not in destination_of]
        if unknown:  # gave up before sending (attempts spent by dead workers): rare, one read
            with store.session() as session:
                destination_of.update(session.execute(
                    select(Delivery.id, Delivery.destination).where(Delivery.id.in_(unknown))).tuples())
        for delivery_id, status in statuses.items():
            if status in (DELIVERED, DEAD) and delivery_id in destination_of:
                DELIVERIES.labels(destination_of[delivery_id], status).inc()
    except Exception:
        log.exception("could not count deliveries")


# --- process bookkeeping (deploy/gunicorn.conf.py) --------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_dead(path: str | None = None) -> int:
    """Remove the files of processes no longer running; how many. Called when the web starts.

    Not a wipe of the whole directory: workers and the MLLP listener write there too, and
    a web restarted alone must not erase their live files (they would go on writing into
    unlinked files, invisible). Dead processes' counts go with their files: a restart of
    the web is a counter reset, which Prometheus' rate() and increase() allow for.
    """
    path = path or multiprocess_dir()
    removed = 0
    for f in glob.glob(os.path.join(path or "", "*.db")) if path else []:
        try:
            pid = int(os.path.basename(f)[:-3].rsplit("_", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            os.remove(f)
            removed += 1
    return removed


def process_dead(pid: int) -> None:
    """gunicorn child_exit: drop a dead worker's live gauges (prometheus_client's bookkeeping)."""
    path = multiprocess_dir()
    if path:
        multiprocess.mark_process_dead(pid, path)


# --- scrape ---------------------------------------------------------------------------

def open_query():
    """Open deliveries per destination: count and oldest creation. Reads the partial index on open rows."""
    from sqlalchemy import func, select

    from courier.app.store.models import Delivery, is_open

    return (select(Delivery.destination, func.count(), func.min(Delivery.created_at))
            .where(is_open(Delivery.status)).group_by(Delivery.destination))


def dead_query(names: list[str]):
    """Dead deliveries per configured destination. Naming the destinations lets the
    (destination, status) index seek each one's dead rows; status alone would read the
    whole index, millions of delivered entries. A destination no longer configured is left out."""
    from sqlalchemy import func, select

    from courier.app.store.models import DEAD, Delivery

    return (select(Delivery.destination, func.count())
            .where(Delivery.destination.in_(names), Delivery.status == DEAD).group_by(Delivery.destination))


class StoreCollector:
    """Gauges read from the store at scrape time: backlog, oldest open age, dead letters, circuits.

    Three small queries: open deliveries grouped by destination (the partial index on open
    rows), dead ones of the configured destinations (the destination/status index), and the
    circuit rows (one per destination). Every configured destination appears, with 0 when idle.
    """

    def __init__(self, store, settings):
        self.store, self.settings = store, settings

    def collect(self):
        from sqlalchemy.exc import SQLAlchemyError

        from courier.app.store import circuits
        from courier.app.store.models import utcnow

        names = list(self.settings.routing.destinations)
        up = GaugeMetricFamily("courier_store_up", "1 if the store answered this scrape's queries")
        try:
            now = utcnow()
            with self.store.session() as session:
                open_rows = session.execute(open_query()).all()
                dead_rows = session.execute(dead_query(names)).all()
                rows = circuits.states(session)
                shown = {name: circuits.shown_state(row, now) for name, row in rows.items()}
                paused = {name for name, row in rows.items() if row.paused_at is not None}
        except SQLAlchemyError as exc:
            log.warning("metrics: store unreachable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        backlog = GaugeMetricFamily("courier_backlog", "Open deliveries (pending, in flight, retrying)",
                                    labels=["destination"])
        age = GaugeMetricFamily("courier_oldest_pending_age_seconds", "Age of the oldest open delivery "
                                "(0 when none)", labels=["destination"])
        dead = GaugeMetricFamily("courier_dead_deliveries", "Deliveries dead now (replay makes them "
                                 "pending again)", labels=["destination"])
        state = GaugeMetricFamily("courier_circuit_state", "1 for the circuit's current state",
                                  labels=["destination", "state"])
        held = GaugeMetricFamily("courier_destination_paused", "1 while an operator has paused the destination",
                                 labels=["destination"])
        opened = {name: (n, oldest) for name, n, oldest in open_rows}
        deads = dict(dead_rows)
        for name in sorted(set(names) | set(opened) | set(deads) | set(shown)):
            n, oldest = opened.get(name, (0, None))
            backlog.add_metric([name], n)
            age.add_metric([name], _age(now, oldest))
            dead.add_metric([name], deads.get(name, 0))
            for s in (circuits.CLOSED, circuits.OPEN, circuits.HALF_OPEN):
                state.add_metric([name, s], 1 if shown.get(name, circuits.CLOSED) == s else 0)
            held.add_metric([name], 1 if name in paused else 0)
        yield from (backlog, age, dead, state, held)


def _age(now: datetime, oldest: datetime | None) -> float:
    if oldest is None:
        return 0.0
    return max((now - oldest).total_seconds(), 0.0)


def registry(store, settings) -> CollectorRegistry:
    """A registry for one scrape: every process's counters plus the store's gauges."""
    reg = CollectorRegistry()
    path = multiprocess_dir()
    if path and os.path.isdir(path):
        multiprocess.MultiProcessCollector(reg, path)
    elif path:  # made at import, so it was removed or never could be: the store's gauges still answer
        log.error("metrics directory %s is missing: counters left out of this scrape", path)
    else:
        for metric in OWN:
            reg.register(metric)
    reg.register(StoreCollector(store, settings))
    return reg


def exposition(store, settings) -> tuple[bytes, str]:
    """The text exposition for `GET /metrics`, and its content type."""
    return generate_latest(registry(store, settings)), CONTENT_TYPE_LATEST


__all__ = ["accepted", "rate_limited", "delivered", "clean_dead", "process_dead", "exposition", "registry", "StoreCollector",
           "DEFAULT_DIR"]
