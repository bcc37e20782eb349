"""Entry point for `celery -A courier.tasks.worker worker`: Courier's own Flask app and its Celery app, built once."""
from courier.app import create_app
from courier.tasks.celery_app import worker_app

celery = worker_app(create_app())
