"""Courier's Alembic migrations, shipped inside the package so `courier db upgrade` works from any install."""
