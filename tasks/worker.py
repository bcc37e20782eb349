"""Entry point for `celery -A tasks.worker worker`: the Flask app and its Celery app, built once."""
from celery.signals import worker_process_init, worker_ready

from app import create_app
from tasks.celery_app import celery_init_app, declare_dead_letter_queues

flask_app = create_app()
celery = celery_init_app(flask_app)


@worker_ready.connect
def _declare_dead_letters(**_):
    declare_dead_letter_queues(celery, flask_app.extensions["courier.settings"])


@worker_process_init.connect
def _fresh_connections(**_):
    # A prefork child must not share the parent's database connections.
    flask_app.extensions["courier.store"].engine.dispose(close=False)
