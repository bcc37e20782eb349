"""circuits, audit log, ordered deliveries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

The circuit table is the breaker shared by every worker process; the audit log is
append-only; order_key serialises deliveries of one key on ordered destinations.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('courier_audit',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('target', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('details', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_courier_audit'))
    )
    op.create_index('ix_courier_audit_at', 'courier_audit', ['at'])

    op.create_table('courier_circuits',
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('trips', sa.Integer(), nullable=False),
    sa.Column('open_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('probe_delivery_id', sa.String(length=36), nullable=True),
    sa.Column('probe_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('paused_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('paused_by', sa.String(length=128), nullable=True),
    sa.Column('pause_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('destination', name=op.f('pk_courier_circuits'))
    )
    with op.batch_alter_table('courier_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('order_key', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_courier_deliveries_order', ['destination', 'order_key', 'id'], postgresql_where=sa.text("order_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying')"), sqlite_where=sa.text("order_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying')"))



def downgrade() -> None:
    with op.batch_alter_table('courier_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_courier_deliveries_order', postgresql_where=sa.text("order_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying')"), sqlite_where=sa.text("order_key IS NOT NULL AND status IN ('pending', 'in_flight', 'retrying')"))
        batch_op.drop_column('order_key')

    op.drop_table('courier_circuits')
    op.drop_table('courier_audit')
