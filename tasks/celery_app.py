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
from celery.signals import worker_process_init, worker_ready
from celery.worker.consumer import Consumer as CeleryConsumer
from flask import Flask
from kombu import Exchange, Queue

from app.settings import Settings

# Broker redeliveries of one task (its worker died while running it) before RabbitMQ parks it in
# the destination's dead-letter queue instead of handing it out again: a poison task cannot loop.
DELIVERY_LIMIT = 5


def _exchange(settings: Settings, kind: str) -> Exchange:
    return Exchange(f"{settings.queue_prefix}.{kind}", type="direct", durable=True)


def delivery_queues(settings: Settings) -> list[Queue]:
    """One quorum queue per destination (a bulkhead), dead-lettering into the destination's DLQ."""
    return [Queue(settings.queue_for(name), _exchange(settings, "deliver"), routing_key=name, durable=True,
                  queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT,
                                   "x-dead-letter-exchange": f"{settings.queue_prefix}.dead",
                                   "x-dead-letter-routing-key": name})
            for name in settings.routing.destinations]


def dead_letter_queues(settings: Settings) -> list[Queue]:
    """`<prefix>.dead.<destination>`: what operators see in Flower and the RabbitMQ UI as dead."""
    return [Queue(f"{settings.queue_prefix}.dead.{name}", _exchange(settings, "dead"), routing_key=name,
                  durable=True, queue_arguments={"x-queue-type": "quorum"})
            for name in settings.routing.destinations]


def declare_dead_letter_queues(celery: Celery, settings: Settings) -> None:
    """Declare the DLQs (idempotent); they must exist before RabbitMQ dead-letters into them."""
    with celery.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in dead_letter_queues(settings):
            queue.bind(channel).declare()


def publish_dead_letter(celery: Celery, settings: Settings, record: dict) -> None:
    """Mirror a dead delivery into its destination's DLQ (ids and reason only, never the body: PHI)."""
    with celery.producer_or_acquire() as producer:
        producer.publish(record, exchange=_exchange(settings, "dead"), routing_key=record["destination"],
                         serializer="json", delivery_mode=2, headers={"courier-dead": "1"},
                         declare=[q for q in dead_letter_queues(settings)
                                  if q.routing_key == record["destination"]], retry=True)


class Consumer(CeleryConsumer):
    """Celery's consumer without "native delayed delivery": it declares 28 extra quorum queues for
    ETA tasks, and Courier never sends one (retry waits live in the store)."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [s for s in CeleryConsumer.Blueprint.default_steps
                         if not s.endswith(":DelayedDelivery")]


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
        worker_consumer="tasks.celery_app:Consumer",
        worker_hijack_root_logger=False,
        # Task events cost three confirmed publishes per task; Flower switches them on when it runs.
        worker_send_task_events=False,
    )
    celery.set_default()
    flask_app.extensions["celery"] = celery
    import tasks.deliver  # noqa: F401  registers the task on this app
    import tasks.retention  # registers courier.purge; its beat_schedule entry when COURIER_RETENTION is set
    tasks.retention.configure(celery, settings)
    return celery


def celery_for(flask_app: Flask) -> Celery:
    """The app's Celery app, made on first use (a host app embedding Courier has none until then)."""
    return flask_app.extensions.get("celery") or celery_init_app(flask_app)


def worker_app(flask_app: Flask) -> Celery:
    """The Celery app a worker process runs (`celery -A module worker`), for Courier's app or a host's."""
    celery = celery_init_app(flask_app)
    settings, store = flask_app.extensions["courier.settings"], flask_app.extensions["courier.store"]

    @worker_ready.connect(weak=False)
    def _declare_dead_letters(**_):
        declare_dead_letter_queues(celery, settings)

    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_):
        # A prefork child must not share the parent's database connections.
        store.engine.dispose(close=False)

    return celery
