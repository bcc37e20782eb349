"""Embedded mode: the relay and delivery threads inside the host application's process.

For small installs that run no RabbitMQ and no separate worker: one relay thread
claims due deliveries from the outbox (the same `claim_due` as `courier relay`)
and hands them to a few delivery threads, which make the same recorded attempt
as the Celery task (`courier.tasks.deliver.run_batch`). Retries, circuits, ordering
and dead-lettering (in the store) behave as in the full deployment.

Limits: one process's threads deliver (a few hundred deliveries/s to a fast
destination at most, and the host's own requests share the CPU); there is no
broker DLQ mirror (dead deliveries are in the store and the API). A crash loses
nothing: what was committed is in the outbox, and deliveries that were in flight
go out again when their lease ends (COURIER_RELAY_LEASE) after the restart.
"""
from __future__ import annotations

import logging
import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from courier.app.settings import Settings
from courier.app.store import outbox
from courier.app.store.db import Store
from courier.tasks.deliver import run_batch
from courier.tasks.relay import Relay

log = logging.getLogger("courier.embedded")


class Embedded(Relay):
    """A relay whose handoff is an in-process queue drained by `threads` delivery threads."""

    def __init__(self, settings: Settings, store: Store, threads: int = 4):
        super().__init__(settings, store)
        self.threads = threads
        self.work: queue.Queue[list[outbox.Claimed]] = queue.Queue()  # batches of one destination
        self._outstanding = 0  # handed over and not yet finished
        self._changed = threading.Condition()
        self._threads: list[threading.Thread] = []

    def prepare(self) -> None:
        """Nothing to declare: no broker."""

    def capacity(self) -> int:
        """Claim for idle threads plus one waiting batch each: claims come in rounds, and none
        waits in the queue longer than one batch's attempts (far less than its lease)."""
        limit = 2 * self.threads * max(self.settings.relay_task_size, 1)
        with self._changed:
            self._changed.wait_for(lambda: self._outstanding < limit or self.stopping.is_set(),
                                   timeout=self.settings.relay_poll)
            return max(limit - self._outstanding, 0)

    @contextmanager
    def handoff(self) -> Iterator[Callable[[list[outbox.Claimed]], None]]:
        def send(batch: list[outbox.Claimed]) -> None:
            with self._changed:
                self._outstanding += len(batch)
            self.work.put(batch)
        yield send

    def _deliver_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                batch = self.work.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                run_batch(self.settings, self.store, [(c.delivery_id, c.dispatch) for c in batch])
            except Exception:  # the store is down: the lease runs out and the relay dispatches it again
                log.exception("%d deliveries to %s failed before their outcome was recorded", len(batch),
                              batch[0].destination)
            finally:
                with self._changed:
                    self._outstanding -= len(batch)
                    self._changed.notify_all()

    def start(self) -> "Embedded":
        """Start the relay and delivery threads (daemons: they never keep the host from exiting)."""
        self._threads = [threading.Thread(target=self.run, name="courier-relay", daemon=True)] + [
            threading.Thread(target=self._deliver_forever, name=f"courier-deliver-{i}", daemon=True)
            for i in range(self.threads)]
        for thread in self._threads:
            thread.start()
        log.info("embedded delivery started with %d threads", self.threads)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the attempts in hand, and hand queued deliveries back so a restart sends them at once."""
        self.stopping.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        unsent = []
        while not self.work.empty():
            unsent += self.work.get_nowait()
        if unsent:
            with self.store.session() as session:
                outbox.release(session, unsent)
