"""The supply room's Alembic environment: its own tables, and never Courier's (include_name)."""
import os

from alembic import context
from sqlalchemy import create_engine

import courier
from app.models import Base

url = os.environ.get("SUPPLYROOM_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
engine = create_engine(url)
with engine.connect() as connection:
    # include_name: without it, `alembic revision --autogenerate` would see Courier's
    # courier_* tables, missing from this app's metadata, and write a migration dropping them.
    context.configure(connection=connection, target_metadata=Base.metadata, include_name=courier.include_name)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
