"""The Celery app, built from the same Settings as the Flask app (one source of truth).

Settings that matter for not losing or duplicating work, and why:
- publisher confirms: without them RabbitMQ may drop a publish silently;
- late acks + reject on worker lost: a task whose worker dies is redelivered,
  and quorum queues cap those redeliveries (`delivery-limit`) so a poison task
  cannot loop forever;
- prefetch 1: a slow destination's worker does not hoard other tasks;
- one durable quorum queue per destination: a bulkhead, so one slow or dead
  destination never delays another.
"""
from __future__ import annotations

from celery import Celery, Task
from flask import Flask
from kombu import Exchange, Queue

from app.settings import Settings

DELIVERY_LIMIT = 20  # broker redeliveries of one task (worker killed while running it) before it is dropped


def delivery_queues(settings: Settings) -> list[Queue]:
    exchange = Exchange(f"{settings.queue_prefix}.deliver", type="direct", durable=True)
    return [Queue(settings.queue_for(name), exchange, routing_key=name, durable=True,
                  queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT})
            for name in settings.routing.destinations]


def celery_init_app(flask_app: Flask) -> Celery:
    """Make the Celery app for `flask_app`; tasks run inside its app context (Flask's celery pattern)."""
    settings: Settings = flask_app.extensions["courier.settings"]

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery("courier", task_cls=FlaskTask, set_as_current=True)
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        task_queues=delivery_queues(settings),
        task_default_queue=f"{settings.queue_prefix}.default",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # Task events cost three confirmed publishes per task; Flower switches them on when it runs.
        worker_send_task_events=False,
    )
    celery.set_default()
    flask_app.extensions["celery"] = celery
    import tasks.deliver  # noqa: F401  registers the task on this app
    return celery
