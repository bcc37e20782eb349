"""`courier mllp --processes N`: listener processes sharing one port under a supervisor, as real OS processes.

What must hold: every process answers on the port; a killed one is replaced (and too many deaths stop
the command with status 1, never a listener running on with fewer processes); SIGTERM still answers
the frame in hand before exiting 0; no listener outlives a killed supervisor; the connection limits
stay limits of the whole listener (supervisor.SharedCounts).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from courier.app.hl7.supervisor import SharedCounts
from tests.integration.test_mllp_listener import acks, adt, stored, write_mllp_config
from tests.support.mllp_peers import Client
from tests.support.processes import VENV_BIN

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


class Listener:
    """`courier mllp --processes N` on 127.0.0.1:<free port>, its JSON log lines in a file."""

    def __init__(self, tmp_path: Path, store, queue_prefix: str, processes: int, env: dict[str, str]):
        self.port, self.processes = free_port(), processes
        self.seen: set[int] = set()  # every listener process ever started, for the clean-up
        self.log_path = tmp_path / "mllp.log"
        cfg = write_mllp_config(tmp_path / "courier.yml", tmp_path)
        self.env = {**os.environ, "DATABASE_URL": store.url, "COURIER_CONFIG": str(cfg), "MLLP_PORT": str(self.port),
                    "COURIER_QUEUE_PREFIX": queue_prefix, "PYTHONUNBUFFERED": "1", **env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(VENV_BIN / "courier"), "mllp", "--host", "127.0.0.1", "--processes",
                                          str(processes)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT)

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"message": line, "pid": None})
        return out

    def messages(self, pid: int | None = None) -> list[str]:
        return [r["message"] for r in self.lines() if pid is None or r.get("pid") == pid]

    def listening(self) -> set[int]:
        """Pids of the listener processes that have logged 'MLLP listener on' and are alive."""
        pids = {r["pid"] for r in self.lines() if r["message"].startswith("MLLP listener on ")}
        self.seen |= pids
        return pids & children_of(self.proc.pid)

    def wait_listening(self, count: int | None = None) -> set[int]:
        count = count or self.processes
        wait_until(lambda: self.proc.poll() is not None or len(self.listening()) >= count, 30, self.log())
        assert self.proc.poll() is None, self.log()
        return self.listening()

    def served_by(self, client: Client) -> int:
        """The pid of the listener process that took `client`'s connection (from its log line)."""
        where = f"MLLP connection from 127.0.0.1:{client.sock.getsockname()[1]} "
        found: list[int] = []
        wait_until(lambda: found.extend(r["pid"] for r in self.lines() if r["message"].startswith(where)) or found,
                   10, where)
        return found[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.listening()
        for pid in self.seen | children_of(self.proc.pid):  # left over only if a test failed
            if alive(pid) and self.ours(pid):
                os.kill(pid, signal.SIGKILL)

    def ours(self, pid: int) -> bool:
        """Whether `pid` is still one of this listener's processes (not a reused pid of someone else's)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        config = f"COURIER_CONFIG={self.env['COURIER_CONFIG']}".encode()
        return f"MLLP_PORT={self.port}".encode() in environ and config in environ


@pytest.fixture
def start_listener(tmp_path, store, queue_prefix):
    started = []

    def start(processes: int = 2, **env: str) -> Listener:
        listener = Listener(tmp_path, store, queue_prefix, processes, env)
        started.append(listener)
        listener.wait_listening()
        return listener

    yield start
    for listener in started:
        listener.stop()


def exchange_on_new_connections(port: int, prefix: str, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        with Client(port) as client:
            out.append(acks(client.exchange(adt(f"{prefix}-{i}")))[0][:2])
    return out


def test_every_process_answers_on_the_one_port(start_listener, store):
    listener = start_listener(processes=2)
    pids = listener.wait_listening()
    assert len(pids) == 2
    served = set()
    for i in range(30):  # Linux picks the process by a hash of the connection: 30 cannot all miss one of 2
        with Client(listener.port) as client:
            assert acks(client.exchange(adt(f"BOTH-{i}")))[0][:2] == ("AA", f"BOTH-{i}")
            served.add(listener.served_by(client))
    assert served == pids
    assert len(stored(store)) == 30


def test_a_killed_process_is_replaced_and_the_port_keeps_answering(start_listener, store):
    listener = start_listener(processes=2)
    first, second = sorted(listener.wait_listening())
    with Client(listener.port) as kept:
        assert acks(kept.exchange(adt("BEFORE")))[0][0] == "AA"
        victim = listener.served_by(kept)
        os.kill(victim, signal.SIGKILL)
        assert kept.closed_by_server()  # its connection went with it: the sender reconnects and resends
    wait_until(lambda: len(listener.listening()) == 2 and victim not in listener.listening(), 30, listener.log())
    assert listener.proc.poll() is None
    assert any("was killed by SIGKILL" in m for m in listener.messages(listener.proc.pid))
    assert exchange_on_new_connections(listener.port, "AFTER", 20) == [("AA", f"AFTER-{i}") for i in range(20)]
    assert len(stored(store)) == 21


def test_processes_dying_over_and_over_stop_the_whole_listener_with_status_1(start_listener):
    listener = start_listener(processes=2)
    for _ in range(6):  # supervisor.RESTARTS (5) deaths within a minute are tolerated, the 6th is not
        if listener.proc.poll() is not None:
            break
        pids = listener.wait_listening()
        os.kill(min(pids), signal.SIGKILL)
        wait_until(lambda: min(pids) not in children_of(listener.proc.pid), 10)
    assert listener.proc.wait(timeout=30) == 1, listener.log()
    assert not children_of(listener.proc.pid)
    assert any("stopping all (exit 1)" in m for m in listener.messages(listener.proc.pid))


def test_sigterm_answers_the_frame_in_hand_in_every_process_then_exits_0(start_listener, store, pg_url):
    """A frame waits on a row lock when SIGTERM comes; its process finishes it (AA) before it exits."""
    from sqlalchemy import create_engine

    listener = start_listener(processes=2)
    holder_engine = create_engine(pg_url)
    holder = holder_engine.connect()
    blocking = holder.begin()
    holder.execute(text("INSERT INTO courier_messages (id, source, type, content_type, body, size, dedup_key, "
                        "correlation_id, status, received_at) VALUES ('held-row', 'lab', 'x', 'x', '', 0, "
                        "'HELD', 'c', 'accepted', now())"))
    try:
        with Client(listener.port, timeout=30) as waiting, Client(listener.port) as idle:
            assert acks(idle.exchange(adt("IDLE")))[0][0] == "AA"
            waiting.send(adt("HELD"))
            time.sleep(0.5)  # the frame is in hand, waiting for the lock
            listener.proc.send_signal(signal.SIGTERM)
            assert idle.closed_by_server()
            threading.Timer(1.0, blocking.rollback).start()
            assert acks(waiting.read_frame())[0][:2] == ("AA", "HELD")
        assert listener.proc.wait(timeout=30) == 0, listener.log()
    finally:
        holder.close()
        holder_engine.dispose()
    assert sum(m.startswith("MLLP listener stopped") for m in listener.messages()) == 2
    assert sorted(m.dedup_key for m in stored(store)) == ["HELD", "IDLE"]


def test_no_process_outlives_a_killed_supervisor(start_listener):
    listener = start_listener(processes=2)
    pids = listener.wait_listening()
    listener.proc.send_signal(signal.SIGKILL)
    listener.proc.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in pids), 30, "listener processes still alive")
    with socket.socket() as again:  # the port is free for the supervisor's successor
        again.bind(("127.0.0.1", listener.port))


def test_connection_limits_count_every_process(start_listener):
    listener = start_listener(processes=2, COURIER_MLLP_MAX_PER_PEER="2")
    with Client(listener.port) as one, Client(listener.port) as two:
        assert acks(one.exchange(adt("LIMIT-1")))[0][0] == "AA"
        assert acks(two.exchange(adt("LIMIT-2")))[0][0] == "AA"
        for _ in range(4):  # whichever process takes it, the address has its 2 already
            with Client(listener.port) as extra:
                assert extra.closed_by_server()
    assert any("already 2 connections from this address" in m for m in listener.messages())


def test_a_second_listener_on_the_port_refuses_to_start(start_listener, tmp_path, store, queue_prefix):
    listener = start_listener(processes=2)
    second = subprocess.run([str(VENV_BIN / "courier"), "mllp", "--host", "127.0.0.1", "--processes", "2"],
                            env=listener.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "cannot listen on 127.0.0.1" in second.stderr, second.stderr


# --- SharedCounts across fork, without listeners --------------------------------------------------

def test_shared_counts_see_every_process_and_forget_a_dead_ones():
    counts = SharedCounts(rows=2, max_connections=10)
    pid = os.fork()
    if pid == 0:  # another listener process: two connections from 10.0.0.1, one from 10.0.0.2
        counts.use_row(1)
        ok = all(counts.admit(a, 10, 2) is None for a in ("10.0.0.1", "10.0.0.1", "10.0.0.2"))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    counts.use_row(0)
    assert counts.admit("10.0.0.1", 10, 2) == "already 2 connections from this address (COURIER_MLLP_MAX_PER_PEER)"
    assert counts.admit("::ffff:10.0.0.1", 10, 2) is not None  # the same peer on a dual-stack socket
    assert counts.admit("10.0.0.2", 3, 5) == "already 3 connections (COURIER_MLLP_MAX_CONNECTIONS)"
    assert counts.admit("10.0.0.2", 10, 2) is None
    counts.clear_row(1)  # that process died: its connections are gone with it
    assert counts.admit("10.0.0.1", 10, 2) is None
    counts.release("10.0.0.1")
    counts.release("10.0.0.2")
    assert counts.counts() == {}
