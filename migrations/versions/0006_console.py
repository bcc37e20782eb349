"""the operator console: patient search keys, edit-then-resend links, console sessions, alert states

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

courier_patient_keys: a keyed hash of each message's patient identifier (never the identifier), indexed
with the message's time, so the console finds a patient's messages among millions.
courier_message_links: a message made by editing another (the original is never changed).
courier_console_sessions: console logins, by the SHA-256 of the cookie (a logout ends one in every process).
courier_alerts: each alert rule's state, so a rule notifies once when it starts firing and once when it clears.
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('courier_patient_keys',
    sa.Column('message_id', sa.String(length=36), nullable=False),
    sa.Column('patient_key', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['courier_messages.id'], ondelete='CASCADE',
                            name=op.f('fk_courier_patient_keys_message_id_courier_messages')),
    sa.PrimaryKeyConstraint('message_id', name=op.f('pk_courier_patient_keys'))
    )
    op.create_index('ix_courier_patient_keys_key_received_at', 'courier_patient_keys',
                    ['patient_key', 'received_at'], unique=False)
    op.create_table('courier_message_links',
    sa.Column('message_id', sa.String(length=36), nullable=False),
    sa.Column('original_id', sa.String(length=36), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['courier_messages.id'], ondelete='CASCADE',
                            name=op.f('fk_courier_message_links_message_id_courier_messages')),
    sa.ForeignKeyConstraint(['original_id'], ['courier_messages.id'], ondelete='CASCADE',
                            name=op.f('fk_courier_message_links_original_id_courier_messages')),
    sa.PrimaryKeyConstraint('message_id', name=op.f('pk_courier_message_links'))
    )
    op.create_index('ix_courier_message_links_original_id', 'courier_message_links', ['original_id'], unique=False)
    op.create_table('courier_console_sessions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('token_id', sa.String(length=36), nullable=False),
    sa.Column('csrf', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['token_id'], ['courier_api_tokens.id'], ondelete='CASCADE',
                            name=op.f('fk_courier_console_sessions_token_id_courier_api_tokens')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_courier_console_sessions'))
    )
    op.create_table('courier_alerts',
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('firing', sa.Boolean(), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('value', sa.Double(), nullable=True),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('notified_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('rule', name=op.f('pk_courier_alerts'))
    )


def downgrade() -> None:
    op.drop_table('courier_alerts')
    op.drop_table('courier_console_sessions')
    op.drop_index('ix_courier_message_links_original_id', table_name='courier_message_links')
    op.drop_table('courier_message_links')
    op.drop_index('ix_courier_patient_keys_key_received_at', table_name='courier_patient_keys')
    op.drop_table('courier_patient_keys')
