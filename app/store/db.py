"""The SQLAlchemy engine and sessions for the outbox store (PostgreSQL or SQLite)."""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from courier.app.observability import Outage, start_hint
from courier.app.service_urls import database_hosts, database_url
from courier.app.settings import Settings
from courier.app.store import crypto

T = TypeVar("T")

# What the outage line tells an operator to do (README: Debian's PostgreSQL cluster of whatever version).
POSTGRES_START = start_hint("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
CHECK_URL = "check DATABASE_URL"


def make_engine(url: str, **kwargs) -> Engine:
    """An engine tuned for the outbox: idle connections pinged (databases restart), WAL and a busy timeout on SQLite.

    A libpq multi-host URL (`postgresql://u@hostA:5432,hostB:5432/db`) becomes SQLAlchemy's form (service_urls)."""
    url = database_url(url) if isinstance(url, str) else url
    parsed = make_url(url)
    kwargs.setdefault("hide_parameters", True)  # SQL errors in logs and Sentry must not carry bodies (PHI)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # pysqlite's own transaction handling delays BEGIN; we issue it ourselves so
            # SELECT-then-UPDATE in the relay is one transaction (see SQLAlchemy's SQLite notes).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


IDLE_PING = 1.0  # seconds: a pooled connection idle longer than this is pinged before use


def _ping_when_idle(engine: Engine) -> None:
    """Pre-ping only the connections that sat idle in the pool (the database may have restarted since).

    SQLAlchemy's pool_pre_ping pings at every checkout: under load that is a round trip and a
    statement for the database per transaction, for connections used a millisecond ago. A
    connection that fails its ping is replaced (DisconnectionError: the pool retries the checkout
    with a fresh one); one that breaks in use is invalidated with every older one, as usual.
    """
    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn, record):
        record.info["idle_from"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy):
        idle_from = record.info.get("idle_from")
        if idle_from is None or time.monotonic() - idle_from <= IDLE_PING:
            return  # new, or back in the pool a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(str(exc)) from exc


class Store:
    """One engine and session factory per app, with the encryption key ring of its settings (crypto.attach)."""

    def __init__(self, url: str | Engine, *, keys: crypto.KeyRing = crypto.NO_KEYS, **engine_kwargs):
        if isinstance(url, Engine) and url.dialect.name != "sqlite":
            self.engine = url  # a host application's engine: share its pool
        else:  # SQLite gets Courier's own engine on the same file: it needs WAL and BEGIN IMMEDIATE
            url = url.url if isinstance(url, Engine) else url
            self.engine = make_engine(url, **engine_kwargs)
        self.url = self.engine.url.render_as_string(hide_password=False)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        crypto.attach(self.engine, keys)

    @property
    def keys(self) -> crypto.KeyRing:
        """The encryption key ring of this store's engine (crypto.attach)."""
        return crypto.ring_of(self.engine.dialect)

    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine | None = None, **engine_kwargs) -> Store:
        """The store of `settings` (DATABASE_URL, or a host's `engine`) under COURIER_ENCRYPTION_KEY's ring."""
        return cls(engine if engine is not None else settings.database_url,
                   keys=crypto.parse_keys(settings.encryption_key), **engine_kwargs)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def transact(self, work: Callable[[Session], T], *, patience: float) -> T:
        """`work(session)` in a transaction, run again while the store is unreachable, for up to `patience` seconds.

        For the worker: a batch's outcomes are recorded as soon as the store is back rather than
        after its lease runs out (the sends happened; their outcomes must not wait 120 s), and a
        connection that died in a database restart costs a retry, not the batch. Only outages are
        retried (store_problem); any other error is raised at once. `work` must be safe to repeat:
        a commit whose answer was lost is run again (at worst an attempt is logged twice).
        """
        deadline, pause = time.monotonic() + patience, 0.2
        while True:
            try:
                with self.session() as session:
                    return work(session)
            except DBAPIError as exc:
                problem = store_problem(exc)
                if problem is None or not problem.retryable or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


# --- the store unreachable: what to say, whether to wait ---------------------------------------

@dataclass(frozen=True)
class StoreProblem:
    """Why the store cannot be used: `reason` for a log line, `retryable` if waiting can fix it (the server is
    down, starting or restarting) rather than the URL (a refused login, a database that does not exist)."""

    reason: str
    retryable: bool

    @property
    def hint(self) -> str:
        return POSTGRES_START if self.retryable else CHECK_URL


# libpq's words for "the server is not there (yet)", and a short reason for each.
_NETWORK_REASONS = (("connection refused", "connection refused"), ("timeout expired", "timed out"),
                    ("timed out", "timed out"), ("failed to resolve host", "host name not found"),
                    ("could not translate host name", "host name not found"),
                    ("name or service not known", "host name not found"),
                    ("no such file or directory", "no server on its socket"),
                    ("server closed the connection", "connection lost"), ("connection is lost", "connection lost"),
                    ("consuming input failed", "connection lost"), ("the connection is closed", "connection lost"),
                    ("connection not open", "connection lost"), ("network is unreachable", "network unreachable"),
                    ("no route to host", "no route to host"),
                    # target_session_attrs=read-write found only standbys: a failover is under way (docs/scaling.md)
                    ("hot standby mode", "only a read-only standby answers"),
                    ("session is read-only", "only a read-only standby answers"))
# A server that answered "FATAL: ..." and will take connections soon: waiting fixes these, not the URL.
_TRANSIENT_FATAL = (("starting up", "it is starting up"), ("shutting down", "it is shutting down"),
                    ("in recovery", "it is in recovery"), ("too many clients", "too many connections"),
                    ("terminating connection", "connection lost"), ("not yet accepting", "it is starting up"))


def store_problem(exc: BaseException) -> StoreProblem | None:
    """A StoreProblem if `exc` is the store failing to connect or losing its connection; None for any other
    error (a bad query, a lock timeout, a constraint): those are not outages and are reported as they are.

    SQLAlchemy wraps the driver's error (`.orig`); psycopg's own (the relay's LISTEN connection) come bare.
    psycopg gives no SQLSTATE for connection failures, so libpq's message decides.
    """
    orig = getattr(exc, "orig", None) or exc
    module = type(orig).__module__ or ""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return StoreProblem(_network_reason(str(orig)) or "connection lost", True)
    if not module.startswith("psycopg"):  # SQLite: "unable to open database file" and such; waiting fixes none
        return None
    if type(orig).__name__ not in ("OperationalError", "InterfaceError"):
        return None  # psycopg's other errors, and its subclasses of these (LockNotAvailable), are a query's
    message = str(orig)
    lowered = message.lower()
    if "fatal:" in lowered:
        for words, reason in _TRANSIENT_FATAL:
            if words in lowered:
                return StoreProblem(reason, True)
        # role or database does not exist, password authentication failed, no pg_hba.conf entry
        return StoreProblem(message[lowered.index("fatal:") + 6:].strip().splitlines()[0][:160], False)
    if getattr(orig, "sqlstate", None):  # an error of a query on a working connection (lock timeout, cancel)
        return None
    return StoreProblem(_network_reason(message) or message.strip().splitlines()[0][:160] or type(orig).__name__,
                        True)


def _network_reason(message: str) -> str | None:
    lowered = message.lower()
    return next((reason for words, reason in _NETWORK_REASONS if words in lowered), None)


def describe_url(url: str | URL) -> tuple[str, str]:
    """(service, where) for log lines: ("PostgreSQL", "127.0.0.1:5432/courier"), with every host of a multi-host
    URL ("hostA:5432,hostB:5432/courier"); never the user or password."""
    parsed = make_url(database_url(url)) if isinstance(url, str) else url
    if parsed.get_backend_name() == "sqlite":
        return "the SQLite store", parsed.database or ":memory:"
    service = "PostgreSQL" if parsed.get_backend_name() == "postgresql" else parsed.get_backend_name()
    return service, f"{','.join(database_hosts(parsed)) or 'the local socket'}/{parsed.database or ''}"


def store_outage(log, url: str | URL, retry: str, note: str = "") -> Outage:
    """The Outage reporter of the store at `url` (courier.app.observability.Outage)."""
    service, where = describe_url(url)
    return Outage(log, service, where, retry, note)


class StoreWatch:
    """For processes that use the store only when work comes (the MLLP listener, the worker): one line when it
    is found unreachable, one when it answers again, and a daemon thread that pings it every `interval`
    seconds in between, so "reachable again" comes when it is, not with the next message."""

    def __init__(self, store: Store, log: logging.Logger, interval: float = 5.0, note: str = ""):
        self.store, self.interval = store, interval
        self.outage = store_outage(log, store.engine.url, f"every {interval:g}s", note)
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def check(self) -> bool:
        """Ping the store now; True if it answered (an outage, if on, is over)."""
        try:
            self.store.ping()
        except Exception as exc:  # anything else than an outage is for whoever uses the store to report
            return not self.failed(exc)
        self.outage.ok()
        return True

    def check_in_background(self) -> None:
        """check() in a thread: a start-up must not wait for a connect timeout."""
        threading.Thread(target=self.check, name="courier-store-check", daemon=True).start()

    def failed(self, exc: BaseException) -> bool:
        """Work found the store failing with `exc`; True if that is an outage (now reported and watched)."""
        problem = store_problem(exc)
        if problem is None:
            return False
        self.outage.failed(problem.reason, problem.hint)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="courier-store-watch", daemon=True)
                self._thread.start()
        return True

    def ok(self) -> None:
        """Work used the store: an outage, if on, is over."""
        if self.outage.down:
            self.outage.ok()

    def stop(self) -> None:
        self.stopping.set()

    def _watch(self) -> None:
        while self.outage.down and not self.stopping.wait(self.interval):
            self.check()  # this thread is alive, so a failure here starts no second one
