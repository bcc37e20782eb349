"""Several Courier "nodes" on one machine, for the tests of what must hold across nodes (docs/scaling.md).

A node is one full set of Courier's OS processes, as the Procfile runs them: gunicorn (web), `courier relay`,
a Celery worker and `courier mllp`, each in its own process group with its own log, on ports of its own.
Nodes share what production nodes share: DATABASE_URL, BROKER_URL, COURIER_CONFIG and COURIER_QUEUE_PREFIX
(the `env` given to every node); each has its own PROMETHEUS_MULTIPROC_DIR, as each VM has its own.

    nodes = [Node("a", env, tmp / "a"), Node("b", env, tmp / "b")]
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()
    ...                           # node.port (HTTP), node.mllp_port, node.log("worker")
    for node in nodes:
        node.stop()
    delete_queues(BROKER_URL, prefix, destinations)
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.processes import VENV_BIN

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("web", "relay", "worker", "mllp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One node's web, relay, worker and MLLP listener, logging to <log_dir>/<process>.log."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *, web_threads: int = 4,
                 worker_concurrency: int = 4):
        self.name, self.log_dir = name, log_dir
        self.port, self.mllp_port = free_port(), free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "metrics").mkdir(exist_ok=True)
        self.env = {**env, "PORT": str(self.port), "MLLP_PORT": str(self.mllp_port),
                    "PROMETHEUS_MULTIPROC_DIR": str(log_dir / "metrics"),
                    "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}"}
        bin_ = str(VENV_BIN)
        # The Procfile's commands, on loopback and this node's ports. The worker's name is unique per node and
        # run; mingle and gossip are off, as in tests/support/processes.py: they only talk to other workers on
        # the broker (other test runs' too) and add seconds to the start, and nothing tested here uses them.
        self.argv = {
            "web": [f"{bin_}/gunicorn", "-c", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}",
                    "--workers", "1", "--threads", str(web_threads), "courier.app:create_app()"],
            "relay": [f"{bin_}/courier", "relay"],
            "worker": [f"{bin_}/celery", "-A", "courier.tasks.worker", "worker", "--pool", "threads",
                       "--concurrency", str(worker_concurrency), "--loglevel", "INFO", "--without-mingle",
                       "--without-gossip", "-n", f"node-{name}-{env.get('COURIER_QUEUE_PREFIX', '')}@%h"],
            "mllp": [f"{bin_}/courier", "mllp", "--host", "127.0.0.1"],
        }
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, processes=PROCESSES) -> None:
        for name in processes:
            with open(self.log_dir / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(self.argv[name], env=self.env, cwd=ROOT, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every started process serves: web answers /healthz, the worker consumes, the listener
        listens, the relay runs its loop."""
        checks = {"web": lambda: _answers(self.port), "worker": lambda: " ready." in self.log("worker"),
                  "mllp": lambda: listening(self.mllp_port), "relay": lambda: "relay started" in self.log("relay")}
        deadline = time.monotonic() + timeout
        for name in self.procs:
            while not checks[name]():
                exited = [n for n, p in self.procs.items() if p.poll() is not None]
                assert not exited and time.monotonic() < deadline, \
                    f"node {self.name}: {name} not ready within {timeout:g}s (exited: {exited})\n{self.logs()}"
                time.sleep(0.1)

    def running(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- node {self.name}: {name} (exit {p.poll()})\n{self.log(name)[-tail:]}"
                         for name, p in self.procs.items())

    def stop(self) -> None:
        stop_groups(self.procs.values())
        self.procs.clear()

    # -- talking to the node ------------------------------------------------

    def post(self, headers: dict[str, str], doc: dict) -> tuple[int, dict, dict[str, str]]:
        """POST one JSON event to this node's web on a new connection: (status, JSON body, headers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", "/api/v1/messages", body=json.dumps(doc),
                         headers={**headers, "Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}, {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()


def stop_groups(procs) -> None:
    """SIGTERM to every process's group (gunicorn's workers, Celery's threads go with their parent), then wait;
    SIGKILL what is still there after 15 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def delete_queues(broker_url: str, prefix: str, destinations) -> None:
    """The queues and exchanges a run with queue prefix `prefix` declared (tasks/queues.py)."""
    from kombu import Connection

    with Connection(broker_url) as conn:
        channel = conn.default_channel
        for queue in [f"{prefix}.{kind}.{d}" for kind in ("deliver", "dead") for d in destinations] \
                + [f"{prefix}.housekeeping"]:
            channel.queue_delete(queue)
        for kind in ("deliver", "dead"):
            channel.exchange_delete(f"{prefix}.{kind}")


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def listening(port: int) -> bool:
    """Does something accept TCP connections on 127.0.0.1:`port`?"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
