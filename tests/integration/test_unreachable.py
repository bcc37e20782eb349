"""Issue 16, item 1: RabbitMQ or PostgreSQL down never takes the stack down.

The Procfile's processes run for real (the venv's binaries, examples/courier.yml) against a broker or
database address that refuses connections: a TCP forwarder of this test's, bound but not listening, in
front of the machine's RabbitMQ or PostgreSQL (which are never touched). After several retry periods
each process must still run, have said so in exactly one line (no traceback), and once the forwarder
listens it must resume by itself: the relay publishes, the worker delivers, mllp answers AA, beat sends
its task, `courier db upgrade` migrates and exits 0, and the web answers /readyz 200.
"""
from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from alembic import command
from sqlalchemy.engine import make_url

from courier.app.store.schema import alembic_config
from tests.support.services import BROKER_URL, fresh_database
from tests.support.mllp_peers import Client
from tests.support.nodes import delete_queues, stop_groups
from tests.support.processes import VENV_BIN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ADT = (b"MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20240101120000||ADT^A01|{id}|P|2.5\r"
       b"PID|1||12345^^^HOSP^MR||DOE^JANE\r")
DOWN_FOR = 9.0  # seconds the service stays unreachable: several retry periods of every process
RABBITMQ_LINE = "RabbitMQ at 127.0.0.1:{port} is not reachable (connection refused); start it with " \
                "`rabbitmq-server -detached`; retrying every "
POSTGRES_LINE = "PostgreSQL at 127.0.0.1:{port}/{db} is not reachable (connection refused); start it with " \
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`; retrying every "


class Forwarder:
    """127.0.0.1:<port> forwarded to 127.0.0.1:<target>. Bound but not listening until start(), so until
    then a connection is refused exactly as by a service that is not running."""

    def __init__(self, target: int):
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closing = False
        self._open: list[socket.socket] = []

    def start(self) -> None:
        self.sock.listen(128)
        threading.Thread(target=self._accept, daemon=True, name="forwarder").start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.sock.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                continue
            upstream.settimeout(None)
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(): a closed fd alone keeps the port listening
        except OSError:
            pass
        self.sock.close()
        for s in self._open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The Procfile's processes, each in its own process group, logging to <tmp>/<name>.log."""

    def __init__(self, tmp_path: Path, database_url: str, broker_url: str, **env: str):
        self.tmp_path = tmp_path
        self.port, self.mllp_port = free_port(), free_port()
        self.prefix = f"courier-unreachable-{secrets.token_hex(4)}"
        (tmp_path / "metrics").mkdir()
        (tmp_path / "drop" / "erp").mkdir(parents=True)  # the file drop delivers into a directory that exists
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("COURIER_")},
                    "DATABASE_URL": database_url, "BROKER_URL": broker_url,
                    "COURIER_CONFIG": "examples/courier.yml", "COURIER_QUEUE_PREFIX": self.prefix,
                    "COURIER_DROP_DIR": str(tmp_path / "drop"), "PORT": str(self.port),
                    "MLLP_PORT": str(self.mllp_port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
                    "PYTHONUNBUFFERED": "1", **env}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        bin_ = str(VENV_BIN)
        argv = {
            "release": [f"{bin_}/courier", "db", "upgrade"],
            "web": [f"{bin_}/gunicorn", "-c", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}",
                    "--workers", "2", "--threads", "4", "courier.app:create_app()"],
            "worker": [f"{bin_}/celery", "-A", "courier.tasks.worker", "worker", "--pool", "threads", "--concurrency", "8",
                       "--loglevel", "INFO", "-n", f"{self.prefix}@%h"],
            "relay": [f"{bin_}/courier", "relay"],
            "beat": [f"{bin_}/celery", "-A", "courier.tasks.worker", "beat", "--loglevel", "INFO", "--schedule",
                     str(self.tmp_path / "celerybeat-schedule")],
            "mllp": [f"{bin_}/courier", "mllp", "--host", "127.0.0.1"],
        }[name]
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name} (exit {p.poll()})\n{self.log(name)[-4000:]}" for name, p in self.procs.items())

    def wait_for(self, predicate, what: str, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what} within {timeout:g}s\n{self.logs()}"
            time.sleep(0.2)

    def assert_said_once(self, name: str, line: str) -> None:
        """`name` runs, printed `line` exactly once (the outage's line, not one per retry), and no traceback."""
        log = self.log(name)
        assert self.procs[name].poll() is None, f"{name} exited\n{self.logs()}"
        assert log.count(line) == 1, f"{name}: {log.count(line)} times {line!r}\n{self.logs()}"
        assert "Traceback" not in log, f"{name} printed a traceback\n{self.logs()}"

    def stop(self) -> None:
        stop_groups(list(self.procs.values()))

    def delete_queues(self) -> None:
        delete_queues(BROKER_URL, self.prefix, ("billing", "erp"))


@contextmanager
def stack(tmp_path: Path, database_url: str, broker_url: str, **env: str):
    s = Stack(tmp_path, database_url, broker_url, **env)
    try:
        yield s
    finally:
        s.stop()
        s.delete_queues()


def http_get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def answers(port: int) -> bool:
    try:
        return http_get(port, "/healthz")[0] == 200
    except OSError:
        return False


def mllp_ack(port: int, control_id: str) -> str:
    """The MSA-1 code the listener answers one ADT^A01 with."""
    with Client(port, timeout=40) as client:
        answer = client.exchange(ADT.replace(b"{id}", control_id.encode())).decode()
    msa = next(seg for seg in answer.split("\r") if seg.startswith("MSA|"))
    return msa.split("|")[1]


def delivered_files(tmp_path: Path) -> list[Path]:
    """What the erp destination (a file drop in examples/courier.yml) got; not its half-written temporaries."""
    drop = tmp_path / "drop" / "erp"
    return sorted(p for p in drop.glob("*") if not p.name.startswith(".")) if drop.exists() else []


def test_rabbitmq_down_every_process_says_so_once_keeps_running_and_resumes(tmp_path, store):
    real = urlsplit(BROKER_URL)
    broker = Forwarder(real.port or 5672)
    broker_url = real._replace(netloc=f"{real.username}:{real.password}@127.0.0.1:{broker.port}").geturl()
    line = RABBITMQ_LINE.format(port=broker.port)
    try:
        with stack(tmp_path, store.url, broker_url, COURIER_RETENTION="3650d", COURIER_RETENTION_INTERVAL="1s") as s:
            for name in ("worker", "relay", "beat", "mllp", "web"):
                s.start(name)
            started = time.monotonic()
            s.wait_for(lambda: answers(s.port), "web answers /healthz with the broker down")
            status, body = http_get(s.port, "/readyz")
            assert status == 503 and body["checks"]["broker"].startswith("unreachable"), body
            s.wait_for(lambda: b"MLLP listener on" in (tmp_path / "mllp.log").read_bytes(), "mllp listens")
            control_id = f"UNR-MQ-{secrets.token_hex(3)}"
            assert mllp_ack(s.mllp_port, control_id) == "AA"  # the store is up: stored, for the relay to send
            time.sleep(max(0.0, started + DOWN_FOR - time.monotonic()))
            for name in ("worker", "relay", "beat"):
                s.assert_said_once(name, line)
            for name in ("mllp", "web"):  # they need no broker to run
                assert s.procs[name].poll() is None and "Traceback" not in s.log(name), s.logs()
            assert not delivered_files(tmp_path)
            assert f":{real.password}@" not in "".join(s.log(n) for n in s.procs), "the broker's password was logged"

            broker.start()  # RabbitMQ "comes back"
            s.wait_for(lambda: delivered_files(tmp_path), "the relay publishes and the worker delivers", 60)
            assert control_id.encode() in delivered_files(tmp_path)[0].read_bytes()
            for name in ("relay", "worker", "beat"):
                s.wait_for(lambda: "RabbitMQ at 127.0.0.1:%d is reachable again" % broker.port in s.log(name),
                           f"{name} says the broker is back")
            s.wait_for(lambda: "Sending due task courier-retention" in s.log("beat") and "courier.purge" in
                       s.log("worker"), "beat sends its task and the worker runs it")
            s.wait_for(lambda: " ready." in s.log("worker"), "the worker says ready")  # may follow the first delivery
            assert http_get(s.port, "/readyz")[0] == 200
            for name in ("worker", "relay", "beat"):
                s.assert_said_once(name, line)  # and nothing more about it after
    finally:
        broker.close()


@pytest.fixture
def migrated_database():
    """A throwaway database at head: the processes run against it through a forwarder."""
    with fresh_database("courier_unreach") as url:
        command.upgrade(alembic_config(url), "head")
        yield url


def test_postgresql_down_every_process_says_so_once_keeps_running_and_resumes(tmp_path, migrated_database):
    database = Forwarder(make_url(migrated_database).port or 5432)
    name = make_url(migrated_database).database
    url = make_url(migrated_database).set(port=database.port).render_as_string(hide_password=False)
    line = POSTGRES_LINE.format(port=database.port, db=name)
    try:
        with stack(tmp_path, url, BROKER_URL) as s:
            for process in ("release", "worker", "relay", "mllp", "web"):
                s.start(process)
            started = time.monotonic()
            s.wait_for(lambda: answers(s.port), "web answers /healthz with the database down")
            status, body = http_get(s.port, "/readyz")
            assert status == 503 and body["checks"]["store"].startswith("unreachable"), body
            s.wait_for(lambda: b"MLLP listener on" in (tmp_path / "mllp.log").read_bytes(), "mllp listens")
            assert mllp_ack(s.mllp_port, "UNR-DB-0") == "AE"  # nothing stored: the sender sends again
            s.wait_for(lambda: " ready." in s.log("worker"), "the worker consumes with the database down")
            time.sleep(max(0.0, started + DOWN_FOR - time.monotonic()))
            assert mllp_ack(s.mllp_port, "UNR-DB-1") == "AE"
            for process in ("release", "worker", "relay", "mllp"):
                s.assert_said_once(process, line)
            assert s.procs["web"].poll() is None and "Traceback" not in s.log("web"), s.logs()

            database.start()  # PostgreSQL "comes back"
            s.wait_for(lambda: s.procs["release"].poll() is not None, "db upgrade finishes")
            assert s.procs["release"].returncode == 0, s.logs()
            assert "database at head" in s.log("release")
            assert mllp_ack(s.mllp_port, "UNR-DB-2") == "AA"
            s.wait_for(lambda: delivered_files(tmp_path), "the relay claims and the worker delivers", 60)
            assert b"UNR-DB-2" in delivered_files(tmp_path)[0].read_bytes()
            back = f"PostgreSQL at 127.0.0.1:{database.port}/{name} is reachable again"
            for process in ("release", "worker", "relay", "mllp"):
                s.wait_for(lambda: back in s.log(process), f"{process} says the database is back")
            assert http_get(s.port, "/readyz")[0] == 200
            for process in ("worker", "relay", "mllp"):
                s.assert_said_once(process, line)
            assert s.log("release").count(line) == 1 and "Traceback" not in s.log("release")
    finally:
        database.close()


def upgrade(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COURIER_")}, "DATABASE_URL": url}
    return subprocess.run([str(VENV_BIN / "courier"), "db", "upgrade", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_db_upgrade_wait_0_and_unfixable_errors_fail_at_once_with_one_clear_line(closed_port):
    t0 = time.monotonic()
    down = upgrade(f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{closed_port}/test", "--wait", "0")
    assert down.returncode == 1, down.stderr
    assert f"PostgreSQL at 127.0.0.1:{closed_port}/test is not reachable (connection refused); start it with" \
           in down.stderr
    assert "retrying" not in down.stderr and "hunter2" not in down.stderr + down.stdout

    waited = upgrade(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/test", "--wait", "3s")
    assert waited.returncode == 1 and "not reachable after 3s" in waited.stderr, waited.stderr
    assert waited.stderr.count("is not reachable (connection refused)") == 1, waited.stderr  # the waiting line

    # Waiting cannot fix these: no --wait, and still an immediate, one-line failure.
    no_role = upgrade(make_url(f"postgresql+psycopg://nobody_{secrets.token_hex(3)}@127.0.0.1:5432/test")
                      .render_as_string(hide_password=False))
    assert no_role.returncode == 1 and "does not exist; check DATABASE_URL" in no_role.stderr, no_role.stderr
    bad_url = upgrade("postgresql://u:hunter2@127.0.0.1:notaport/test")
    assert bad_url.returncode == 1 and "DATABASE_URL is not usable" in bad_url.stderr, bad_url.stderr
    assert time.monotonic() - t0 < 25
    for result in (down, waited, no_role, bad_url):
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
