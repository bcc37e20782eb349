"""Courier's moving parts (courier.tasks): the Celery app and its queues, the deliver task, the outbox
relay, the embedded (in-process) runner, Flower, systemd install and the `courier` command.

This package wires courier.app (store, outbox, config) to courier.adapters (delivery technologies) and
may import both; neither imports it (import contracts in pyproject.toml).
"""
