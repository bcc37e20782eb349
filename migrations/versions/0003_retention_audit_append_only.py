"""message retention, append-only audit log

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21

purged_at marks a message whose body retention removed (the row and its deliveries stay).
On PostgreSQL a trigger refuses UPDATE and DELETE on courier_audit, so the log stays
append-only whatever connects to the database; TRUNCATE (tests, a deliberate reset) is
not a row operation and stays possible for the table's owner.
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

APPEND_ONLY_FUNCTION = """
CREATE FUNCTION courier_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'courier_audit is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    with op.batch_alter_table('courier_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(APPEND_ONLY_FUNCTION)
        op.execute("CREATE TRIGGER courier_audit_append_only BEFORE UPDATE OR DELETE ON courier_audit "
                   "FOR EACH ROW EXECUTE FUNCTION courier_audit_append_only()")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS courier_audit_append_only ON courier_audit")
        op.execute("DROP FUNCTION IF EXISTS courier_audit_append_only()")
    with op.batch_alter_table('courier_messages', schema=None) as batch_op:
        batch_op.drop_column('purged_at')
