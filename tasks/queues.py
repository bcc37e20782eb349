"""RabbitMQ's side of delivery: one quorum queue per destination (a bulkhead) and its dead-letter queue.

Shared by the Celery app (consumes the queues), the relay (declares the DLQs) and the delivery task (mirrors
dead deliveries into them); it imports only Celery, kombu and the settings.
"""
from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from courier.app.settings import Settings

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


def maintenance_queue(settings: Settings) -> Queue:
    """`<prefix>.housekeeping`: beat's periodic tasks (retention, alerts), apart from the destinations' queues.

    A quorum queue, like the others: a classic queue lives on one RabbitMQ node, and with that node down every
    worker of a cluster that consumes it stops ("home node ... is down", an unrecoverable error for Celery).
    It replaces the classic `<prefix>.maintenance` of earlier releases (a queue's type cannot be changed under
    its name); docs/operations.md says how to delete that one after the upgrade."""
    return Queue(f"{settings.queue_prefix}.housekeeping", durable=True, queue_arguments={"x-queue-type": "quorum"})


def declare_dead_letter_queues(celery: Celery, settings: Settings, retries: int | None = None) -> None:
    """Declare the DLQs (idempotent); they must exist before RabbitMQ dead-letters into them.

    `retries`: rounds of connection attempts after the first (kombu's default when None; 0 for one round, as the
    relay does: its own loop paces the retries and says when the broker is down). A round tries each broker of
    BROKER_URL's failover list once (`amqp://a;amqp://b`), so one node down is not a broker outage."""
    with celery.connection_for_write() as conn:
        if retries is not None:
            per_round = max(len(getattr(conn, "alt", None) or ()), 1)
            conn.ensure_connection(max_retries=(retries + 1) * per_round - 1)
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
