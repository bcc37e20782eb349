"""Flower (`courier flower`) against the real RabbitMQ and a real worker: basic auth, workers, queue lengths.

Needs RabbitMQ's management plugin (port 15672) for the queue lengths; skipped without it.
The test (about 15 s) is marked slow: a worker and Flower start as real processes. Flower's
credentials and settings, which need no server: tests/unit/test_flower.py.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from courier.tasks.flower import broker_api_url
from tests.support.services import BROKER_URL
from tests.support.processes import VENV_BIN, running_courier

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

MANAGEMENT_API = os.environ.get("TEST_BROKER_API") or broker_api_url(BROKER_URL)


def _management_up() -> bool:
    url = urlsplit(MANAGEMENT_API)
    try:
        socket.create_connection((url.hostname, url.port), timeout=1).close()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, auth: str | None = None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.mark.slow  # starts a worker and Flower as processes (about 15 s)
@pytest.mark.skipif(not _management_up(), reason=f"RabbitMQ management API not reachable ({MANAGEMENT_API})")
def test_flower_lists_the_worker_and_the_per_destination_queues(tmp_path, store, queue_prefix):
    auth, port = "ops:test-only-password", _free_port()
    with running_courier(tmp_path, store, queue_prefix, {"billing": "http://127.0.0.1:9/", "erp": "http://127.0.0.1:9/"},
                         env={"FLOWER_BASIC_AUTH": auth, "FLOWER_BROKER_API": MANAGEMENT_API}) as c:
        c.procs.start("worker", concurrency=2)
        c.procs.wait_ready()
        flower_log = open(tmp_path / "flower.log", "ab")
        flower = subprocess.Popen([str(VENV_BIN / "courier"), "flower", "--address=127.0.0.1", f"--port={port}"],
                                  env=c.procs.env, stdout=flower_log, stderr=subprocess.STDOUT)
        c.procs.procs["flower"] = flower  # stopped with the others
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        workers = queues = None
        while time.monotonic() < deadline:
            assert flower.poll() is None, c.procs.logs()
            try:
                status, body = _get(f"{base}/api/workers?refresh=1", auth)
            except OSError:  # not listening yet
                time.sleep(0.5)
                continue
            if status == 200 and body:
                workers = body
                status, queues = _get(f"{base}/api/queues/length", auth)
                # The management API reports a new queue's "messages" after its first stats tick (~5 s).
                counted = {q["name"] for q in (queues or {}).get("active_queues", []) if "messages" in q}
                if status == 200 and {f"{queue_prefix}.deliver.{d}" for d in ("billing", "erp")} <= counted:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"Flower did not list the worker and queues: {workers} {queues}\n{c.procs.logs()}")

        assert any(name.startswith(f"worker-{os.getpid()}@") for name in workers), workers
        lengths = {q["name"]: q.get("messages") for q in queues["active_queues"]}
        # Numbers, read from the management API (earlier tests of this run may have left tasks there).
        assert all(isinstance(lengths[f"{queue_prefix}.deliver.{d}"], int) for d in ("billing", "erp")), lengths
        # Without credentials, or with wrong ones, Flower answers 401.
        assert _get(f"{base}/api/workers")[0] == 401
        assert _get(f"{base}/api/queues/length", "ops:wrong")[0] == 401
