"""stock items and stock issues

Revision ID: s0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "s0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stock_items",
        sa.Column("sku", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("on_hand", sa.Integer(), nullable=False),
        sa.CheckConstraint("on_hand >= 0", name=op.f("ck_stock_items_on_hand_not_negative")),
        sa.PrimaryKeyConstraint("sku", name=op.f("pk_stock_items")),
    )
    op.create_table(
        "stock_issues",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("sku", sa.String(32), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("ward", sa.String(32), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sku"], ["stock_items.sku"], name=op.f("fk_stock_issues_sku")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stock_issues")),
    )
    op.bulk_insert(sa.table("stock_items", sa.column("sku"), sa.column("name"), sa.column("on_hand")), [
        {"sku": "gauze-10", "name": "Gauze swabs 10x10 cm (pack of 100)", "on_hand": 40},
        {"sku": "iv-set", "name": "IV administration set", "on_hand": 12},
    ])


def downgrade() -> None:
    op.drop_table("stock_issues")
    op.drop_table("stock_items")
