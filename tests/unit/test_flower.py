"""Flower (`courier flower`) against the real RabbitMQ and a real worker: basic auth, workers, queue lengths.

Needs RabbitMQ's management plugin (port 15672) for the queue lengths; skipped without it.
The end-to-end test (about 15 s) is marked slow: a worker and Flower start as real processes.
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

import click
import pytest

from courier.tasks.flower import basic_auth, broker_api_url, check_basic_auth
from tests.support.services import BROKER_URL
from tests.support.processes import VENV_BIN, running_courier

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


def test_the_management_api_url_comes_from_the_broker_url():
    assert broker_api_url("amqp://courier:s3cr%2Ft@rabbitmq:5672//") == "http://courier:s3cr%2Ft@rabbitmq:15672/api/"
    assert broker_api_url("amqps://u:p@mq.example:5671/vh") == "https://u:p@mq.example:15671/api/"


@pytest.mark.parametrize("value", [None, "", "admin", "admin:", ":pw", "a:b,c"])
def test_flower_refuses_missing_or_malformed_basic_auth(value):
    with pytest.raises(click.UsageError):
        check_basic_auth(value)
    check_basic_auth("admin:pw,ops:other")


def test_a_generated_credential_is_made_once_private_and_kept(tmp_path):
    env = {"FLOWER_AUTH_FILE": str(tmp_path / "instance" / "flower-auth")}
    value, generated = basic_auth(env)
    assert generated and value.startswith("courier:") and len(value.partition(":")[2]) >= 22  # 128 bits
    assert (tmp_path / "instance" / "flower-auth").stat().st_mode & 0o777 == 0o600
    assert basic_auth(env) == (value, True)  # the next start uses the same one
    assert basic_auth({"FLOWER_AUTH_FILE": str(tmp_path / "other")})[0] != value


def test_an_explicit_flower_basic_auth_wins_over_the_file(tmp_path):
    env = {"FLOWER_BASIC_AUTH": "ops:chosen", "FLOWER_AUTH_FILE": str(tmp_path / "flower-auth")}
    assert basic_auth(env) == ("ops:chosen", False)
    assert not (tmp_path / "flower-auth").exists()


def test_a_damaged_credential_file_is_refused_with_the_rule(tmp_path):
    (tmp_path / "flower-auth").write_text("no-colon-here\n")
    with pytest.raises(click.UsageError, match="user:password"):
        basic_auth({"FLOWER_AUTH_FILE": str(tmp_path / "flower-auth")})


def test_courier_flower_will_not_start_without_basic_auth():
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH_FILE")}
    result = subprocess.run([str(VENV_BIN / "courier"), "flower"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr and "no default password" in result.stderr


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
