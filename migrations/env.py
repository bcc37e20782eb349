"""Alembic environment: Courier's migrations, on a connection the caller shares or on its URL.

Courier's revision lives in its own version table, `courier_alembic_version`, so its
migrations run in a host application's database next to the host's own Alembic
history (`alembic_version`) without either seeing the other's revisions.
"""
import sqlalchemy as sa
from alembic import context
from alembic.script import ScriptDirectory

from courier.app.store.db import make_engine
from courier.app.store.models import Base

VERSION_TABLE = "courier_alembic_version"
LEGACY_VERSION_TABLE = "alembic_version"  # where Courier 0.1 kept its revision

config = context.config
target_metadata = Base.metadata
OPTIONS = dict(target_metadata=target_metadata, version_table=VERSION_TABLE,
               # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables there.
               render_as_batch=True)


def adopt_legacy_version_table(connection: sa.Connection) -> None:
    """Move Courier 0.1's revision out of `alembic_version` (a host's Alembic owns that name), once."""
    inspector = sa.inspect(connection)
    if (inspector.has_table(VERSION_TABLE) or not inspector.has_table(LEGACY_VERSION_TABLE)
            or not inspector.has_table("courier_messages")):
        return
    ours = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    legacy = sa.table(LEGACY_VERSION_TABLE, sa.column("version_num"))
    found = [r for r in connection.scalars(sa.select(legacy.c.version_num)) if r in ours]
    if not found:
        return
    version = sa.Table(VERSION_TABLE, sa.MetaData(),  # the same shape Alembic creates
                       sa.Column("version_num", sa.String(32), nullable=False),
                       sa.PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"))
    version.create(connection)
    connection.execute(version.insert(), [{"version_num": r} for r in found])
    connection.execute(legacy.delete().where(legacy.c.version_num.in_(found)))
    if connection.scalar(sa.select(sa.func.count()).select_from(legacy)) == 0:
        connection.execute(sa.text(f"DROP TABLE {LEGACY_VERSION_TABLE}"))


def run_on(connection: sa.Connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        adopt_legacy_version_table(connection)
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:  # a host's engine, shared (courier.app.store.schema.migrate)
    run_on(config.attributes["connection"])
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        run_on(conn)
    engine.dispose()
