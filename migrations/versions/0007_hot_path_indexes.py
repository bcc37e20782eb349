"""hot-path indexes: fewer index entries per message and per delivery

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Every status change of a delivery writes a new entry in each of its indexes (none of those
updates can be HOT: status and due_at are indexed), so each index costs on every step of
every delivery (docs/design.md, "The hot path"):
- courier_deliveries (destination, status, updated_at) -> (destination, status): no query
  reads updated_at through it, and the narrower entries are cheaper to write.
- courier_messages (status, received_at) -> a partial index of the unrouted messages: the
  status has two values, and `accepted` ones are found through received_at anyway.
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

UNROUTED = sa.text("status = 'unrouted'")


def upgrade() -> None:
    with op.batch_alter_table('courier_deliveries') as batch_op:
        batch_op.drop_index('ix_courier_deliveries_destination_status')
        batch_op.create_index('ix_courier_deliveries_destination_status', ['destination', 'status'])
    with op.batch_alter_table('courier_messages') as batch_op:
        batch_op.drop_index('ix_courier_messages_status_received_at')
        batch_op.create_index('ix_courier_messages_unrouted', ['received_at'], postgresql_where=UNROUTED,
                              sqlite_where=UNROUTED)


def downgrade() -> None:
    with op.batch_alter_table('courier_messages') as batch_op:
        batch_op.drop_index('ix_courier_messages_unrouted', postgresql_where=UNROUTED, sqlite_where=UNROUTED)
        batch_op.create_index('ix_courier_messages_status_received_at', ['status', 'received_at'])
    with op.batch_alter_table('courier_deliveries') as batch_op:
        batch_op.drop_index('ix_courier_deliveries_destination_status')
        batch_op.create_index('ix_courier_deliveries_destination_status', ['destination', 'status', 'updated_at'])
