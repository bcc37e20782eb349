"""The supply room's own tables: stock on the shelf and each issue of stock to a ward."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={"pk": "pk_%(table_name)s", "ck": "ck_%(table_name)s_%(constraint_name)s",
                                           "fk": "fk_%(table_name)s_%(column_0_name)s"})


class StockItem(Base):
    __tablename__ = "stock_items"
    # The shelf cannot go below zero: the database refuses, and the whole transaction with it.
    __table_args__ = (CheckConstraint("on_hand >= 0", name="on_hand_not_negative"),)

    sku: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    on_hand: Mapped[int] = mapped_column(Integer)


class StockIssue(Base):
    __tablename__ = "stock_issues"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    sku: Mapped[str] = mapped_column(ForeignKey("stock_items.sku"))
    quantity: Mapped[int] = mapped_column(Integer)
    ward: Mapped[str] = mapped_column(String(32))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                default=lambda: datetime.now(timezone.utc))
