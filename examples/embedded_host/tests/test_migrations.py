"""Two Alembic histories in one database: the supply room's (alembic_version) and Courier's (courier_alembic_version)."""
from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

import courier.migrations
from conftest import HOST_DIR
from courier.app.store.schema import alembic_config

HOST_TABLES = {"stock_items", "stock_issues", "alembic_version"}


def host_script() -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(str(HOST_DIR / "alembic.ini")))


def courier_script(url: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(url))


def test_each_history_is_its_own(migrated):
    host, ours = host_script(), courier_script(migrated)
    assert Path(host.dir).resolve() == HOST_DIR / "migrations"
    assert Path(ours.dir).resolve() == Path(courier.migrations.__file__).resolve().parent
    host_revisions = {s.revision for s in host.walk_revisions()}
    courier_revisions = {s.revision for s in ours.walk_revisions()}
    assert host_revisions == {"s0001"}
    assert courier_revisions and not courier_revisions & host_revisions


def test_both_upgrades_ran_and_each_version_table_holds_only_its_own_revision(migrated):
    engine = create_engine(migrated)
    try:
        with engine.connect() as conn:
            tables = set(conn.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))
            host_versions = list(conn.scalars(text("SELECT version_num FROM alembic_version")))
            courier_versions = list(conn.scalars(text("SELECT version_num FROM courier_alembic_version")))
            stock = dict(conn.execute(text("SELECT sku, on_hand FROM stock_items")).all())
    finally:
        engine.dispose()
    assert host_versions == ["s0001"]
    assert courier_versions == list(courier_script(migrated).get_heads())
    courier_tables = tables - HOST_TABLES
    assert HOST_TABLES <= tables
    assert {"courier_messages", "courier_deliveries", "courier_alembic_version"} <= courier_tables
    assert all(name.startswith(courier.TABLE_PREFIX) for name in courier_tables), courier_tables
    assert stock == {"gauze-10": 40, "iv-set": 12}  # the host's seed rows, untouched by Courier's migrations
