"""per-source rate limits

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21

One row per rate-limited source holding its GCRA theoretical arrival time, so every web
worker and MLLP listener counts against the same limit (courier.app.store.ratelimit).
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('courier_rate_limits',
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('tat', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('source', name=op.f('pk_courier_rate_limits'))
    )


def downgrade() -> None:
    op.drop_table('courier_rate_limits')
