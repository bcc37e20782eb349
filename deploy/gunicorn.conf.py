"""gunicorn settings for Courier's web process (Procfile `web`: `gunicorn -c deploy/gunicorn.conf.py ...`).

Only the metrics bookkeeping lives here; bind, workers and threads stay on the command line.
"""
from app import metrics


def on_starting(server):
    """The master starts: drop the metrics files of processes that are gone (app.metrics.clean_dead)."""
    removed = metrics.clean_dead()
    server.log.info("metrics: %s, %d stale files removed", metrics.multiprocess_dir(), removed)


def child_exit(server, worker):
    """A worker died or was replaced: prometheus_client's bookkeeping for its live gauges."""
    metrics.process_dead(worker.pid)
