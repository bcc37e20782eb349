"""Alembic migrations on both supported stores: a throwaway PostgreSQL database and a SQLite file.

`courier db upgrade|downgrade|current` run as subprocesses with only DATABASE_URL, as the
Procfile's `release` process does. The run's shared `pg_url` database is never touched here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from courier.app.store.schema import alembic_config
from courier.app.store.db import make_engine
from courier.app.store.models import Base
from tests.support.services import fresh_database

REPO = Path(__file__).resolve().parents[2]
COURIER = REPO / ".venv" / "bin" / "courier"
VERSION_TABLE = "courier_alembic_version"  # not alembic_version: a host app's own Alembic owns that
TABLES = {"courier_messages", "courier_deliveries", "courier_attempts", "courier_api_tokens", "courier_circuits",
          "courier_audit", "courier_patient_keys", "courier_message_links", "courier_console_sessions", "courier_alerts"}


def head_revision() -> str:
    """The newest revision in migrations/versions."""
    from alembic.script import ScriptDirectory

    from courier.app.store.schema import alembic_config
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
DUE_WHERE_STATUSES = ("'pending'", "'in_flight'", "'retrying'")


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request, tmp_path):
    """The URL of a brand-new, empty database of each backend; removed afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'instance' / 'courier.db'}"
        return
    with fresh_database("courier_migtest") as url:
        yield url


def courier_db(url: str, *args: str) -> subprocess.CompletedProcess:
    exe = COURIER if COURIER.exists() else Path(sys.executable).with_name("courier")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "FLASK_"))}
    env["DATABASE_URL"] = url
    result = subprocess.run([str(exe), "db", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"courier db {' '.join(args)} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def courier_tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) & (TABLES | {VERSION_TABLE})
    finally:
        engine.dispose()


def due_index_sql(url: str) -> str | None:
    """The stored definition of the relay's due index, as the database itself reports it."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                return conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_courier_deliveries_due'"))
            return conn.scalar(text("SELECT sql FROM sqlite_master WHERE type = 'index' "
                                    "AND name = 'ix_courier_deliveries_due'"))
    finally:
        engine.dispose()


def alembic_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    finally:
        engine.dispose()


def assert_at_head(url: str) -> None:
    assert courier_tables(url) == TABLES | {VERSION_TABLE}
    sql = due_index_sql(url)
    assert sql is not None, "ix_courier_deliveries_due is missing"
    # Partial: only open deliveries, on due_at. Without the WHERE the index grows with every delivered row.
    head, _, where = sql.partition(" WHERE ")
    assert "due_at" in head, sql
    assert where, f"ix_courier_deliveries_due is not partial: {sql}"
    for status in DUE_WHERE_STATUSES:
        assert status in where, sql
    assert "'delivered'" not in where and "'dead'" not in where, sql
    assert alembic_revision(url) == head_revision()


def test_upgrade_downgrade_upgrade_round_trip(empty_db):
    assert courier_tables(empty_db) == set()

    out = courier_db(empty_db, "upgrade")
    assert "database at head" in out.stdout
    assert_at_head(empty_db)

    courier_db(empty_db, "downgrade", "base")
    assert courier_tables(empty_db) == {VERSION_TABLE}  # Alembic's own bookkeeping stays, empty
    assert alembic_revision(empty_db) is None
    assert due_index_sql(empty_db) is None

    courier_db(empty_db, "upgrade")
    assert_at_head(empty_db)


def test_upgrade_at_head_keeps_rows_and_current_reports_head(empty_db):
    command.upgrade(alembic_config(empty_db), "head")
    engine = make_engine(empty_db)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO courier_api_tokens (id, name, scope, token_hash, created_at) "
                              "VALUES ('t1', 'n', 'admin', :h, CURRENT_TIMESTAMP)"), {"h": "0" * 64})
        command.upgrade(alembic_config(empty_db), "head")  # `release` runs on every deploy: a no-op at head
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM courier_api_tokens")) == 1
    finally:
        engine.dispose()
    assert f"{head_revision()} (head)" in courier_db(empty_db, "current").stdout


def test_models_match_the_migration(empty_db):
    """No drift: what `courier db upgrade` builds is exactly what courier.app.store.models declares."""
    command.upgrade(alembic_config(empty_db), "head")
    engine = make_engine(empty_db)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE,
                                                             "compare_server_default": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], "\n".join(map(repr, diff))


def test_model_due_index_is_partial_like_the_migration():
    """compare_metadata does not compare WHERE clauses; check the model's side by hand."""
    index = next(i for i in Base.metadata.tables["courier_deliveries"].indexes if i.name == "ix_courier_deliveries_due")
    assert [c.name for c in index.columns] == ["due_at"]
    for dialect in ("postgresql", "sqlite"):
        where = str(index.dialect_options[dialect]["where"])
        for status in DUE_WHERE_STATUSES:
            assert status in where, (dialect, where)


def test_a_revision_in_the_legacy_version_table_is_adopted(empty_db):
    """Courier 0.1 kept its revision in `alembic_version`; upgrading moves it and keeps the rows."""
    command.upgrade(alembic_config(empty_db), "0001")
    engine = make_engine(empty_db)
    try:
        with engine.begin() as conn:  # what a 0.1 install looks like
            conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
            conn.execute(text("INSERT INTO alembic_version VALUES ('0001'), ('host_rev_1')"))
            conn.execute(text("INSERT INTO courier_api_tokens (id, name, scope, token_hash, created_at) "
                              "VALUES ('t1', 'n', 'admin', :h, CURRENT_TIMESTAMP)"), {"h": "0" * 64})
        courier_db(empty_db, "upgrade")
        with engine.connect() as conn:
            # The host's revision stays where the host's Alembic looks; Courier's moved and went on to head.
            assert conn.scalars(text("SELECT version_num FROM alembic_version")).all() == ["host_rev_1"]
            assert conn.scalar(text("SELECT count(*) FROM courier_api_tokens")) == 1
    finally:
        engine.dispose()
    assert_at_head(empty_db)
