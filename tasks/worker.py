"""Entry point for `celery -A tasks.worker worker`: the Flask app and its Celery app, built once."""
from app import create_app
from tasks.celery_app import celery_init_app

flask_app = create_app()
celery = celery_init_app(flask_app)
