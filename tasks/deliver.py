"""The `deliver` task: one attempt at one delivery, recorded in the outbox.

Tasks carry ids, never ORM objects or bodies: the store is the truth, and a
task that arrives twice (at-least-once everywhere) finds nothing to do.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from celery import shared_task
from flask import current_app

from courier import adapters
from courier.app import metrics
from courier.app.domain import transforms
from courier.app.observability import correlation
from courier.app.settings import Destination, Settings
from courier.app.store import outbox
from courier.app.store.db import Store
from courier.app.store.models import DEAD, Delivery, utcnow
from courier.tasks.queues import publish_dead_letter

log = logging.getLogger("courier.deliver")
# How long a batch waits for an unreachable store (a PostgreSQL restart or failover) before its task fails
# and its deliveries wait for their lease: outcomes of sends already made are recorded as soon as it is back.
STORE_PATIENCE = 60.0

# One adapter per destination per thread: adapters keep connections open between sends.
_local = threading.local()


def adapter_for(destination: Destination) -> adapters.Adapter:
    cache = _local.__dict__.setdefault("adapters", {})
    key = (destination.name, destination.url, destination.timeout, destination.secret, destination.tls)
    if key not in cache:
        # tls only when set: the config allows it on https:// alone, so only the HTTP adapter takes it.
        extra = {"tls": destination.tls} if destination.tls is not None else {}
        cache[key] = adapters.open_adapter(destination.url, timeout=destination.timeout,
                                           secret=destination.secret, **extra)
    return cache[key]


def attempt(ticket: outbox.Ticket, destination: Destination) -> outbox.Outcome:
    """Transform and send once; classify what happened. Never raises for the destination's faults."""
    started, t0 = utcnow(), time.monotonic()

    def outcome(result: str, detail: str, status_code=None, retry_after=None, throttled=False) -> outbox.Outcome:
        return outbox.Outcome(result, detail, started, int((time.monotonic() - t0) * 1000), status_code,
                              retry_after, throttled)

    try:
        body, content_type = transforms.apply(destination.transform, transforms.Envelope(
            ticket.message_id, ticket.source, ticket.message_type, ticket.content_type, ticket.body,
            destination.name, destination.clearance))
    except transforms.TransformFailed as exc:  # any failure is this message's, permanently
        return outcome("permanent", str(exc))
    try:
        sent = adapter_for(destination).send(adapters.Outgoing(
            ticket.delivery_id, ticket.message_id, ticket.correlation_id, body, content_type,
            ticket.message_type))
    except adapters.TemporaryError as exc:
        return outcome("temporary", exc.detail, exc.status_code, exc.retry_after, exc.throttled)
    except adapters.PermanentError as exc:
        return outcome("permanent", exc.detail, exc.status_code)
    except Exception as exc:  # an adapter bug: retry (bounded by max_attempts) rather than lose the message
        log.exception("adapter for %s raised unexpectedly", destination.name)
        return outcome("temporary", f"internal error in adapter: {type(exc).__name__}")
    return outcome("delivered", sent.detail, sent.status_code)


@shared_task(name="courier.deliver", bind=True, ignore_result=True)
def deliver(self, destination: str, items: list[list]) -> dict[str, str]:
    """Make one attempt at each [delivery id, dispatch] of `destination` that its dispatch still owns.

    A batch that RabbitMQ hands out again (its worker died mid-batch) is split into one task
    per delivery: if one message kills its worker every time, the broker's delivery limit
    then parks that one task alone, and its neighbours go out.
    """
    settings = current_app.extensions["courier.settings"]
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    if len(items) > 1 and redelivered:
        log.warning("batch of %d deliveries to %s redelivered by the broker: splitting it", len(items), destination)
        with self.app.producer_or_acquire() as producer:
            for item in items:
                self.apply_async((destination, [item]), producer=producer, queue=settings.queue_for(destination))
        return {}
    statuses = run_batch(settings, current_app.extensions["courier.store"], [tuple(i) for i in items],
                         redelivered=redelivered)
    for delivery_id, status in statuses.items():
        if status == DEAD:
            dead_letter(delivery_id)
    return statuses


def run_batch(settings: Settings, store: Store, items: list[tuple[str, int]], *,
              redelivered: bool = False) -> dict[str, str]:
    """Attempts at a batch of one destination's deliveries, recorded; {delivery id: status}.

    Shared by the Celery task and the embedded delivery threads. Two transactions for the
    batch (a read, then the outcomes), the sends one after the other in between. After a temporary
    failure the rest are not sent (given back, due at once): the destination is in trouble,
    and the circuit breaker, fed with that failure, decides what happens next. A send that its
    timeout (plus a margin) could carry past the claim's lease extends the lease first.
    """
    destinations = settings.routing.destinations
    tickets, statuses = store.transact(
        lambda session: outbox.begin_attempts(session, items, destinations, redelivered=redelivered),
        patience=STORE_PATIENCE)
    if not tickets:
        metrics.delivered(store, {}, statuses)
        return statuses
    results: dict[str, list[tuple[outbox.Ticket, outbox.Outcome | None]]] = {}  # per destination
    for ticket in tickets:
        sent = results.setdefault(ticket.destination, [])
        destination = destinations[ticket.destination]
        failed = any(o is None or o.result == "temporary" for _, o in sent)
        if failed or not _leased_for_a_send(store, ticket, destination):
            sent.append((ticket, None))
            continue
        with correlation(ticket.correlation_id):  # the message's id in this attempt's logs and Sentry events
            sent.append((ticket, attempt(ticket, destination)))

    def finish(session) -> dict[str, str]:
        return {delivery_id: status for name, sent in results.items()
                for delivery_id, status in outbox.finish_attempts(session, destinations[name], sent).items()}

    statuses.update(store.transact(finish, patience=STORE_PATIENCE))
    for ticket, outcome in (pair for sent in results.values() for pair in sent):
        if outcome is not None:
            # The outcome's detail stays out of the log: it may quote the destination's answer or a
            # transform's error, which can carry PHI. It is in the attempt log (API, `courier messages show`).
            log.info("delivery %s to %s attempt %d: %s (%s, status %s)", ticket.delivery_id, ticket.destination,
                     ticket.number, statuses[ticket.delivery_id], outcome.result, outcome.status_code,
                     extra={"delivery_id": ticket.delivery_id, "message_id": ticket.message_id,
                            "destination": ticket.destination, "correlation_id": ticket.correlation_id})
    metrics.delivered(store, results, statuses)  # after the finish transaction committed
    return statuses


def _leased_for_a_send(store: Store, ticket: outbox.Ticket, destination: Destination) -> bool:
    """Is the delivery ours for a send's timeout plus LEASE_MARGIN? The claim's lease (120 s by default)
    usually covers it; otherwise (a task that waited long in its queue, a short COURIER_RELAY_LEASE) the
    lease is extended first, so a worker that dies while sending leaves its task to RabbitMQ's redelivery
    before the relay dispatches the delivery again. False: another dispatch has it now, or the store did
    not come back within STORE_PATIENCE (then it is not sent, and the batch's sends so far are still
    recorded: raising here would lose them, and the relay would send them again)."""
    needed = destination.timeout + outbox.LEASE_MARGIN
    if ticket.lease_until is None or utcnow() + timedelta(seconds=needed) <= ticket.lease_until:
        return True
    try:
        return store.transact(lambda session: outbox.extend_lease(session, ticket, needed), patience=STORE_PATIENCE)
    except Exception:
        log.exception("could not extend the lease of delivery %s; giving it back unsent", ticket.delivery_id)
        return False


def dead_letter(delivery_id: str) -> None:
    """Publish a dead delivery's record to its DLQ, after the commit that made it dead.

    Best effort: the store already says "dead" with the reason, and that is what replay reads;
    if the broker is down now, the DLQ misses one entry (logged), nothing else is lost.
    """
    settings = current_app.extensions["courier.settings"]
    with current_app.extensions["courier.store"].session() as session:
        d = session.get(Delivery, delivery_id)
        record = {"delivery_id": d.id, "message_id": d.message_id, "destination": d.destination,
                  "attempts": d.attempts, "reason": d.last_error, "dead_at": utcnow().isoformat()}
    try:
        publish_dead_letter(current_app.extensions["celery"], settings, record)
    except Exception as exc:  # the broker's trouble must not undo or repeat the delivery's outcome
        log.error("could not publish dead delivery %s to its DLQ: %s", delivery_id, exc)
