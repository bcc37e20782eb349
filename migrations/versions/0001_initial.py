"""initial schema: messages, deliveries, attempts, api tokens

Revision ID: 0001
Revises: 
Create Date: 2026-11-21

The due index is partial: it holds only open deliveries, so the relay's query stays
fast however many delivered rows accumulate.
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('courier_api_tokens',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=True),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_courier_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_courier_api_tokens_token_hash'))
    )
    op.create_table('courier_messages',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('content_type', sa.String(length=64), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('dedup_key', sa.String(length=255), nullable=True),
    sa.Column('correlation_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_courier_messages')),
    sa.UniqueConstraint('source', 'dedup_key', name='uq_courier_messages_source_dedup_key')
    )
    op.create_index('ix_courier_messages_received_at', 'courier_messages', ['received_at'])
    op.create_index('ix_courier_messages_source_received_at', 'courier_messages', ['source', 'received_at'])
    op.create_index('ix_courier_messages_status_received_at', 'courier_messages', ['status', 'received_at'])
    op.create_index('ix_courier_messages_type_received_at', 'courier_messages', ['type', 'received_at'])

    op.create_table('courier_deliveries',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('message_id', sa.String(length=36), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('dispatches', sa.Integer(), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['courier_messages.id'], name=op.f('fk_courier_deliveries_message_id_courier_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_courier_deliveries'))
    )
    op.create_index('ix_courier_deliveries_destination_status', 'courier_deliveries', ['destination', 'status', 'updated_at'])
    op.create_index('ix_courier_deliveries_due', 'courier_deliveries', ['due_at'], postgresql_where=sa.text("status IN ('pending', 'in_flight', 'retrying')"), sqlite_where=sa.text("status IN ('pending', 'in_flight', 'retrying')"))
    op.create_index('ix_courier_deliveries_message_id', 'courier_deliveries', ['message_id'])

    op.create_table('courier_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.String(length=36), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['delivery_id'], ['courier_deliveries.id'], name=op.f('fk_courier_attempts_delivery_id_courier_deliveries'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_courier_attempts'))
    )
    op.create_index('ix_courier_attempts_delivery_id', 'courier_attempts', ['delivery_id'])



def downgrade() -> None:
    # Dropping a table drops its indexes; children first for the foreign keys.
    for table in ("courier_attempts", "courier_deliveries", "courier_messages", "courier_api_tokens"):
        op.drop_table(table)
