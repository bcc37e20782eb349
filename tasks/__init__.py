"""Courier's moving parts: the Celery app, the deliver task, the outbox relay and the CLI.

This package wires `app` (store, outbox, config) to `adapters` (delivery
technologies); neither of those imports it.
"""
