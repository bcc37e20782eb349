"""Courier's relay and worker as real OS processes for tests that watch or kill them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from courier.app import create_app
from courier.app.store import tokens
from courier.app.store.models import Delivery
from tests.support.config import settings_for, write_config
from tests.support.services import BROKER_URL

VENV_BIN = Path(sys.executable).parent


class Processes:
    """The relay and worker as real OS processes, with their logs kept for failure messages."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir, self.procs = env, log_dir, {}

    def start(self, name: str, pool: str = "threads", concurrency: int = 8) -> None:
        """Start "relay" or "worker" (any name starting with "worker"), logging to <log_dir>/<name>.log."""
        if name == "relay":
            argv = [str(VENV_BIN / "courier"), "relay"]
        else:
            argv = [str(VENV_BIN / "celery"), "-A", "courier.tasks.worker", "worker", "--pool", pool,
                    "--concurrency", str(concurrency), "--loglevel", "INFO", "--without-mingle",
                    "--without-gossip", "-n", f"{name}-{os.getpid()}@%h"]
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=Path(__file__).resolve().parents[2])

    def wait_ready(self, name: str = "worker", timeout: float = 60.0) -> None:
        """Wait until a worker consumes (its log says "ready"), so timings exclude its start-up."""
        deadline = time.monotonic() + timeout
        while b" ready." not in (self.log_dir / f"{name}.log").read_bytes():
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


@contextmanager
def running_courier(tmp_path: Path, store, queue_prefix: str, destinations: dict[str, str], *,
                    env: dict[str, str] | None = None, **destination_options):
    """Config + environment for real processes, an in-process API client and an ingest token for `lab`.

    Yields .procs (start/kill relay and workers), .client, .headers, .app, .config.
    """
    cfg = write_config(tmp_path / "courier.yml", destinations, **destination_options)
    process_env = {**os.environ, "DATABASE_URL": store.url, "BROKER_URL": BROKER_URL, "COURIER_CONFIG": str(cfg),
                   "COURIER_QUEUE_PREFIX": queue_prefix, "COURIER_RELAY_LEASE": "5s", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": str(Path(__file__).resolve().parents[2]),  # transforms in tests/
                   **(env or {})}
    procs = Processes(process_env, tmp_path)
    flask_app = create_app(settings_for(cfg, store.url, queue_prefix))
    with store.session() as session:
        _, token = tokens.create(session, scope="ingest", source="lab")
    try:
        yield SimpleNamespace(procs=procs, client=flask_app.test_client(), app=flask_app, config=cfg,
                              headers={"Authorization": f"Bearer {token}"})
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
