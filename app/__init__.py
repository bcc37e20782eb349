"""Courier's web side (courier.app): the Flask app factory, and everything a message meets before a worker.

    settings    what a process runs with (plain data); config reads and validates it
    web/        the JSON API, its schemas and OpenAPI document
    hl7/        HL7 v2 text (er7), HL7 -> canonical (to_canonical), the MLLP listener
    ingest      the one way in (HTTP, MLLP, `emit`): validate, route, store
    store/      tables, outbox, ordering, circuits, rate limits, tokens, audit, retention, encryption
    domain/     canonical models, transforms, governance (no I/O)
    cli/        the operator commands
    metrics, observability, tls: shared by every process

Imports nothing of courier.tasks (import contracts in pyproject.toml). `create_app()` builds the app
from the same `Settings` that `courier.tasks.celery_app` uses, so the web process, the relay and the
workers can never disagree about the database, the broker or the routes (the pattern of pypi/warehouse's
`configure()`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from courier.app.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, test_config: dict | None = None) -> Flask:
    """Build the Flask app; `settings` defaults to the environment and COURIER_CONFIG."""
    # Imported here, not at the top: every courier.app.* import runs this package first, and gunicorn's
    # master (deploy/gunicorn.conf.py: metrics, tls) must not load Flask and the config's libraries that
    # each forked worker would then count again in its RSS.
    from flask import Flask

    from courier.app import observability
    from courier.app.config import load_settings
    from courier.app.store import db
    from courier.app.web import api, console

    settings = settings or load_settings()
    flask_app = Flask(__name__, instance_relative_config=False)
    flask_app.config.update(JSON_SORT_KEYS=False)
    if test_config:
        flask_app.config.update(test_config)
    flask_app.extensions["courier.settings"] = settings
    flask_app.extensions["courier.store"] = db.Store.from_settings(settings)
    api.init_app(flask_app)
    console.init_app(flask_app)  # the operator console at /console/ (docs/console.md)
    observability.init_app(flask_app, settings)  # JSON logs, Sentry, a correlation id per request
    return flask_app
