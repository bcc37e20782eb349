"""Logs and Sentry for every Courier process (web, worker, relay, mllp), set up once per process.

Logs: one JSON object per line on stderr (COURIER_LOG_FORMAT=text for humans), each with the
current correlation id, so `grep <correlation id>` follows a message across processes.
Sentry (SENTRY_DSN): errors only, scrubbed to ids, types and code locations: no body, HL7
segment, PHI field, request body, SQL parameter or local variable ever leaves the process.

Nothing here logs or sends content: the rule everywhere is ids, counts, types and codes only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import uuid
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from functools import wraps
from typing import Any, Iterator

__all__ = ["correlation", "current_correlation_id", "new_correlation_id", "set_process", "setup",
           "with_new_correlation", "JsonFormatter", "Outage", "scrub_event", "scrub_breadcrumb"]

_correlation_id: ContextVar[str | None] = ContextVar("courier_correlation_id", default=None)
_process: str | None = None
_request_log = logging.getLogger("courier.web")


# --- correlation id -------------------------------------------------------------------------

def current_correlation_id() -> str | None:
    """The correlation id of the request, MLLP frame or delivery being handled here, if any."""
    return _correlation_id.get()


def new_correlation_id() -> str:
    return uuid.uuid4().hex


@contextmanager
def correlation(correlation_id: str | None) -> Iterator[str | None]:
    """Make `correlation_id` current for the block (then restore the one before: threads and nesting)."""
    token = _correlation_id.set(correlation_id)
    try:
        yield correlation_id
    finally:
        _correlation_id.reset(token)


def with_new_correlation(func):
    """Run `func` under a fresh correlation id (one per MLLP frame: an executor thread has no context)."""
    @wraps(func)
    def wrapper(*args, **kwargs):
        with correlation(new_correlation_id()):
            return func(*args, **kwargs)
    return wrapper


# --- process name ---------------------------------------------------------------------------

def set_process(name: str) -> None:
    """Name this process in every log line and Sentry event ("web", "worker", "relay", "mllp")."""
    global _process
    _process = name


def process_name() -> str:
    """The name given by set_process, else a guess from the command line (gunicorn means web)."""
    if _process:
        return _process
    argv = " ".join(os.path.basename(a) for a in sys.argv[:4])
    for word in ("worker", "beat", "flower", "relay", "mllp"):
        if word in argv.split():
            return word
    return "web"


# --- logs -----------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a structured field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                     "correlation_id"}


def format_exception_without_values(exc_info) -> str:
    """A traceback with every frame but no exception message: messages carry values ("bad PID-5 DOE^JANE")."""
    _type, value, tb = exc_info
    parts: list[str] = []
    seen: set[int] = set()
    while value is not None and id(value) not in seen:  # the chain, innermost cause first as Python prints it
        seen.add(id(value))
        parts.insert(0, "".join(traceback.format_tb(value.__traceback__ or (tb if not parts else None)))
                     + f"{type(value).__module__}.{type(value).__qualname__}: [message not logged]\n")
        value = value.__cause__ or (None if value.__suppress_context__ else value.__context__)
    return "Traceback (most recent call last):\n" + "\nThe above exception led to:\n\n".join(parts).rstrip("\n")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, process, pid, correlation_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": process_name(),
            "pid": record.process,
            "correlation_id": getattr(record, "correlation_id", None) or current_correlation_id(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            doc["exc"] = format_exception_without_values(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: a structured field that is not JSON (a UUID, a datetime) is still one line.
        return json.dumps(doc, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """The development format: readable, still with the process and correlation id."""

    def format(self, record: logging.LogRecord) -> str:
        record.courier_process = process_name()
        record.courier_cid = getattr(record, "correlation_id", None) or current_correlation_id() or "-"
        return super().format(record)

    def formatException(self, ei) -> str:
        return format_exception_without_values(ei)


class _StderrHandler(logging.StreamHandler):
    """Writes to the process's real stderr (fd 2), never to a replaced sys.stderr: a Celery worker
    redirects sys.stderr into logging, which would loop, and test runners close theirs."""

    def __init__(self):
        super().__init__(sys.__stderr__)

    @property
    def stream(self):
        return sys.__stderr__

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once per process: our handler on stderr, JSON unless COURIER_LOG_FORMAT=text.

    JSON is the default so production never depends on remembering a flag; developers set text.
    """
    fmt = (fmt or os.environ.get("COURIER_LOG_FORMAT") or "json").lower()
    root = logging.getLogger()
    root.setLevel(level)
    if any(isinstance(h, _StderrHandler) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(
        "%(asctime)s %(levelname)s %(courier_process)s %(name)s [%(courier_cid)s] %(message)s"))
    root.addHandler(handler)


# --- outages of the services a process needs -------------------------------------------------

START_HINT = "start it with"


def start_hint(command: str) -> str:
    """The hint of an outage line that this machine's `command` fixes; Outage replaces it for a list of hosts."""
    return f"{START_HINT} `{command}`"


class Outage:
    """One clear line when a service (PostgreSQL, RabbitMQ) stops answering, one when it answers again.

    The retries in between are DEBUG lines: an outage of an hour is two lines at INFO, not a line per
    attempt, and the first says what is down, why, how to start it and how often it is retried. The
    line is ERROR (so Sentry, if set, gets one event per outage). Thread-safe: the MLLP listener's
    ingest threads and its watch thread report into one. `log` needs only error/info/debug.
    """

    def __init__(self, log, service: str, where: str, retry: str, note: str = ""):
        """`retry` says how often, e.g. "every 0.5-10s"; `note` is added to the outage line."""
        self.log, self.service, self.where, self.retry, self.note = log, service, where, retry, note
        self.since: float | None = None  # time.monotonic() of the outage's first failure
        self.attempts = 0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, reason: str, hint: str) -> bool:
        """An attempt failed (`reason`: "connection refused"; `hint`: "start it with ..."). True when this
        began the outage and its line was logged; later calls log at DEBUG only."""
        with self._lock:
            first = self.since is None
            if first:
                self.since = time.monotonic()
            self.attempts += 1
            attempts = self.attempts
        if first:
            if "," in self.where and hint.startswith(START_HINT):  # a list of hosts: this machine's command is wrong
                hint = "start one of them" + (", or let the failover tool promote a standby"
                                              if self.service == "PostgreSQL" else "")
            self.log.error(f"{self.service} at {self.where} is not reachable ({reason}); {hint}; "
                           f"retrying {self.retry}{self.note}")
        else:
            self.log.debug(f"{self.service} at {self.where} still not reachable ({reason}), attempt {attempts}")
        return first

    def ok(self) -> bool:
        """An attempt worked: logs "reachable again" once if an outage was on; True then."""
        with self._lock:
            since, attempts, self.since, self.attempts = self.since, self.attempts, None, 0
        if since is None:
            return False
        self.log.info(f"{self.service} at {self.where} is reachable again after {time.monotonic() - since:.0f}s "
                      f"({attempts} failed attempts); resuming")
        return True


# --- Sentry ---------------------------------------------------------------------------------

SCRUBBED = "[scrubbed]"
# Structured fields that are ids or names of our own things, never content: kept in events and breadcrumbs.
SAFE_FIELDS = frozenset({"message_id", "delivery_id", "destination", "source", "correlation_id", "attempt",
                         "status", "message_type", "task_name", "dispatch"})
_SAFE_CONTEXTS = ("runtime", "os", "trace", "app", "device")
_SAFE_TOP = ("event_id", "timestamp", "level", "logger", "platform", "server_name", "release", "environment",
             "sdk", "transaction", "fingerprint", "type", "start_timestamp", "modules")


def _scrub_stacktrace(stacktrace: dict | None) -> dict | None:
    """Frames keep file, function, line and source code; never local variables."""
    if not stacktrace:
        return stacktrace
    frames = []
    for frame in stacktrace.get("frames") or []:
        frames.append({k: v for k, v in frame.items() if k != "vars"})
    return {**{k: v for k, v in stacktrace.items() if k != "frames"}, "frames": frames}


def _safe_mapping(data: Any) -> dict:
    return {k: v for k, v in data.items() if k in SAFE_FIELDS and isinstance(v, (str, int, float, bool))} \
        if isinstance(data, dict) else {}


def scrub_event(event: dict, hint: dict | None = None) -> dict:
    """Sentry's before_send: rebuild the event from an allow-list, so what is unknown is dropped.

    Exception messages go too (only the type stays): code puts values in them ("bad PID-5 DOE^JANE").
    A log event keeps its format string, not its arguments.
    """
    out = {k: event[k] for k in _SAFE_TOP if k in event}
    values = []
    for exc in (event.get("exception") or {}).get("values") or []:
        values.append({"type": exc.get("type"), "module": exc.get("module"), "value": SCRUBBED,
                       "mechanism": exc.get("mechanism"), "stacktrace": _scrub_stacktrace(exc.get("stacktrace"))})
    if values:
        out["exception"] = {"values": values}
    threads = []
    for thread in (event.get("threads") or {}).get("values") or []:
        threads.append({k: v for k, v in thread.items() if k in ("id", "name", "current", "crashed", "main")}
                       | {"stacktrace": _scrub_stacktrace(thread.get("stacktrace"))})
    if threads:
        out["threads"] = {"values": threads}
    logentry = event.get("logentry") or {}
    template = logentry.get("message") if isinstance(logentry, dict) else None
    if template:
        out["logentry"] = {"message": template}  # params (the values) are dropped
    elif event.get("message"):
        out["message"] = SCRUBBED  # a bare message may be anything
    request = event.get("request") or {}
    if request:
        out["request"] = {"method": request.get("method"), "url": (request.get("url") or "").split("?")[0]}
    out["tags"] = {k: v for k, v in (event.get("tags") or {}).items()
                   if k in SAFE_FIELDS or k in ("process", "celery_task_id", "transaction", "url")} \
        if isinstance(event.get("tags"), dict) else {}
    cid = current_correlation_id()
    if cid:
        out["tags"].setdefault("correlation_id", cid)
    out["tags"]["process"] = process_name()
    contexts = event.get("contexts") or {}
    out["contexts"] = {k: contexts[k] for k in _SAFE_CONTEXTS if k in contexts}
    extra = event.get("extra") or {}
    job = extra.get("celery-job") if isinstance(extra, dict) else None
    out["extra"] = _safe_mapping(extra) | ({"task_name": job.get("task_name")} if isinstance(job, dict) else {})
    crumbs = [c for c in (scrub_breadcrumb(dict(b)) for b in (event.get("breadcrumbs") or {}).get("values") or [])
              if c is not None]
    if crumbs:
        out["breadcrumbs"] = {"values": crumbs}
    return out


def scrub_breadcrumb(crumb: dict, hint: dict | None = None) -> dict | None:
    """Sentry's before_breadcrumb: keep when, what kind and a safe summary; SQL keeps its statement only."""
    category = crumb.get("category") or ""
    out = {k: crumb[k] for k in ("timestamp", "type", "category", "level") if k in crumb}
    message = crumb.get("message")
    if category == "query":
        out["message"] = message  # the statement with placeholders; parameters live in data, dropped below
    elif category in ("httplib", "http"):
        data = crumb.get("data") or {}
        out["data"] = {"method": data.get("method"), "url": (data.get("url") or "").split("?")[0],
                       "status_code": data.get("status_code")}
    elif message is not None:
        # Log breadcrumbs: our log messages carry ids only (the rule above), but a third-party
        # library's may not; keep the template, never the formatted text with its arguments.
        record = (hint or {}).get("log_record")
        out["message"] = record.msg if isinstance(record, logging.LogRecord) and isinstance(record.msg, str) \
            else SCRUBBED
    data = _safe_mapping(crumb.get("data"))
    if data:
        out.setdefault("data", {}).update(data)
    return out


_sentry_dsn: str | None = None


def setup_sentry(dsn: str | None) -> bool:
    """Start Sentry with the Flask, Celery and SQLAlchemy integrations if `dsn` is set; True if started."""
    global _sentry_dsn
    if not dsn or dsn == _sentry_dsn:
        return bool(dsn)
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.flask import FlaskIntegration
    from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration

    with warnings.catch_warnings():
        # sentry-sdk >= 2.7x deprecates send_default_pii for data_collection, which older 2.x (setup.cfg
        # allows >=2.0) rejects; send_default_pii=False means the same in both, and before_send is the guard.
        warnings.filterwarnings("ignore", message=".*send_default_pii.*", category=DeprecationWarning)
        sentry_sdk.init(
            dsn=dsn,
            integrations=[FlaskIntegration(), CeleryIntegration(), SqlalchemyIntegration()],
            send_default_pii=False,          # no user, IP, cookies or headers with credentials
            include_local_variables=False,   # a frame's locals hold bodies and segments
            max_request_body_size="never",   # the request body is the message
            include_source_context=True,     # our source code lines, not data
            before_send=scrub_event,
            before_breadcrumb=scrub_breadcrumb,
            traces_sample_rate=0,            # errors only; transactions would carry URLs and SQL
        )
    _sentry_dsn = dsn
    return True


_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}\Z")  # what the messages table accepts (app/ingest.py)


def init_app(flask_app, settings) -> None:
    """Logs and Sentry for this process, and a correlation id for every request of `flask_app`.

    The id is the request's X-Correlation-ID if usable, else made up here; a made-up one is
    written back into the request's headers so ingest stores it as the message's correlation id
    (the API reads that header), and it is echoed in the response.
    """
    from flask import g, request

    setup(settings)

    @flask_app.before_request
    def _bind_correlation_id():
        cid = request.headers.get("X-Correlation-ID")
        if not cid or not _SAFE_ID.fullmatch(cid):
            cid = new_correlation_id()
            request.environ["HTTP_X_CORRELATION_ID"] = cid  # request.headers reads the environ
        g.courier_correlation_token = _correlation_id.set(cid)

    @flask_app.after_request
    def _echo_correlation_id(response):
        cid = current_correlation_id()
        if cid:
            response.headers.setdefault("X-Correlation-ID", cid)
        # The web's line for `grep <correlation id>`: the path only (a query string may hold search terms).
        _request_log.info("%s %s %d", request.method, request.path, response.status_code,
                          extra={"method": request.method, "path": request.path, "status": response.status_code})
        return response

    @flask_app.teardown_request
    def _unbind_correlation_id(_exc=None):
        token = g.pop("courier_correlation_token", None)
        if token is not None:
            _correlation_id.reset(token)


def setup(settings, process: str | None = None) -> None:
    """Logs and Sentry for this process from `settings` (log_level, sentry_dsn); safe to call again."""
    if process:
        set_process(process)
    setup_logging(settings.log_level)
    setup_sentry(settings.sentry_dsn)
