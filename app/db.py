"""The SQLAlchemy engine and sessions for the outbox store (PostgreSQL or SQLite)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs) -> Engine:
    """An engine tuned for the outbox: pre-ping (databases restart), WAL and a busy timeout on SQLite."""
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
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)


class Store:
    """One engine and session factory per process."""

    def __init__(self, url: str | Engine, **engine_kwargs):
        if isinstance(url, Engine) and url.dialect.name != "sqlite":
            self.engine = url  # a host application's engine: share its pool
        else:  # SQLite gets Courier's own engine on the same file: it needs WAL and BEGIN IMMEDIATE
            url = url.url if isinstance(url, Engine) else url
            self.engine = make_engine(url, **engine_kwargs)
        self.url = self.engine.url.render_as_string(hide_password=False)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
