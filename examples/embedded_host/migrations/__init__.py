"""The supply room's own Alembic history (`alembic upgrade head` here; version table alembic_version).

A package on purpose: `import migrations` is the host's, while Courier's own history is
courier.migrations (version table courier_alembic_version), run by `courier db upgrade`.
"""
