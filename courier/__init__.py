"""Courier inside a host Flask / SQLAlchemy application: the API as a blueprint, `emit` into the host's transaction.

    from courier import Courier

    courier = Courier(app, engine=engine)          # or Courier() and later courier.init_app(app, engine=engine)

    with Session(engine) as session, session.begin():
        session.add(stock_issue)                    # the host's own row ...
        courier.emit(session, "supply.consumed", {"item": "gauze", "quantity": 3},
                     idempotency_key=f"stock-issue-{stock_issue.id}")   # ... and the message: one commit

Host config keys: COURIER_CONFIG (routing file, relative to the app's root path), COURIER_SOURCE (the
source `emit` writes as), COURIER_URL_PREFIX (default /courier), COURIER_DATABASE_URL (when no engine
is passed), COURIER_BROKER_URL, COURIER_QUEUE_PREFIX, COURIER_RELAY_* and the other COURIER_* settings.

Importing this module loads nothing outside the standard library (every courier.* import runs it,
gunicorn's master included); the rest of Courier is imported when `init_app` runs.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery
    from flask import Flask
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from courier.app.settings import Settings
    from courier.tasks.embedded import Embedded

__all__ = ["Courier", "TABLE_PREFIX", "include_name", "worker_app"]

TABLE_PREFIX = "courier_"  # every Courier table, and its Alembic version table, is named courier_*


class Courier:
    """The Flask extension. One per host app; `emit` finds its app by context, else the one it was given."""

    def __init__(self, app: Flask | None = None, *, engine: Engine | None = None, settings: Settings | None = None):
        self._app: Flask | None = None
        if app is not None:
            self.init_app(app, engine=engine, settings=settings)

    def init_app(self, app: Flask, *, engine: Engine | None = None, settings: Settings | None = None) -> None:
        """Mount the API under COURIER_URL_PREFIX and add `flask courier ...`; validates the config now."""
        from courier.app.config import settings_from_config
        from courier.app.settings import ConfigError
        from courier.app.store.db import Store
        from courier.app.web import api
        from courier.tasks.cli import host_cli

        if settings is None:
            url = engine.url.render_as_string(hide_password=False) if engine is not None else None
            settings = settings_from_config(app.config, root_path=app.root_path, database_url=url)
        source = app.config.get("COURIER_SOURCE")
        if source is not None and source not in settings.routing.sources:
            raise ConfigError([f"app.config: COURIER_SOURCE: {source!r} is not a source in {settings.config_path}"])
        try:
            store = Store.from_settings(settings, engine)
        except ValueError as exc:  # the host's engine carries another Courier app's keys
            raise ConfigError([f"app.config: COURIER_ENCRYPTION_KEY: {exc}"]) from None
        app.extensions.update({"courier": self, "courier.settings": settings, "courier.source": source,
                               "courier.store": store})
        api.init_app(app, app.config.get("COURIER_URL_PREFIX", "/courier"), own_app=False)
        app.cli.add_command(host_cli)
        self._app = app

    def _extensions(self) -> dict:
        from flask import current_app, has_app_context  # loaded already: init_app was given a Flask app

        if has_app_context() and current_app.extensions.get("courier") is self:
            return current_app.extensions
        if self._app is None:
            raise RuntimeError("Courier.init_app(app) has not been called")
        return self._app.extensions

    def emit(self, session: Session, event_type: str, data: dict[str, Any], *, idempotency_key: str | None = None,
             occurred_at: datetime | str | None = None, correlation_id: str | None = None,
             source: str | None = None) -> str:
        """Add an event and one delivery per routed destination to `session`'s transaction; returns the message id.

        Nothing is sent here, not even to the broker: the host's commit makes the message durable
        and due, its rollback leaves no trace. The same `idempotency_key` from the same source
        returns the first message's id and stores nothing. Raises `courier.app.ingest.IngestError` (what
        and where) for an event Courier would refuse over HTTP.
        """
        from courier.app.ingest import IngestError, plan, store_plans

        ext = self._extensions()
        settings = ext["courier.settings"]
        source = source or ext["courier.source"]
        if source is None:
            raise IngestError(400, "malformed", "emit: no source: set COURIER_SOURCE or pass source=")
        envelope: dict[str, Any] = {"type": event_type, "data": data}
        if idempotency_key is not None:
            envelope["id"] = idempotency_key
        if occurred_at is not None:
            envelope["occurred_at"] = occurred_at.isoformat() if isinstance(occurred_at, datetime) else occurred_at
        try:
            body = json.dumps(envelope, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise IngestError(422, "invalid", f"emit: data is not JSON: {exc}", {"fields": {"data": [str(exc)]}}) from None
        if len(body) > settings.max_message_bytes:
            raise IngestError(413, "too_large", f"emit: the event is {len(body)} bytes, over the limit of "
                              f"{settings.max_message_bytes} (COURIER_MAX_MESSAGE_BYTES)")
        plans, _ = plan(settings.routing, source=source, content_type="application/json", body=body)
        return store_plans(session, plans, source=source, correlation_id=correlation_id)[0].message.id

    def start_embedded(self, threads: int = 4) -> Embedded:
        """Run the relay and `threads` delivery threads in this process (no broker, no worker); `.stop()` them."""
        from courier.tasks.embedded import Embedded

        ext = self._extensions()
        return Embedded(ext["courier.settings"], ext["courier.store"], threads).start()


def worker_app(app: Flask) -> Celery:
    """The Celery app for `celery -A yourpackage.worker worker` with the host app's configuration."""
    from courier.tasks.celery_app import worker_app as make

    return make(app)


def include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    """For the host's Alembic env.py (`context.configure(include_name=...)`): skip Courier's tables.

    Without it, the host's `alembic revision --autogenerate` sees courier_* tables that its
    metadata lacks and writes a migration dropping them.
    """
    return not (type_ == "table" and name is not None and name.startswith(TABLE_PREFIX))
