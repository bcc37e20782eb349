"""The store's schema under Alembic: the config of Courier's migrations (shipped in the package) and running
them on an engine, which may be a host application's."""
from __future__ import annotations

from pathlib import Path

from courier import migrations


def alembic_config(url: str):
    """An Alembic config for Courier's migrations (shipped inside the package) against `url`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine, command_name: str = "upgrade", *args: str) -> None:
    """Run an Alembic command (upgrade, downgrade, current) of Courier's migrations on `engine`.

    The engine may be a host application's: Courier's migrations touch only its own tables
    and its own version table (migrations/env.py).
    """
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        cfg.attributes["connection"] = connection
        getattr(command, command_name)(cfg, *args)
