"""End to end on real processes: ingest -> outbox -> relay -> RabbitMQ -> worker -> HTTP sink.

The relay and the worker run as the `courier relay` and `celery worker`
commands of the Procfile, against the real PostgreSQL and RabbitMQ, and are
killed with SIGKILL mid-run in the failure test. Throughput is printed, never
asserted (timing goals live in bench/).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app import create_app, tokens
from app.models import Delivery
from tests.conftest import BROKER_URL, settings_for, write_config
from tests.sinks import HttpSink

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
N_MESSAGES = 300


class Processes:
    """The relay and worker as real OS processes, with their logs kept for failure messages."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir, self.procs = env, log_dir, {}

    def start(self, name: str) -> None:
        argv = {
            "relay": [str(VENV_BIN / "courier"), "relay"],
            "worker": [str(VENV_BIN / "celery"), "-A", "tasks.worker", "worker", "--pool", "threads",
                       "--concurrency", "8", "--loglevel", "INFO", "--without-mingle", "--without-gossip",
                       "-n", f"test-{os.getpid()}@%h"],
        }[name]
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=Path(__file__).resolve().parents[1])

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the worker consumes (its log says "ready"), so timings exclude its start-up."""
        deadline = time.monotonic() + timeout
        while b" ready." not in (self.log_dir / "worker.log").read_bytes():
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture
def pipeline(tmp_path, store, queue_prefix):
    """A sink, a config routing every message of source `lab` to billing and erp, and process control."""
    with HttpSink() as sink:
        cfg = write_config(tmp_path / "courier.yml", {"billing": f"http://127.0.0.1:{sink.port}/billing",
                                                      "erp": f"http://127.0.0.1:{sink.port}/erp"},
                           retry={"max_attempts": 10, "initial": "200ms", "max": "2s"})
        env = {**os.environ, "DATABASE_URL": store.url, "BROKER_URL": BROKER_URL, "COURIER_CONFIG": str(cfg),
               "COURIER_QUEUE_PREFIX": queue_prefix, "COURIER_RELAY_LEASE": "5s", "PYTHONUNBUFFERED": "1"}
        procs = Processes(env, tmp_path)
        flask_app = create_app(settings_for(cfg, store.url, queue_prefix))
        with store.session() as session:
            _, token = tokens.create(session, scope="ingest", source="lab")
        try:
            yield sink, procs, flask_app.test_client(), {"Authorization": f"Bearer {token}"}
        finally:
            procs.stop_all()
            flask_app.extensions["courier.store"].dispose()


def post_messages(client, headers, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        r = client.post("/api/v1/messages", headers=headers, content_type="application/json",
                        data=json.dumps({"type": "service.completed", "id": f"svc-{i}", "data": {"n": i}}))
        assert r.status_code == 202, r.get_json()


def delivered_count(store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status == "delivered"))


def wait_all_delivered(store, total: int, procs: Processes, timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if delivered_count(store) == total:
            return time.monotonic() - t0
        time.sleep(0.1)
    with store.session() as s:
        by_status = dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
    pytest.fail(f"not all delivered after {timeout}s: {by_status}\n{procs.logs()}")


def check_sink(store, sink: HttpSink, *, exact: bool) -> None:
    """Every delivery reached its destination with its own key and its own message's body."""
    with store.session() as s:
        expected = {d.id: (d.destination, d.message.body) for d in s.scalars(select(Delivery))}
    seen = sink.count_by_key()
    assert set(seen) == set(expected), "the sink saw keys that are not deliveries, or missed some"
    if exact:
        assert all(n == 1 for n in seen.values()), {k: n for k, n in seen.items() if n > 1}
    for r in sink.received:
        destination, body = expected[r.headers["idempotency-key"]]
        assert r.path == f"/{destination}" and r.body == body


def test_every_message_reaches_both_destinations_exactly_once(pipeline, store):
    sink, procs, client, headers = pipeline
    procs.start("worker")
    procs.start("relay")
    procs.wait_ready()
    t0 = time.monotonic()
    post_messages(client, headers, N_MESSAGES)
    posted = time.monotonic() - t0
    wait_all_delivered(store, 2 * N_MESSAGES, procs)
    elapsed = time.monotonic() - t0
    check_sink(store, sink, exact=True)
    print(f"\nend-to-end: {N_MESSAGES} messages ({2 * N_MESSAGES} deliveries) posted in {posted:.2f}s, all "
          f"delivered after {elapsed:.2f}s = {N_MESSAGES / elapsed:.0f} messages/s")


def test_nothing_is_lost_when_relay_and_worker_are_killed(pipeline, store):
    sink, procs, client, headers = pipeline
    procs.start("worker")
    procs.start("relay")
    post_messages(client, headers, N_MESSAGES // 2)
    # Kill both in the middle of the run: some deliveries claimed, some published, some mid-send.
    deadline = time.monotonic() + 60
    while delivered_count(store) < N_MESSAGES // 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    procs.kill("worker")
    procs.kill("relay")
    before = delivered_count(store)
    assert before < N_MESSAGES, "the kill came too late to interrupt anything"
    post_messages(client, headers, N_MESSAGES // 2, start=N_MESSAGES // 2)  # accepted while both are down
    procs.start("relay")
    procs.start("worker")
    wait_all_delivered(store, 2 * N_MESSAGES, procs)
    check_sink(store, sink, exact=False)
    dupes = sum(n - 1 for n in sink.count_by_key().values())
    print(f"\nkilled at {before}/{2 * N_MESSAGES} delivered; all delivered after restart; "
          f"{dupes} duplicate sends, each with its delivery's own Idempotency-Key")
