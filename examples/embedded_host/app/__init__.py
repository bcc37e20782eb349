"""A tiny supply-room app embedding Courier: recording a stock issue also emits `supply.consumed`.

The host's own top-level packages are `app` (this one), `tasks` (its Celery worker) and `migrations`
(its Alembic history): the same names as the folders of Courier's source tree, which installs them
as courier.app, courier.tasks and courier.migrations, so neither side ever sees the other's.

The stock issue, the shelf's new count and the event for the ERP commit in one
transaction, through the app's own SQLAlchemy session: either all of it happened
and the ERP will hear of it, or none of it did.
"""
from __future__ import annotations

import os

from flask import Flask, abort, jsonify, request
from sqlalchemy import create_engine, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from courier import Courier
from app.models import StockIssue, StockItem

courier = Courier()


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        DATABASE_URL=os.environ.get("SUPPLYROOM_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        COURIER_CONFIG="courier.yml",  # next to this file
        COURIER_SOURCE="supply-room",
    )
    app.config.from_prefixed_env()  # FLASK_COURIER_RELAY_LEASE=30 sets COURIER_RELAY_LEASE, and so on
    app.config.update(config or {})
    engine = create_engine(app.config["DATABASE_URL"], pool_pre_ping=True)
    app.extensions["supplyroom.engine"] = engine
    courier.init_app(app, engine=engine)  # Courier's API under /courier, its tables in the same database

    @app.post("/stock/<sku>/issues")
    def issue_stock(sku: str):
        body = request.get_json(force=True, silent=True) or {}
        quantity, ward = body.get("quantity"), body.get("ward")
        if not isinstance(quantity, int) or quantity < 1 or not isinstance(ward, str) or not ward:
            abort(400, "send {\"quantity\": a positive integer, \"ward\": a ward name}")
        try:
            with Session(engine) as session, session.begin():
                if session.get(StockItem, sku) is None:
                    abort(404, f"no stock item {sku!r}")
                issue = StockIssue(sku=sku, quantity=quantity, ward=ward)
                session.add(issue)
                session.flush()
                issue_id = issue.id
                courier.emit(session, "supply.consumed", {
                    "issue_id": issue.id, "sku": sku, "quantity": quantity, "ward": ward,
                    "issued_at": issue.issued_at.isoformat()}, idempotency_key=f"stock-issue-{issue.id}")
                # Last: if the shelf is short, the CHECK constraint refuses, and the issue and its
                # event roll back with it. The ERP never hears of stock that was never issued.
                session.execute(update(StockItem).where(StockItem.sku == sku)
                                .values(on_hand=StockItem.on_hand - quantity))
        except IntegrityError:
            return jsonify({"error": f"not enough {sku} on the shelf"}), 409
        return jsonify({"issue_id": issue_id}), 201

    @app.get("/stock/<sku>")
    def stock_level(sku: str):
        with Session(engine) as session:
            item = session.get(StockItem, sku) or abort(404)
            return jsonify({"sku": item.sku, "name": item.name, "on_hand": item.on_hand})

    return app
