"""The outbox relay: moves due deliveries from the store to their RabbitMQ queues.

Loop: claim due deliveries (marking them in flight with a lease, committed
first), publish one `deliver` task per batch of one destination's deliveries
(`split`) with publisher confirms, repeat while there is more; then sleep until
PostgreSQL NOTIFY says a message was committed, or the poll interval passes
(retries come due by the clock; shorter while rounds find work).

Crash safety comes from the order: the claim commits before the publish. A
relay killed in between leaves deliveries in flight whose lease runs out, and
the next claim dispatches them again; a task published twice is a no-op for
the second worker (see `courier.app.store.outbox.begin_attempts`).
"""
from __future__ import annotations

import logging
import select
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from celery import Celery

from courier.app.settings import Settings
from courier.app.store import outbox
from courier.app.store.db import Store, store_outage, store_problem
from courier.tasks.celery_app import broker_outage, broker_problem, publish_nacked
from courier.tasks.queues import declare_dead_letter_queues

log = logging.getLogger("courier.relay")
SQLITE_POLL = 0.1  # SQLite has no NOTIFY: poll often, it is a cheap indexed query
BUSY_POLL = 2 * outbox.NOTIFY_EVERY  # after a round that found work, look again this soon
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 10.0  # seconds after a failed round, doubling
RETRY = f"every {FIRST_BACKOFF:g}-{MAX_BACKOFF:g}s"


def split(claimed: list[outbox.Claimed], size: int) -> list[list[outbox.Claimed]]:
    """Batches of one destination's deliveries, at most `size` each and as even as can be.

    A batch is one broker message and one worker's two transactions: the per-message costs
    are paid once per batch. Even sizes keep all workers busy (25 due -> 9, 8, 8, not 10, 10, 5).
    """
    by_destination: dict[str, list[outbox.Claimed]] = {}
    for c in claimed:
        by_destination.setdefault(c.destination, []).append(c)
    batches = []
    for group in by_destination.values():
        count = -(-len(group) // max(size, 1))
        batches += [group[i::count] for i in range(count)]
    return batches


def listen_conninfo(engine) -> str:
    """The libpq connection string of `engine`'s connections, for the LISTEN connection: the parameters its
    dialect gives the driver, so a multi-host URL keeps every host, its ports and target_session_attrs
    (rendered back as a URL, libpq would keep only the last of several ?host=)."""
    from psycopg.conninfo import make_conninfo

    _, params = engine.dialect.create_connect_args(engine.url)
    return make_conninfo("", **{k: v for k, v in params.items() if isinstance(v, (str, int, float))})


class Relay:
    """Claims due deliveries and hands them to Celery workers over RabbitMQ.

    Subclasses change where claimed deliveries go (`handoff`), how many to claim (`capacity`)
    and what to set up first (`prepare`); `courier.tasks.embedded` hands them to threads in-process.
    """

    def __init__(self, settings: Settings, store: Store, celery: Celery | None = None):
        self.settings, self.store, self.celery = settings, store, celery
        self.stopping = threading.Event()
        self._listener = None
        self._listen_warned = False
        # One line when the store or the broker stops answering, one when it is back (courier.app.observability.Outage).
        self.store_outage = store_outage(log, store.engine.url, RETRY)
        self.broker_outage = broker_outage(celery, RETRY) if celery is not None else None

    # -- one round ---------------------------------------------------------

    def prepare(self) -> None:
        """DLQs must exist before RabbitMQ dead-letters a poison task into them. One connection attempt:
        while the broker is down, run() repeats this each round (nothing is claimed) with its own backoff."""
        declare_dead_letter_queues(self.celery, self.settings, retries=0)

    def capacity(self) -> int:
        """How many deliveries to claim this round."""
        return self.settings.relay_batch

    @contextmanager
    def handoff(self) -> Iterator[Callable[[list[outbox.Claimed]], None]]:
        """A function that publishes a batch of one destination's deliveries as one `deliver` task, confirmed."""
        task = self.celery.tasks["courier.deliver"]
        with self.celery.producer_or_acquire() as producer:
            def send(batch: list[outbox.Claimed]) -> None:
                destination = batch[0].destination
                task.apply_async((destination, [[c.delivery_id, c.dispatch] for c in batch]), producer=producer,
                                 queue=self.settings.queue_for(destination))
            yield send

    def pump(self, limit: int) -> int:
        """Claim up to `limit` due deliveries and hand them over in batches; returns how many went."""
        if limit <= 0:
            return 0
        with self.store.session() as session:
            claimed = outbox.claim_due(session, lease=self.settings.relay_lease, limit=limit)
        batches = split(claimed, self.settings.relay_task_size)
        handed = 0
        try:
            with self.handoff() as send:
                for batch in batches:
                    send(batch)
                    handed += 1
        except Exception as exc:
            # Broker down or a confirm refused: hand the rest back at once rather than waiting out the lease.
            unsent = [c for batch in batches[handed:] for c in batch]
            with self.store.session() as session:
                outbox.release(session, unsent)
            if publish_nacked(exc):  # due again at once: the next round publishes them again
                log.warning("RabbitMQ refused (nack) a task of %d deliveries; %d of %d given back to send again",
                            len(batches[handed]), len(unsent), len(claimed))
                return len(claimed) - len(unsent)
            if broker_problem(exc) is None:
                log.exception("handoff failed with %d of %d deliveries unsent; released them", len(unsent),
                              len(claimed))
            else:  # the broker went away: run() says so once; no traceback for each round of the outage
                log.debug("handoff failed with %d of %d deliveries unsent; released them", len(unsent),
                          len(claimed))
            raise
        if handed and self.broker_outage is not None:
            self.broker_outage.ok()
        return len(claimed)

    # -- waiting -----------------------------------------------------------

    def wait(self, busy: bool = False) -> None:
        """Sleep until a NOTIFY arrives or the poll interval passes.

        `busy` (the last round found work): come back after a short poll instead, for a message
        whose ingest skipped its NOTIFY because another had just been sent (`outbox.NOTIFY_EVERY`).
        """
        poll = min(self.settings.relay_poll, BUSY_POLL) if busy else self.settings.relay_poll
        if not self.store.is_postgres:
            self.stopping.wait(min(poll, SQLITE_POLL))
            return
        if self._listener is None:
            self.stopping.wait(poll)
            return
        try:
            ready, _, _ = select.select([self._listener.fileno()], [], [], poll)
            if ready:
                # Linger a moment so the commits of the next few milliseconds join this round: one
                # claim, fuller batches, fewer broker messages and worker transactions per delivery.
                self.stopping.wait(self.settings.relay_linger)
                # Drain every pending notification; one wake-up is enough for any number of commits.
                for _ in self._listener.notifies(timeout=0):
                    pass
        except Exception as exc:  # the database restarted: poll until LISTEN works again
            log.info("LISTEN connection lost (%s); polling", type(exc).__name__)
            self._close_listener()
            self.stopping.wait(self.settings.relay_poll)

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:  # nosec B110  # closing a LISTEN connection that already failed; it is dropped either way
                pass
            self._listener = None

    # -- the loop ----------------------------------------------------------

    def run(self) -> None:
        """Relay until `stopping` is set; survives store and broker outages by backing off."""
        log.info("relay started (batch %d, lease %.0fs, poll %.1fs)", self.settings.relay_batch,
                 self.settings.relay_lease, self.settings.relay_poll)
        backoff = FIRST_BACKOFF
        prepared = False
        while not self.stopping.is_set():
            try:
                if not prepared:
                    self.prepare()
                    prepared = True
                    if self.broker_outage is not None:
                        self.broker_outage.ok()
                if self._listener is None and self.store.is_postgres:
                    self.start_listening()
                limit = self.capacity()
                dispatched = self.pump(limit)
                self.store_outage.ok()
                backoff = FIRST_BACKOFF
                if dispatched < limit:  # nothing more is due now
                    self.wait(busy=dispatched > 0)
            except Exception as exc:
                if not self._outage(exc):
                    log.error("relay round failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff,
                              exc_info=exc)  # not an outage: a bug or a case to learn, so keep the traceback
                elif self.broker_outage is not None and self.broker_outage.down:
                    prepared = False  # probe the broker (declare the DLQs) before claiming anything again
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        self._close_listener()
        log.info("relay stopped")

    def _outage(self, exc: BaseException) -> bool:
        """If the round failed because the store or the broker is unreachable, report it (once per outage)."""
        problem = store_problem(exc)
        if problem is not None:
            self.store_outage.failed(problem.reason, problem.hint)
            return True
        broken = broker_problem(exc) if self.broker_outage is not None else None
        if broken is not None:
            self.broker_outage.failed(*broken)
            return True
        return False

    def start_listening(self) -> None:
        """Open a dedicated autocommit connection and LISTEN (PostgreSQL only).

        Done before a round's claim, so no commit between claim and wait goes unnoticed.
        """
        try:
            import psycopg  # the [sql] extra; a host running psycopg2 alone gets polling

            conn = psycopg.connect(listen_conninfo(self.store.engine), autocommit=True)
            conn.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
        except Exception as exc:
            # Tried again each round: warn once (the store down is the round's own outage line).
            if store_problem(exc) is None and not self._listen_warned:
                log.warning("cannot LISTEN (%s); polling", type(exc).__name__)
                self._listen_warned = True
            else:
                log.debug("cannot LISTEN (%s); polling", type(exc).__name__)
            return
        self._listener = conn
        self._listen_warned = False
