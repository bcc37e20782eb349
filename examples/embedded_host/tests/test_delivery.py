"""A committed stock issue reaches the ERP: by Courier's delivery threads in this process (small installs),
and by the host's own Celery worker (`celery -A tasks worker`) fed by `flask --app app courier relay`."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kombu import Connection

from app import courier
from conftest import BIN, BROKER_URL, HOST_DIR, host_env, scalar, wait_statuses


def issue(client, quantity: int):
    r = client.post("/stock/gauze-10/issues", json={"quantity": quantity, "ward": "4B"})
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.get_json()["issue_id"]


def test_embedded_delivery_threads_deliver_once(host, erp):
    issue_id = issue(host.test_client(), 3)
    assert erp.received == []  # emit sent nothing: the commit only made it due
    with host.app_context():
        delivery = courier.start_embedded(threads=2)
    try:
        [event] = erp.wait_for(1)
        wait_statuses(host, ["delivered"])
    finally:
        delivery.stop()
    assert event["type"] == "supply.consumed" and event["id"] == f"stock-issue-{issue_id}"
    assert event["data"]["issue_id"] == issue_id and event["data"]["quantity"] == 3
    assert len(erp.received) == 1
    assert scalar(host, "SELECT count(*) FROM courier_attempts") == 1


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=HOST_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_the_hosts_celery_worker_delivers(host, erp, queue_prefix, tmp_path):
    """No PYTHONPATH: `flask --app app` and `celery -A tasks` find the host's packages from this folder."""
    env = host_env(host.config["DATABASE_URL"], ERP_URL=erp.url, FLASK_COURIER_BROKER_URL=BROKER_URL,
                   FLASK_COURIER_QUEUE_PREFIX=queue_prefix)
    procs = [start([str(BIN / "flask"), "--app", "app", "courier", "relay"], env, tmp_path / "relay.log"),
             start([str(BIN / "celery"), "-A", "tasks", "worker", "--pool", "threads", "--concurrency", "2",
                    "--without-mingle", "--without-gossip", "-n", f"supplyroom-{os.getpid()}@%h"],
                   env, tmp_path / "worker.log")]
    try:
        issue_id = issue(host.test_client(), 5)
        [event] = erp.wait_for(1, timeout=60)
        wait_statuses(host, ["delivered"])
    except BaseException:
        print("\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("*.log")))
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        with Connection(BROKER_URL) as conn:
            channel = conn.default_channel
            for kind in ("deliver", "dead"):
                channel.queue_delete(f"{queue_prefix}.{kind}.erp")
                channel.exchange_delete(f"{queue_prefix}.{kind}")
    assert event["id"] == f"stock-issue-{issue_id}" and len(erp.received) == 1
    assert [p.returncode for p in procs] == [0, 0], "relay and worker stop cleanly on SIGTERM"
