"""The Procfile's web process spreads its clients over both gunicorn workers (deploy/gunicorn.conf.py).

Stock gthread lets one worker accept every client that connects at once, so a burst of keep-alive
clients ran on one core. Courier's worker accepts only while one of its threads is free.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.integration.test_metrics import web_and_mllp
from tests.support.processes import running_courier

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

THREADS = 4  # the Procfile's --threads
WORKERS = 2  # the Procfile's --workers


def _server_inodes(ports: set[int]) -> dict[int, int]:
    """{client port: inode of the server's socket} for loopback connections from `ports` (/proc/net/tcp)."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port, inode = int(fields[2].split(":")[1], 16), int(fields[9])
        if remote_port in ports and inode:
            found[remote_port] = inode
    return found


def _holders(inodes: set[int], pids: list[int]) -> dict[int, int]:
    """{pid: how many of `inodes` it has open}."""
    counts = {}
    for pid in pids:
        links = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        counts[pid] = sum(f"socket:[{inode}]" in links for inode in inodes)
    return counts


def _workers(master: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(master)]


def test_clients_that_connect_together_are_shared_by_both_workers(store, queue_prefix, tmp_path):
    with running_courier(tmp_path, store, queue_prefix, {"billing": "http://127.0.0.1:9/hook"}) as courier, \
            web_and_mllp(courier, tmp_path) as (port, _mllp_port):
        master = int(next(line.split('"pid": ')[1].split(",")[0] for line in (tmp_path / "web.log").read_text()
                          .splitlines() if "Listening at" in line))
        # Each client sends a request whose body never completes: the thread serving it waits for the rest.
        head = (f"POST /api/v1/messages HTTP/1.1\r\nHost: courier\r\nAuthorization: {courier.headers['Authorization']}"
                "\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{").encode()
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(THREADS * WORKERS)]
        try:
            for client in clients:
                client.sendall(head)
            ports = {c.getsockname()[1] for c in clients}
            deadline = time.monotonic() + 30
            while True:  # until every connection is held by a worker (accepted), then who holds which
                held = _holders(set(_server_inodes(ports).values()), _workers(master))
                if sum(held.values()) == len(clients) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert sorted(held.values()) == [THREADS] * WORKERS, held
            for client in clients:  # the bodies' end: each request is answered (a JSON error: "{}" is no event)
                client.sendall(b"}")
            for client in clients:
                assert client.recv(64).startswith(b"HTTP/1.1 4")
        finally:
            for client in clients:
                client.close()
