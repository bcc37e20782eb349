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

import logging
import socket
from collections.abc import Iterator
from functools import cached_property

from celery import Celery, Task
from celery.beat import PersistentScheduler
from celery.signals import worker_process_init, worker_ready
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.consumer import CONNECTION_ERROR, CONNECTION_FAILOVER
from flask import Flask

from courier.app.observability import Outage, start_hint
from courier.app.service_urls import broker_hosts
from courier.app.settings import Settings
from courier.app.store.db import StoreWatch
from courier.tasks.queues import declare_dead_letter_queues, delivery_queues

log = logging.getLogger("courier.broker")
RABBITMQ_START = start_hint("rabbitmq-server -detached")
CHECK_BROKER_URL = "check BROKER_URL's user, password and virtual host"

# --- the broker unreachable: one line per outage -----------------------------------------------

def broker_problem(exc: BaseException) -> tuple[str, str] | None:
    """(reason, hint) if `exc` is the broker unreachable, refusing the login or losing the connection; None
    for anything else. kombu re-raises socket errors as its OperationalError `from` the original."""
    from amqp.exceptions import AccessRefused
    from amqp.exceptions import ConnectionError as AmqpConnectionError
    from kombu.exceptions import OperationalError

    for error in _causes(exc):
        if isinstance(error, AccessRefused) or "ACCESS_REFUSED" in str(error):
            return "login refused", CHECK_BROKER_URL
        if isinstance(error, ConnectionRefusedError):
            return "connection refused", RABBITMQ_START
        if isinstance(error, socket.gaierror):
            return "host name not found", RABBITMQ_START
        if isinstance(error, (socket.timeout, TimeoutError)):
            return "timed out", RABBITMQ_START
        if isinstance(error, (ConnectionError, AmqpConnectionError)):
            return "connection lost", RABBITMQ_START
        if isinstance(error, OSError):
            return (error.strerror or type(error).__name__).lower(), RABBITMQ_START
    if isinstance(exc, OperationalError):  # raised without its cause: kombu's message is the socket error's
        text = str(exc)
        reason = "connection refused" if "refused" in text.lower() else (text.splitlines() or [""])[0][:160] \
            or "unreachable"
        return reason, RABBITMQ_START
    return None


def publish_nacked(exc: BaseException) -> bool:
    """RabbitMQ answered a publish with a nack: not an outage (a quorum queue whose leader's node just died
    refuses what was in flight, then elects a new leader): publish again."""
    from amqp.exceptions import MessageNacked

    return any(isinstance(error, MessageNacked) for error in _causes(exc))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it was raised from (kombu re-raises the library's errors as its own)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def broker_location(url: str) -> str:
    """host:port of the broker, or of each broker of a failover list (`a;b` -> "a:5672,b:5672"): an outage line
    means none of them answered. Never a user or password."""
    return ",".join(broker_hosts(url))


def failing_over(connection, interval: float) -> bool:
    """kombu called an errback with `interval` 0 on a connection with alternates: one broker of BROKER_URL's
    list failed and the next is tried at once (kombu.Connection._ensure_connection). Not an outage yet."""
    return bool(getattr(connection, "alt", None)) and not interval


def _failover_line(failed: str, exc: BaseException) -> None:
    """One WARNING line for a broker of the list that did not answer while the next is tried."""
    reason = (broker_problem(exc) or (str(exc)[:160], ""))[0]
    log.warning(f"RabbitMQ at {failed} is not reachable ({reason}); trying the next broker of BROKER_URL")


def broker_outage(celery: Celery, retry: str) -> Outage:
    """The Outage reporter (courier.app.observability) of `celery`'s broker."""
    return Outage(log, "RabbitMQ", broker_location(celery.conf.broker_url), retry)


class _ConsumerConnectionErrors(logging.Filter):
    """The worker's consumer logs "Cannot connect to ... Trying again in Ns" (two lines, ERROR) at every
    attempt; this turns them into the outage's one line (then DEBUG). Celery's other lines are untouched."""

    def __init__(self, outage: Outage):
        super().__init__()
        self.outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg is not CONNECTION_ERROR or not isinstance(record.args, tuple) or len(record.args) < 2:
            return True
        if len(record.args) > 2 and str(record.args[2]) == CONNECTION_FAILOVER:
            _failover_line(broker_location(str(record.args[0])), record.args[1])  # the next broker is tried now
            return False
        reason, hint = broker_problem(record.args[1]) or (str(record.args[1])[:160], RABBITMQ_START)
        self.outage.failed(reason, hint)
        return False


class _CancelOnConnectionLossNotice(logging.Filter):
    """Drops Celery's CPendingDeprecationWarning about worker_cancel_long_running_tasks_on_connection_loss."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("CPendingDeprecationWarning" in text
                    and "worker_cancel_long_running_tasks_on_connection_loss" in text)


class Consumer(CeleryConsumer):
    """Celery's consumer without "native delayed delivery": it declares 28 extra quorum queues for
    ETA tasks, and Courier never sends one (retry waits live in the store). It says "reachable again"
    when it connects after an outage (`_ConsumerConnectionErrors` said it was down)."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [s for s in CeleryConsumer.Blueprint.default_steps
                         if not s.endswith(":DelayedDelivery")]

    def connect(self):
        connection = super().connect()
        outage = getattr(self.app, "courier_broker_outage", None)
        if outage is not None:
            outage.ok()
        return connection


# kombu's waits between beat's connection attempts (the worker's consumer uses kombu's defaults: 2s, 4s ... 30s).
BEAT_RETRY = (1.0, 1.0, 10.0)  # first, step, most


class Scheduler(PersistentScheduler):
    """celery beat's scheduler (the same schedule file), retrying the broker forever with one line per outage.

    Celery's own retries a limited number of times (broker_connection_max_retries), logging each, and
    then beat exits with a traceback; and a due task that cannot be sent logs a traceback.
    """

    @cached_property
    def outage(self) -> Outage:
        first, _, most = BEAT_RETRY
        return broker_outage(self.app, f"every {first:g}-{most:g}s")

    def _errback(self, exc: BaseException, interval: float) -> None:
        if failing_over(self.connection, interval):
            _failover_line(broker_location(self.connection.as_uri()), exc)
            return
        self.outage.failed(*(broker_problem(exc) or (str(exc)[:160], RABBITMQ_START)))

    @cached_property
    def producer(self):
        first, step, most = BEAT_RETRY
        connection = self.connection.ensure_connection(self._errback, None, interval_start=first,
                                                       interval_step=step, interval_max=most)
        self.outage.ok()
        return self.Producer(connection, auto_declare=False)

    def apply_entry(self, entry, producer=None):
        """Send one due task; the broker gone since the last is the outage's line, not a traceback."""
        logging.getLogger("celery.beat").info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            self.apply_async(entry, producer=producer, advance=False)
        except Exception as exc:
            problem = broker_problem(exc)
            if problem is None:
                logging.getLogger("celery.beat").error("Message Error: %s", exc, exc_info=True)
            else:  # this run is missed (beat sends it again at its next time) and the outage is reported
                self.outage.failed(*problem)
            return
        self.outage.ok()


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
        # Never give up on the broker (Celery's default: 100 attempts, then the worker exits, and under
        # honcho one exit stops every process): the outage is one log line, the retries are quiet.
        broker_connection_max_retries=None,
        beat_scheduler="courier.tasks.celery_app:Scheduler",
        task_queues=delivery_queues(settings),
        task_default_queue=f"{settings.queue_prefix}.default",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_consumer="courier.tasks.celery_app:Consumer",
        worker_hijack_root_logger=False,
        # Task events cost three confirmed publishes per task; Flower switches them on when it runs.
        worker_send_task_events=False,
    )
    celery.set_default()
    flask_app.extensions["celery"] = celery
    import courier.tasks.deliver  # noqa: F401  registers the task on this app
    import courier.tasks.retention  # registers courier.purge; its beat_schedule entry when COURIER_RETENTION is set
    courier.tasks.retention.configure(celery, settings)
    import courier.tasks.alerts  # registers courier.alerts; its beat_schedule entry, after retention's (docs/console.md)
    courier.tasks.alerts.configure(celery, settings)
    return celery


def celery_for(flask_app: Flask) -> Celery:
    """The app's Celery app, made on first use (a host app embedding Courier has none until then)."""
    return flask_app.extensions.get("celery") or celery_init_app(flask_app)


def worker_app(flask_app: Flask) -> Celery:
    """The Celery app a worker process runs (`celery -A module worker`), for Courier's app or a host's."""
    celery = celery_init_app(flask_app)
    settings, store = flask_app.extensions["courier.settings"], flask_app.extensions["courier.store"]
    celery.courier_broker_outage = broker_outage(celery, "every 2-30s")  # kombu's waits for the consumer
    # At every lost broker connection Celery 5 logs a seven-line notice (py.warnings: the worker captures
    # warnings and shows its own 'always') that Celery 6 will cancel running late-ack tasks then. Courier is
    # safe either way (the broker redelivers; a task whose dispatch moved on is a no-op), so after Celery's
    # "Connection to broker lost" line the outage's line is all an operator needs.
    logging.getLogger("py.warnings").addFilter(_CancelOnConnectionLossNotice())
    # Celery's two INFO lines per task ("received", "succeeded in ...: <the statuses>") repeat the one line
    # per attempt that courier.deliver writes, at a measurable cost per task; failures are still logged.
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("celery.worker.consumer.consumer").addFilter(
        _ConsumerConnectionErrors(celery.courier_broker_outage))
    store_watch = StoreWatch(store, logging.getLogger("courier.worker"),
                             note=" (tasks fail until then; their deliveries go again when their lease ends)")

    @worker_ready.connect(weak=False)
    def _declare_dead_letters(**_):
        declare_dead_letter_queues(celery, settings)
        store_watch.check_in_background()  # the store is used only when tasks come: say now if it is down

    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_):
        # A prefork child must not share the parent's database connections.
        store.engine.dispose(close=False)

    return celery
