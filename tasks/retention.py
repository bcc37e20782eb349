"""The retention beat task: `celery beat` sends `courier.purge` every COURIER_RETENTION_INTERVAL
when COURIER_RETENTION is set; a worker removes the bodies of old, delivered messages (courier.app.store.retention).
"""
from __future__ import annotations

import logging

from celery import Celery, shared_task
from flask import current_app

from courier.app.settings import Settings
from courier.app.store import retention
from courier.tasks.queues import maintenance_queue

log = logging.getLogger("courier.retention")
BEAT_PAUSE = 0.05  # seconds between batches: a scheduled purge yields the disk to live traffic


def configure(celery: Celery, settings: Settings) -> None:
    """With retention on: the beat schedule entry, and a queue of its own the workers consume.

    Its own queue, not the default: the workers consume only the destinations' queues
    (bulkheads), and a purge must not wait behind, or hold up, a destination's deliveries.
    """
    age, interval = retention.retention_from_env()
    if age is None:
        return
    queue = maintenance_queue(settings)
    celery.conf.task_queues = list(celery.conf.task_queues) + [queue]
    celery.conf.task_routes = {"courier.purge": {"queue": queue.name}}
    celery.conf.beat_schedule = {"courier-retention": {"task": "courier.purge", "schedule": interval}}


@shared_task(name="courier.purge", ignore_result=True)
def purge_task() -> None:
    """Run one retention pass at the configured age; audited as actor `beat` when it removed something."""
    age, _ = retention.retention_from_env()
    if age is None:  # switched off since beat sent this
        return
    result = retention.purge(current_app.extensions["courier.store"], age, actor="beat", pause=BEAT_PAUSE,
                             record_empty=False)
    log.info("retention: purged %d message bodies in %d batches (cutoff %s, %d locked rows left for later)",
             result.purged, result.batches, result.cutoff.isoformat(), len(result.skipped))
