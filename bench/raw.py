"""The raw limits of this machine, with the client libraries Courier uses (kombu, SQLAlchemy + psycopg).

- RabbitMQ publish: persistent messages to a durable quorum queue (Courier's
  queue type) with a publisher confirm awaited per message (kombu's
  `confirm_publish`, as Courier's relay), from 1 and from 4 publishers, each
  a thread with its own connection.
- RabbitMQ consume: the same messages, one ack per message, prefetch 8 (one
  Courier worker: concurrency 8 x prefetch multiplier 1).
- PostgreSQL: one single-row INSERT per transaction (commit = WAL flush),
  from 1 and from 8 clients, each a thread with its own pooled connection.

Each test runs for `seconds` and reports operations per second.
"""
from __future__ import annotations

import threading
import time

from kombu import Connection, Consumer, Exchange, Producer, Queue
from sqlalchemy import create_engine, text

from bench.infra import BROKER_URL


def _in_threads(n: int, seconds: float, one: callable) -> float:
    """Run `one()` in a loop in n threads for `seconds`; operations per second, all threads together."""
    counts, end = [0] * n, time.monotonic() + seconds

    def loop(k: int) -> None:
        while time.monotonic() < end:
            one(k)
            counts[k] += 1

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def rabbitmq(prefix: str, seconds: float) -> dict[str, float]:
    """Confirmed persistent publishes/s from 1 and 4 publishers, then acked consumes/s."""
    queue = Queue(f"{prefix}.raw", Exchange(f"{prefix}.raw", type="direct", durable=True), routing_key="raw",
                  durable=True, queue_arguments={"x-queue-type": "quorum"})
    results = {}
    for publishers in (1, 4):
        conns = [Connection(BROKER_URL, transport_options={"confirm_publish": True}) for _ in range(publishers)]
        producers = [Producer(c.channel(), exchange=queue.exchange, routing_key="raw") for c in conns]
        queue.bind(conns[0].default_channel).declare()
        body = b"x" * 200  # about the size of a Celery task message carrying two ids
        results[f"publish_{publishers}"] = _in_threads(
            publishers, seconds, lambda k: producers[k].publish(body, delivery_mode=2))
        for c in conns:
            c.release()
    results["consume"] = _consume(queue, seconds)
    return results


def _consume(queue: Queue, seconds: float) -> float:
    got, last = [0], [0.0]
    with Connection(BROKER_URL) as conn:
        channel = conn.channel()

        def on_message(body, message):
            message.ack()
            got[0] += 1
            last[0] = time.monotonic()

        with Consumer(channel, [queue], callbacks=[on_message], prefetch_count=8, accept=None):
            t0 = time.monotonic()
            end = t0 + seconds
            while time.monotonic() < end:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    break  # the queue is empty
            return got[0] / ((last[0] or time.monotonic()) - t0)  # not counting the wait on an empty queue


def postgresql(url: str, seconds: float) -> dict[str, float]:
    """Single-row INSERT commits/s from 1 and 8 clients."""
    engine = create_engine(url, pool_size=8)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE bench_raw (id bigserial PRIMARY KEY, payload text)"))

    def insert(_k: int) -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO bench_raw (payload) VALUES (:p)"), {"p": "x" * 200})

    try:
        return {f"commit_{n}": _in_threads(n, seconds, insert) for n in (1, 8)}
    finally:
        engine.dispose()
