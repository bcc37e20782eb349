"""Issue 21, failover URLs on the machine's own servers: a list whose first entry refuses connections (a port
bound but not listening) and whose next is the real RabbitMQ or PostgreSQL must work in every process, and no
process may call that an outage.

- BROKER_URL `amqp://...:<closed>//;amqp://...:<closed>//;amqp://...:5672//`: the relay and a worker (real
  processes) deliver; /readyz answers 200 with one closed node first; the worker names each node it skipped
  in one WARNING line and logs no outage.
- DATABASE_URL with two hosts, the first closed, target_session_attrs=read-write, in libpq's URI and in
  SQLAlchemy's `?host=` form: `courier db upgrade` migrates, ingest stores, the relay is woken by NOTIFY on its
  LISTEN connection (its fallback poll is 60 s, so only NOTIFY can deliver in time) and the worker delivers.
- Both lists at once for every Procfile process (release, web under gunicorn, mllp, relay, worker, beat): an
  MLLP message is delivered, /readyz is 200, beat sends its task; no outage line, no traceback.

The checks and outage lines that need no server: tests/unit/test_failover_urls.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from courier.app import create_app
from courier.app.config import load_routing, load_settings
from courier.app.store.db import Store
from tests.support.config import write_config
from tests.support.processes import VENV_BIN, running_courier
from tests.support.services import BROKER_URL, fresh_database

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _closed_broker(port: int) -> str:
    parts = make_url(BROKER_URL.replace("amqp://", "postgresql://", 1))  # user, password of the real broker
    return f"amqp://{parts.username}:{parts.password}@127.0.0.1:{port}//"


def _post(client, headers, message_id: str) -> None:
    r = client.post("/api/v1/messages", headers=headers, content_type="application/json",
                    data=json.dumps({"type": "service.completed", "id": message_id, "data": {"n": 1}}))
    assert r.status_code == 202, r.get_json()


def _wait_files(folder: Path, count: int, courier, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(list(folder.glob("*"))) >= count:
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"{len(list(folder.glob('*')))} of {count} delivered after {timeout}s\n{courier.procs.logs()}")


def test_broker_list_with_first_nodes_down_relay_worker_and_readyz_work(tmp_path, store, queue_prefix, closed_port):
    other = socket.socket()
    other.bind(("127.0.0.1", 0))  # a second port that refuses connections
    second = other.getsockname()[1]
    # relay, worker and /readyz: two nodes down, then the real one
    brokers = f"{_closed_broker(closed_port)};{_closed_broker(second)};{BROKER_URL}"
    drop = tmp_path / "erp"
    drop.mkdir()
    with running_courier(tmp_path, store, queue_prefix, {"erp": f"file://{drop}"},
                         env={"BROKER_URL": brokers}) as courier:
        courier.procs.start("relay")
        courier.procs.start("worker", concurrency=2)
        courier.procs.wait_ready("worker")
        for i in range(3):
            _post(courier.client, courier.headers, f"broker-list-{i}")
        _wait_files(drop, 3, courier, timeout=60)

        # /readyz of a web process with the same BROKER_URL
        settings = load_settings(env={}, config_path=str(courier.config), routing=load_routing(courier.config, {}),
                                 database_url=store.url, broker_url=brokers, queue_prefix=queue_prefix)
        web = create_app(settings)
        try:
            r = web.test_client().get("/readyz")
            assert r.status_code == 200, r.get_json()
            assert r.get_json()["checks"]["broker"] == "ok"
        finally:
            web.extensions["courier.store"].dispose()
        logs = courier.procs.logs()
    # The node that was skipped is named (one WARNING line), but the list as a whole was never unreachable.
    assert f"RabbitMQ at 127.0.0.1:{closed_port} is not reachable (connection refused); trying the next broker " \
           "of BROKER_URL" in logs
    assert f"RabbitMQ at 127.0.0.1:{second} is not reachable (connection refused); trying the next broker" in logs
    assert f"RabbitMQ at 127.0.0.1:{closed_port},127.0.0.1:{second},127.0.0.1:5672 is not reachable" not in logs
    assert "Traceback" not in logs
    other.close()


def test_readyz_with_every_broker_of_the_list_down_is_503(tmp_path, store, queue_prefix, closed_port):
    """The control of the test above: the same list with the real broker left out is not ready."""
    cfg = write_config(tmp_path / "courier.yml", {"erp": f"file://{tmp_path}"})
    brokers = f"{_closed_broker(closed_port)};{_closed_broker(closed_port)}"
    settings = load_settings(env={}, config_path=str(cfg), routing=load_routing(cfg, {}), database_url=store.url,
                             broker_url=brokers, queue_prefix=queue_prefix)
    web = create_app(settings)
    try:
        r = web.test_client().get("/readyz")
    finally:
        web.extensions["courier.store"].dispose()
    assert r.status_code == 503
    assert r.get_json()["checks"]["broker"].startswith("unreachable")


def _multi_host_urls(single: str, closed_port: int) -> dict[str, str]:
    """The database at `single` behind a first host that refuses connections, in both accepted spellings."""
    url = make_url(single)
    user = url.username + (f":{url.password}" if url.password else "")
    real = f"{url.host}:{url.port or 5432}"
    return {
        "libpq": f"postgresql://{user}@127.0.0.1:{closed_port},{real}/{url.database}"
                 "?target_session_attrs=read-write",
        "sqlalchemy": f"postgresql+psycopg://{user}@/{url.database}?host=127.0.0.1:{closed_port}&host={real}"
                      "&target_session_attrs=read-write",
    }


def _courier(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "courier"), *args], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("form", ["libpq", "sqlalchemy"])
def test_database_hosts_first_down_upgrade_ingest_listen_relay_worker_deliver(tmp_path, queue_prefix, closed_port,
                                                                               form):
    with fresh_database("courier_failover") as single:
        url = _multi_host_urls(single, closed_port)[form]
        upgraded = _courier("db", "upgrade", "--wait", "0", env={"DATABASE_URL": url})
        assert upgraded.returncode == 0, upgraded.stderr
        assert "database at head" in upgraded.stdout
        store = Store(url)
        drop = tmp_path / "erp"
        drop.mkdir()
        try:
            with running_courier(tmp_path, store, queue_prefix, {"erp": f"file://{drop}"},
                                 env={"DATABASE_URL": url, "COURIER_RELAY_POLL": "60s"}) as courier:
                courier.procs.start("relay")
                courier.procs.start("worker", concurrency=2)
                courier.procs.wait_ready("worker")
                time.sleep(2)  # the relay's first round is over: it sleeps on LISTEN (or on its 60 s poll)
                _post(courier.client, courier.headers, f"db-list-{form}")
                _wait_files(drop, 1, courier, timeout=20)  # well under the poll: NOTIFY woke the relay
                logs = courier.procs.logs()
        finally:
            store.dispose()
    assert "cannot LISTEN" not in logs and "LISTEN connection lost" not in logs, logs
    assert "PostgreSQL at" not in logs, logs  # no outage: the first host refusing is not one
    assert "Traceback" not in logs, logs


def test_every_procfile_process_runs_on_both_lists_with_their_first_hosts_down(tmp_path, closed_port):
    """release, web (gunicorn), mllp, relay, worker and beat, each given BROKER_URL and DATABASE_URL lists whose
    first entry refuses connections: the release migrates, mllp answers AA, the file drop gets the message,
    /readyz is 200, beat sends its task and the worker runs it; no outage line and no traceback anywhere."""
    from tests.integration.test_unreachable import delivered_files, mllp_ack, stack

    with fresh_database("courier_failover_stack") as single:
        database = _multi_host_urls(single, closed_port)["libpq"]
        brokers = f"{_closed_broker(closed_port)};{BROKER_URL}"
        with stack(tmp_path, database, brokers, COURIER_RETENTION="3650d", COURIER_RETENTION_INTERVAL="1s") as s:
            s.start("release")
            s.wait_for(lambda: s.procs["release"].poll() is not None, "db upgrade finishes", 60)
            assert s.procs["release"].returncode == 0 and "database at head" in s.log("release"), s.logs()
            for name in ("worker", "relay", "beat", "mllp", "web"):
                s.start(name)
            s.wait_for(lambda: b"MLLP listener on" in (tmp_path / "mllp.log").read_bytes(), "mllp listens", 60)
            assert mllp_ack(s.mllp_port, "FAILOVER-1") == "AA"
            s.wait_for(lambda: delivered_files(tmp_path), "the relay publishes and the worker delivers", 60)
            assert b"FAILOVER-1" in delivered_files(tmp_path)[0].read_bytes()
            s.wait_for(lambda: "Sending due task courier-retention" in s.log("beat") and "courier.purge" in
                       s.log("worker"), "beat sends its task and the worker runs it", 60)
            s.wait_for(lambda: _ready(s.port), "/readyz answers 200", 30)
            for name in ("worker", "relay", "beat", "mllp", "web"):
                assert s.procs[name].poll() is None, f"{name} exited\n{s.logs()}"
            logs = s.logs()
    outages = [line for line in logs.splitlines()
               if "is not reachable" in line and "trying the next broker of BROKER_URL" not in line]
    assert not outages, logs
    assert "Traceback" not in logs and "cannot LISTEN" not in logs, logs
    assert f"RabbitMQ at 127.0.0.1:{closed_port} is not reachable (connection refused); trying the next broker" \
           in s.log("beat"), s.log("beat")


def _ready(port: int) -> bool:
    from tests.integration.test_unreachable import http_get

    try:
        return http_get(port, "/readyz")[0] == 200
    except OSError:
        return False
