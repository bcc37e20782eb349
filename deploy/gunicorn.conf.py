"""gunicorn settings for Courier's web process (Procfile `web`: `gunicorn -c deploy/gunicorn.conf.py ...`).

The metrics bookkeeping, gunicorn's own log lines as JSON (courier.app.observability's format), and
HTTPS from the environment (courier.app.tls: COURIER_TLS_CERT + COURIER_TLS_KEY, optional
COURIER_TLS_CLIENT_CA for client certificates). Bind, workers and threads stay on the command
line. No access log: the app logs one JSON line per request itself (logger courier.web).

The master loads only this file (gunicorn, prometheus_client and the standard library: about 28 MB),
never the app, which each worker imports after the fork. `make bench` sums RSS over the master and its
workers, so what the master loads counts a third time (it was 70 MB, with Flask, SQLAlchemy and the
config's libraries). preload_app, measured, costs more: the web's summed RSS 207 MB against 173, and
more PSS too (the workers' reference counting dirties the pages they share). docs/benchmarks.md, "Memory".
"""
import logging
import ssl
import sys

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker

from courier.app import metrics, tls
from courier.app.settings import ConfigError

# gunicorn 24+ opens a control socket at ~/.gunicorn/gunicorn.ctl: one path per user, so a second web
# process on the host (two Courier nodes, a test beside `make run`) would take it over. Courier uses none.
control_socket_disable = True

try:
    _tls = tls.from_env("COURIER_TLS")
except ConfigError as exc:
    # SystemExit, not an exception: gunicorn would print a traceback around it. The message names the variable.
    sys.exit("courier web: cannot start: " + "; ".join(exc.problems))

if _tls is not None:
    # certfile/keyfile make gunicorn wrap each connection (and set wsgi.url_scheme to https);
    # ca_certs/cert_reqs say the same as our context below, for anyone reading `gunicorn --print-config`.
    certfile, keyfile = _tls.cert, _tls.key
    if _tls.client_ca:
        ca_certs, cert_reqs = _tls.client_ca, ssl.CERT_REQUIRED

    def ssl_context(config, default_ssl_context_factory):
        """courier.app.tls's server context, as the MLLP listener's (TLS 1.2 at least, client certificates when asked
        for), in place of gunicorn's default; remade when the files change, so renewed ones need no restart."""
        return _tls.context()


def on_starting(server):
    """The master starts: drop the metrics files of processes that are gone (courier.app.metrics.clean_dead)."""
    removed = metrics.clean_dead()
    server.log.info("metrics: %s, %d stale files removed", metrics.multiprocess_dir(), removed)


def child_exit(server, worker):
    """A worker died or was replaced: prometheus_client's bookkeeping for its live gauges."""
    metrics.process_dead(worker.pid)


class QuietAccessLogger(Logger):
    """gunicorn's logger, minus the access line's fields when gunicorn.access would drop the line anyway.

    With a logconfig_dict, gunicorn builds every request's access-log fields before the logger's level
    is asked: measured, 8% of the web process's CPU for lines nobody sees (gunicorn.access is WARNING).
    """

    def access(self, resp, req, environ, request_time):
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


logger_class = QuietAccessLogger


class BalancedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that accepts a new connection only while one of its threads is free.

    Stock gthread accepts up to worker_connections (1000) at once: when sixteen keep-alive clients
    connected together, the first worker to wake took all sixteen and served them on one core
    while the other worker idled (measured: 14.7 s of CPU against 0.1 s). A worker whose threads
    are all taken now leaves new connections in the listen queue for a worker with a free thread.
    gthread reads `worker_connections` before each poll to decide whether to accept: here it
    answers "no more" while every thread is taken.
    """

    @property
    def worker_connections(self) -> int:
        idle = len(self.keepalived_conns) + len(getattr(self, "pending_conns", ()))
        return self.cfg.worker_connections if self.nr_conns - idle < self.cfg.threads else 0

    @worker_connections.setter
    def worker_connections(self, _value) -> None:
        pass  # gthread sets it from the configuration in __init__; the property above decides


worker_class = BalancedThreadWorker

# gunicorn merges this over its defaults: its loggers (gunicorn.error, gunicorn.access) keep their
# handler names, which now format JSON like every other Courier process.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "courier.app.observability.JsonFormatter"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        "error_console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
    },
    # gunicorn's defaults give the root logger its stdout handler too: with the app's own (stderr)
    # every application line came out twice. The app's handler is the root's only one.
    "root": {"level": "INFO", "handlers": []},
    # Not propagated: the root logger (the app's handler) would print each line a second time.
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        # Quiet: the app logs each request itself (courier.web), with its correlation id.
        "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
    },
}
