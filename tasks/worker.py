"""Entry point for `celery -A tasks.worker worker`: Courier's own Flask app and its Celery app, built once."""
from app import create_app
from tasks.celery_app import worker_app

celery = worker_app(create_app())
