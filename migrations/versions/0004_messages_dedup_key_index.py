"""index on the idempotency key alone

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21

GET /api/v1/messages?idempotency_key=... may come without a source; the unique index on
(source, dedup_key) cannot serve that lookup, and at millions of messages it scanned the table.
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('courier_messages', schema=None) as batch_op:
        batch_op.create_index('ix_courier_messages_dedup_key', ['dedup_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('courier_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_courier_messages_dedup_key')
