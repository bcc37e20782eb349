"""Courier's Alembic migrations (courier.migrations), shipped inside the package so `courier db upgrade` works
from any install; env.py imports only the store (courier.app.store), in its own version table."""
