"""The naive baseline: what a user might write instead of Courier, to compare against.

    gunicorn ... 'bench.naive:app'              # the web process
    celery -A bench.naive worker --pool threads  # the worker

A Flask view that calls `task.delay()` once per destination and answers 202,
and a Celery task that POSTs with `requests.post`. No outbox, no database,
Celery's defaults (no publisher confirms, early acks, prefetch 4 per thread),
so it promises nothing: a 202 only means "handed to the client library".
It answers in Courier's shape ({"id", "deliveries": [{"id", "destination"}]})
so the same load client can count what was accepted; each delivery's id is
sent as its Idempotency-Key, so the same sink can count what arrived.

Settings (environment): BROKER_URL, NAIVE_QUEUE (the queue name),
NAIVE_DESTINATIONS (space-separated `name=url` pairs).
"""
from __future__ import annotations

import os
import uuid

import requests
from celery import Celery
from flask import Flask, request

DESTINATIONS = dict(pair.split("=", 1) for pair in os.environ.get("NAIVE_DESTINATIONS", "").split())

celery = Celery("naive", broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
celery.conf.update(task_default_queue=os.environ.get("NAIVE_QUEUE", "naive"), task_ignore_result=True,
                   worker_hijack_root_logger=False)


@celery.task(name="naive.post")
def post(url: str, body: str, content_type: str, key: str) -> None:
    requests.post(url, data=body.encode(), headers={"Content-Type": content_type, "Idempotency-Key": key},
                  timeout=10).raise_for_status()


app = Flask(__name__)


@app.post("/api/v1/messages")
def accept():
    message_id = str(uuid.uuid4())
    body = request.get_data(as_text=True)
    deliveries = []
    for name, url in DESTINATIONS.items():
        delivery_id = f"{message_id}.{name}"
        post.delay(url, body, request.content_type, delivery_id)
        deliveries.append({"id": delivery_id, "destination": name, "status": "pending"})
    return {"id": message_id, "status": "accepted", "deliveries": deliveries}, 202
