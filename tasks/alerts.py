"""The alert beat task: `celery beat` sends `courier.alerts` every COURIER_ALERT_INTERVAL (default 60s); a worker
checks the rules (courier.app.store.alerts) and posts each change, firing or cleared, to COURIER_ALERT_WEBHOOK.

A notice is posted before the rules' new state commits: if the webhook is down the state is not
changed, and the next check sends it again (once it is sent, never again for the same change).
"""
from __future__ import annotations

import json
import logging
import os

import click
from celery import Celery, shared_task
from flask import current_app

from courier.app.cli.common import with_appcontext
from courier.app.settings import Settings, parse_duration
from courier.app.store import alerts
from courier.app.store.db import Store
from courier.tasks.queues import maintenance_queue

log = logging.getLogger("courier.alerts")
TIMEOUT = 10.0


def configure(celery: Celery, settings: Settings) -> None:
    """The beat schedule entry and the maintenance queue (added to what retention may have set)."""
    interval = parse_duration(os.environ.get("COURIER_ALERT_INTERVAL", "60s"))
    queue = maintenance_queue(settings)
    if queue.name not in {q.name for q in celery.conf.task_queues or ()}:
        celery.conf.task_queues = list(celery.conf.task_queues or ()) + [queue]
    celery.conf.task_routes = {**(celery.conf.task_routes or {}), "courier.alerts": {"queue": queue.name}}
    celery.conf.beat_schedule = {**(celery.conf.beat_schedule or {}),
                                 "courier-alerts": {"task": "courier.alerts", "schedule": interval}}


def check(store: Store, settings: Settings, post=None) -> list[dict]:
    """Evaluate the rules once and send what changed (`post`: requests.post by default); returns the notices sent."""
    if post is None:
        # Here, not at the top: every `courier` command (the relay too) imports this module, and only
        # a check posts; requests costs a process about 3 MB of RSS.
        import requests

        post = requests.post
    url = alerts.webhook_url()
    with store.session() as session:
        notices = alerts.evaluate(session, settings)
        for notice in notices:
            log.warning("alert %s: %s (%s)", notice["state"], notice["rule"], notice["summary"])
            if url:
                post(url, json=notice, timeout=TIMEOUT).raise_for_status()
    return notices


@shared_task(name="courier.alerts", ignore_result=True)
def alerts_task() -> None:
    check(current_app.extensions["courier.store"], current_app.extensions["courier.settings"])


@click.command("alerts")
@with_appcontext
def alerts_command():
    """Check the alert rules once and post what changed to COURIER_ALERT_WEBHOOK (what beat's courier.alerts does
    every COURIER_ALERT_INTERVAL); prints each notice as a JSON line. For cron, where beat does not run."""
    for notice in check(current_app.extensions["courier.store"], current_app.extensions["courier.settings"]):
        click.echo(json.dumps(notice))
