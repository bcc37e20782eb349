"""gunicorn settings for Courier's web process (Procfile `web`: `gunicorn -c deploy/gunicorn.conf.py ...`).

The metrics bookkeeping and gunicorn's own log lines as JSON (app.observability's format);
bind, workers and threads stay on the command line. No access log: the app logs one JSON line
per request itself (logger courier.web), with its correlation id.
"""
from app import metrics


def on_starting(server):
    """The master starts: drop the metrics files of processes that are gone (app.metrics.clean_dead)."""
    removed = metrics.clean_dead()
    server.log.info("metrics: %s, %d stale files removed", metrics.multiprocess_dir(), removed)


def child_exit(server, worker):
    """A worker died or was replaced: prometheus_client's bookkeeping for its live gauges."""
    metrics.process_dead(worker.pid)


# gunicorn merges this over its defaults: its loggers (gunicorn.error, gunicorn.access) keep their
# handler names, which now format JSON like every other Courier process.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "app.observability.JsonFormatter"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        "error_console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
    },
    # Not propagated: the root logger (the app's handler) would print each line a second time.
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        # Quiet: the app logs each request itself (courier.web), with its correlation id.
        "gunicorn.access": {"level": "WARNING", "handlers": ["console"], "propagate": False},
    },
}
