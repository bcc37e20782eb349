"""`courier routes test` against real servers and processes (the in-process runs are in
tests/unit/test_routes_cli.py): a dry run through the real console script touches neither the
PostgreSQL store nor the broker nor a destination, and examples/hospital_sinks.py, run as a user
runs it, takes each destination's payload.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from courier import adapters
from courier.app.store.models import Delivery, Message
from courier.app.config import load_routing
from tests.unit.test_routes_cli import ADT_A01, DFT_P03, EVENTS, HOSPITAL, KEY, REPO, UNREACHABLE, dry_run


# --- what a dry run does not do ------------------------------------------------------------

@pytest.mark.postgres
def test_dry_run_stores_nothing_and_sends_nothing(store, tmp_path):
    """The real console script with the run's PostgreSQL store, a broker that is not there, and
    every destination pointed at places that would show a send: nothing appears anywhere."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = str(listener.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "FLASK_"))}
    env.update(DATABASE_URL=store.url, BROKER_URL=UNREACHABLE["BROKER_URL"], COURIER_CONFIG=str(HOSPITAL),
               COURIER_PSEUDONYM_KEY=KEY, COURIER_HOSPITAL_DIR=str(tmp_path / "hospital"),
               BILLING_PORT=port, LEGACY_ADT_PORT=port)
    exe = Path(sys.executable).with_name("courier")
    for source, path in [("clinical", EVENTS / "service.completed-ecg.json"),
                         ("clinical", EVENTS / "supply.consumed-gauze.json"),
                         ("interface-engine", DFT_P03[0]), ("interface-engine", ADT_A01[0])]:
        result = subprocess.run([str(exe), "routes", "test", "--source", source, str(path)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "dry run: nothing stored or sent" in result.stdout
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
    assert not (tmp_path / "hospital").exists()  # no ERP file, no inventory database
    with pytest.raises(BlockingIOError):  # nobody connected to billing's or the legacy engine's port
        listener.accept()
    listener.close()


# --- the hospital's sinks take what Courier would send ----------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hospital_sinks_accept_each_destinations_payload(tmp_path):
    """examples/hospital_sinks.py as a user runs it; each routes-test payload sent with the real
    adapter of its destination in examples/hospital.yml (what the worker does after the transform)."""
    env = {"COURIER_HOSPITAL_DIR": str(tmp_path), "BILLING_PORT": str(_free_port()),
           "LEGACY_ADT_PORT": str(_free_port()), "COURIER_PSEUDONYM_KEY": KEY}
    sinks = subprocess.Popen([sys.executable, "-u", str(REPO / "examples" / "hospital_sinks.py")], cwd=REPO,
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert sinks.stdout.readline().startswith("ready: "), "the sinks did not start"
        routing = load_routing(HOSPITAL, env)
        sent = []
        for source, path in [("clinical", EVENTS / "service.completed-ecg.json"),
                             ("clinical", EVENTS / "supply.consumed-implant.json"),
                             ("interface-engine", ADT_A01[0])]:
            (message,) = dry_run("--source", source, path, **env)["messages"]
            for d in message["destinations"]:
                delivery_id = f"dlv-{len(sent)}"
                with adapters.open_adapter(routing.destinations[d["name"]].url, timeout=5) as adapter:
                    adapter.send(adapters.Outgoing(delivery_id, "msg-1", "corr-1", d["payload"].encode(),
                                                   d["content_type"], message["type"]))
                sent.append((d["name"], delivery_id))
        assert [name for name, _ in sent] == ["billing", "erp", "inventory", "erp", "legacy-adt"]
        with sqlite3.connect(tmp_path / "inventory.db") as db:
            (row,) = db.execute("SELECT delivery_id, sku, quantity, ward, lot FROM supply_usage").fetchall()
        assert row == ("dlv-2", "MDT-PM-ADAPTA-01", 1, "OR-2", "LOT-H4471")
        assert sorted(p.name for p in (tmp_path / "erp").iterdir()) == ["dlv-1.csv", "dlv-3.csv"]
        deadline, printed = time.monotonic() + 10, ""
        while "legacy-adt:" not in printed and time.monotonic() < deadline:
            printed += sinks.stdout.readline()
        assert "key=dlv-0 type=application/json" in printed  # billing's POST
        assert "legacy-adt: HL7v2:ADT^A01 MSH-10=MSG00001 PID-3.1=PATID1234" in printed
    finally:
        sinks.terminate()
        sinks.wait(10)
