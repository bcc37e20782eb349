"""What the benchmark runs against: a scratch database, scratch queues, and real OS processes.

Everything here cleans up after itself. `Stack` (an ExitStack) is the one place
that owns what a run created: a database is dropped, queues are deleted and
process groups are killed when the stack closes, on success, failure or Ctrl-C
(`install_signal_handlers` turns SIGTERM into KeyboardInterrupt for that).
Processes start in their own session, so stopping one stops its children too
(gunicorn's workers, celery's pool).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` and exit callback runs; once: from the first
    on, these signals and Ctrl-C are ignored, because a second one (`make` passes its SIGTERM on to its
    child, which got the group's already) would cut the clean-up short and leave servers running."""
    def interrupt(*_):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_command(name: str) -> str:
    """The Procfile's command for process `name`, so the benchmark runs what production runs.

    Without the Procfile's leading `exec` (there so that honcho's signals reach the process, not a shell):
    callers add their own.
    """
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            return command.strip().removeprefix("exec ")
    raise KeyError(f"no {name!r} process in the Procfile")


class Stack(contextlib.ExitStack):
    """Owns a run's scratch resources; closing it releases them in reverse order."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = log_dir
        self.tag = secrets.token_hex(3)

    # -- PostgreSQL ---------------------------------------------------------

    def database(self, purpose: str) -> str:
        """Create a fresh database, dropped when the stack closes; returns its URL."""
        name = f"courier_bench_{purpose}_{self.tag}"
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))

        def drop() -> None:
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                             {"n": name})
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            admin.dispose()

        self.callback(drop)
        return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def postmaster_pid(self) -> int | None:
        """The PID of the PostgreSQL server the benchmark uses, if this machine runs it and we may read its
        postmaster.pid (as root or postgres); None otherwise (then every `postgres` process counts as it)."""
        admin = create_engine(ADMIN_URL)
        try:
            with admin.connect() as conn:
                data_dir = conn.scalar(text("SHOW data_directory"))
            return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, DBAPIError):
            return None
        finally:
            admin.dispose()

    # -- RabbitMQ -----------------------------------------------------------

    def queue_prefix(self, purpose: str, queues: list[str], exchanges: list[str] = ()) -> str:
        """A unique queue-name prefix; `<prefix>.<q>` queues and exchanges are deleted when the stack closes."""
        prefix = f"courier-bench-{purpose}-{self.tag}"

        def delete() -> None:
            with Connection(BROKER_URL) as conn:
                channel = conn.default_channel
                for q in queues:
                    channel.queue_delete(f"{prefix}.{q}")
                for x in exchanges:
                    channel.exchange_delete(f"{prefix}.{x}")

        self.callback(delete)
        return prefix

    # -- processes ----------------------------------------------------------

    def start(self, label: str, command: str, env: dict[str, str]) -> subprocess.Popen:
        """Start a shell command (Procfile syntax, `${PORT:-8000}` included) with its output in <label>.log."""
        log = open(self.log_dir / f"{label}.log", "ab")
        path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        proc = subprocess.Popen(["sh", "-c", f"exec {command}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), **env},
                                start_new_session=True)
        proc.label = label
        self.callback(stop, proc)
        self.callback(log.close)
        return proc

    def log_tail(self, label: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{label}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after `timeout`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def run_cli(args: list[str], env: dict[str, str]) -> str:
    """Run a one-shot command (`courier db upgrade`, ...) and return its output; raise on failure."""
    out = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def wait_http(url: str, proc: subprocess.Popen, stack: Stack, timeout: float = 30.0) -> None:
    """Wait until `url` answers anything at all (the server listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.label} exited:\n{stack.log_tail(proc.label)}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{stack.log_tail(proc.label)}")


def wait_log(stack: Stack, proc: subprocess.Popen, pattern: str, timeout: float = 60.0) -> None:
    """Wait until the process's log matches `pattern` (a celery worker prints "ready.")."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, stack.log_tail(proc.label, 100_000)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.label} not ready:\n{stack.log_tail(proc.label)}")
        time.sleep(0.1)
