"""`celery -A tasks worker`: Courier's delivery worker with the supply room's configuration.

With `flask --app app courier relay` beside it, this is the full deployment
(RabbitMQ, any number of workers) run by the host's own process manager.
"""
from courier import worker_app
from app import create_app

celery = worker_app(create_app())
