"""Courier embedded in a host app: examples/embedded_host (the supply room) on real PostgreSQL.

The host's stock issue and Courier's message commit in the host's transaction: commit ->
delivered once, rollback -> nothing stored or sent, host killed after commit -> delivered
after restart. Host and Courier tables share one database and each migrates its own.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from courier.app.store import tokens
from courier import include_name
from courier.app.ingest import IngestError
from courier.app.store.models import Delivery, Message
from bench.infra import free_port
from tests.support.services import BROKER_URL, fresh_database
from tests.support.processes import VENV_BIN
from tests.support.sinks import HttpSink

REPO = Path(__file__).resolve().parents[2]
HOST_DIR = REPO / "examples" / "embedded_host"
sys.path.insert(0, str(HOST_DIR))

from app import courier, create_app  # noqa: E402
from app.models import Base as HostBase, StockIssue, StockItem  # noqa: E402

HOST_TABLES = {"stock_items", "stock_issues", "alembic_version"}
COURIER_TABLES = {"courier_messages", "courier_deliveries", "courier_attempts", "courier_api_tokens",
                  "courier_circuits", "courier_audit", "courier_rate_limits", "courier_alembic_version",
                  "courier_patient_keys", "courier_message_links", "courier_console_sessions", "courier_alerts"}


def host_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a host process: its own database variable, Courier's keys as FLASK_COURIER_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "FLASK_", "DATABASE_URL"))}
    env.update(SUPPLYROOM_DATABASE_URL=database_url, PYTHONPATH=f"{HOST_DIR}{os.pathsep}{REPO}",
               PYTHONUNBUFFERED="1", **extra)
    return env


def run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, cwd=HOST_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def migrate_both(database_url: str) -> None:
    """What a host's deploy runs: its own migrations, then Courier's, each with its own version table."""
    env = host_env(database_url)
    run([str(VENV_BIN / "alembic"), "upgrade", "head"], env)
    run([str(VENV_BIN / "flask"), "--app", "app", "courier", "db", "upgrade"], env)


def table_names(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))


@pytest.fixture(scope="module")
def host_db():
    """A fresh database holding the supply room's tables and Courier's, both migrated; dropped afterwards."""
    with fresh_database("supplyroom_test") as url:
        migrate_both(url)
        yield url


@pytest.fixture
def sink(monkeypatch):
    with HttpSink(path="/supply-events") as s:
        monkeypatch.setenv("ERP_URL", s.url)  # courier.yml reads ${ERP_URL}
        yield s


@pytest.fixture
def host(host_db, sink, queue_prefix):
    """The supply-room app in this process, with a broker address nothing listens on: emit needs none."""
    app = create_app({"DATABASE_URL": host_db, "COURIER_QUEUE_PREFIX": queue_prefix, "TESTING": True,
                      "COURIER_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"})
    engine = app.extensions["supplyroom.engine"]
    yield app
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE stock_issues, courier_attempts, courier_deliveries, courier_messages, "
                          "courier_api_tokens, courier_circuits, courier_audit CASCADE"))
        conn.execute(text("UPDATE stock_items SET on_hand = 40 WHERE sku = 'gauze-10'"))
    engine.dispose()


def counts(app) -> tuple[int, int, int]:
    """(stock issues, Courier messages, Courier deliveries) as committed."""
    with Session(app.extensions["supplyroom.engine"]) as s:
        return (s.scalar(select(func.count()).select_from(StockIssue)),
                s.scalar(select(func.count()).select_from(Message)),
                s.scalar(select(func.count()).select_from(Delivery)))


def on_hand(app, sku: str = "gauze-10") -> int:
    with Session(app.extensions["supplyroom.engine"]) as s:
        return s.get(StockItem, sku).on_hand


def issue(client, quantity: int, sku: str = "gauze-10"):
    return client.post(f"/stock/{sku}/issues", json={"quantity": quantity, "ward": "4B"})


def test_commit_is_delivered_once(host, sink):
    r = issue(host.test_client(), 3)
    assert r.status_code == 201, r.get_data(as_text=True)
    assert counts(host) == (1, 1, 1) and on_hand(host) == 37

    delivery = courier.start_embedded(threads=2)
    try:
        [received] = sink.wait_for(1)
        wait_statuses(host, ["delivered"])
    finally:
        delivery.stop()
    event = json.loads(received.body)
    assert event["type"] == "supply.consumed" and event["data"]["issue_id"] == r.get_json()["issue_id"]
    assert event["id"] == f"stock-issue-{r.get_json()['issue_id']}"
    assert len(sink.received) == 1 and list(sink.count_by_key().values()) == [1]


def statuses(app) -> list[str]:
    with Session(app.extensions["supplyroom.engine"]) as s:
        return sorted(s.scalars(select(Delivery.status)))


def wait_statuses(app, expected: list[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while statuses(app) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert statuses(app) == expected


def test_rollback_stores_nothing_and_sends_nothing(host, sink):
    # The shelf holds 40: the CHECK constraint refuses the update after emit, and everything rolls back.
    r = issue(host.test_client(), 41)
    assert r.status_code == 409
    # The host's own code raising after emit: the same.
    engine = host.extensions["supplyroom.engine"]
    with pytest.raises(RuntimeError), host.app_context(), Session(engine) as session, session.begin():
        courier.emit(session, "supply.consumed", {"sku": "gauze-10", "quantity": 1})
        raise RuntimeError("the host changed its mind")
    assert counts(host) == (0, 0, 0) and on_hand(host) == 40

    delivery = courier.start_embedded(threads=1)
    try:
        assert delivery.pump(10) == 0  # nothing due: the relay has nothing to hand out
    finally:
        delivery.stop()
    assert sink.received == []


def test_emit_deduplicates_and_refuses_what_http_would(host):
    engine = host.extensions["supplyroom.engine"]
    with host.app_context():
        with Session(engine) as session, session.begin():
            first = courier.emit(session, "supply.consumed", {"sku": "iv-set"}, idempotency_key="k-1")
        with Session(engine) as session, session.begin():
            again = courier.emit(session, "supply.consumed", {"sku": "iv-set"}, idempotency_key="k-1")
        assert again == first
        for kwargs, status, where in [
            (dict(event_type="lab.result", data={}), 422, "allowed_types"),     # not allowed for supply-room
            (dict(event_type="supply.consumed", data={"when": {1, 2}}), 422, "not JSON"),
            (dict(event_type="supply.consumed", data={}, idempotency_key="no spaces"), 422, "id"),
            (dict(event_type="supply.consumed", data={}, source="nobody"), 403, "nobody"),
        ]:
            with Session(engine) as session, session.begin():
                with pytest.raises(IngestError) as exc:
                    courier.emit(session, **kwargs)
            assert exc.value.status == status and where in f"{exc.value.message} {exc.value.details}"
    assert counts(host) == (0, 1, 1)


def test_the_api_is_mounted_under_its_prefix_and_leaves_the_host_alone(host):
    client = host.test_client()
    with host.extensions["courier.store"].session() as session:
        _, admin = tokens.create(session, scope="admin", source=None)
    headers = {"Authorization": f"Bearer {admin}"}
    message_id = None
    with host.app_context(), Session(host.extensions["supplyroom.engine"]) as session, session.begin():
        message_id = courier.emit(session, "supply.consumed", {"sku": "iv-set"})

    trace = client.get(f"/courier/api/v1/messages/{message_id}", headers=headers)
    assert trace.status_code == 200 and trace.get_json()["deliveries"][0]["destination"] == "erp"
    assert client.get("/courier/healthz").get_json() == {"status": "ok"}
    assert client.get("/api/v1/messages", headers=headers).status_code == 404  # only under the prefix
    # Ingest over HTTP works too, with the host's routing and sources.
    posted = client.post("/courier/api/v1/messages", headers={**headers, "X-Courier-Source": "supply-room"},
                         json={"type": "supply.returned", "data": {"sku": "iv-set"}})
    assert posted.status_code == 202, posted.get_json()
    # The host's own errors keep the host's format, not Courier's JSON envelope.
    missing = client.get("/stock/no-such-sku")
    assert missing.status_code == 404 and missing.mimetype == "text/html"
    big = client.post("/courier/api/v1/messages", headers={**headers, "X-Courier-Source": "supply-room"},
                      json={"type": "supply.returned", "data": {"x": "y" * 11_000_000}})
    assert big.status_code == 413 and big.get_json()["error"]["code"] == "too_large"


def test_host_and_courier_tables_coexist_and_migrate_separately(host_db):
    engine = create_engine(host_db)
    try:
        assert table_names(engine) == HOST_TABLES | COURIER_TABLES
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "s0001"
            assert conn.scalar(text("SELECT version_num FROM courier_alembic_version")) is not None
            # The host's autogenerate, filtered with courier.include_name, proposes nothing; unfiltered,
            # it would drop every Courier table (the reason include_name exists).
            ctx = MigrationContext.configure(conn, opts={"include_name": include_name})
            assert compare_metadata(ctx, HostBase.metadata) == []
            unfiltered = compare_metadata(MigrationContext.configure(conn), HostBase.metadata)
            assert {d[1].name for d in unfiltered if d[0] == "remove_table"} == COURIER_TABLES
    finally:
        engine.dispose()


def test_courier_downgrade_leaves_the_host_untouched(host_db):
    """On a second database: dropping Courier entirely keeps every host table and row."""
    with fresh_database("supplyroom_down") as url:
        migrate_both(url)
        run([str(VENV_BIN / "flask"), "--app", "app", "courier", "db", "downgrade", "base"], host_env(url))
        engine = create_engine(url)
        try:
            assert table_names(engine) == HOST_TABLES | {"courier_alembic_version"}
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM stock_items")) == 2
        finally:
            engine.dispose()


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, cwd=HOST_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_http(port: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"host did not listen on {port}:\n{log.read_text(errors='replace')[-3000:]}")


def post_issue(port: int, quantity: int) -> int:
    import requests
    return requests.post(f"http://127.0.0.1:{port}/stock/gauze-10/issues", json={"quantity": quantity,
                                                                                 "ward": "4B"}, timeout=10).status_code


@pytest.mark.slow
def test_host_killed_after_commit_delivers_after_restart(host, sink, host_db, tmp_path):
    env = host_env(host_db, ERP_URL=sink.url, FLASK_COURIER_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    log = tmp_path / "host.log"
    port = free_port()
    # First life: the web app alone (its delivery runs elsewhere, or not yet): commit, then SIGKILL.
    web = start([str(VENV_BIN / "flask"), "--app", "app", "run", "--port", str(port)], env, log)
    try:
        wait_http(port, log)
        assert post_issue(port, 2) == 201
    finally:
        web.send_signal(signal.SIGKILL)
        web.wait(10)
    assert counts(host) == (1, 1, 1) and sink.received == []
    # Second life: the small-install mode, delivery threads inside the app process.
    embedded = start([str(VENV_BIN / "python"), "-m", "app", str(port)], env, log)
    try:
        sink.wait_for(1, timeout=30)
        wait_http(port, log)
        assert post_issue(port, 1) == 201  # and it goes on working
        sink.wait_for(2, timeout=30)
        wait_statuses(host, ["delivered", "delivered"])
    finally:
        embedded.terminate()
        embedded.wait(15)
    assert sorted(sink.count_by_key().values()) == [1, 1], log.read_text(errors="replace")[-3000:]


@pytest.mark.slow
def test_relay_and_worker_run_from_the_host_config(host, sink, host_db, queue_prefix, tmp_path):
    """The full deployment, started by the host's process manager: `flask courier relay` + a Celery worker."""
    env = host_env(host_db, ERP_URL=sink.url, FLASK_COURIER_BROKER_URL=BROKER_URL,
                   FLASK_COURIER_QUEUE_PREFIX=queue_prefix)
    procs = [start([str(VENV_BIN / "flask"), "--app", "app", "courier", "relay"], env, tmp_path / "relay.log"),
             start([str(VENV_BIN / "celery"), "-A", "tasks", "worker", "--pool", "threads",
                    "--concurrency", "2", "--without-mingle", "--without-gossip", "-n", f"host-{os.getpid()}@%h"],
                   env, tmp_path / "worker.log")]
    try:
        assert issue(host.test_client(), 5).status_code == 201
        sink.wait_for(1, timeout=60)
    except BaseException:
        print("\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log")))
        raise
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
    assert list(sink.count_by_key().values()) == [1]


def test_importing_courier_loads_nothing_heavy():
    heavy = ["celery", "kombu", "requests", "hl7", "yaml", "marshmallow", "alembic", "psycopg", "courier.app.settings"]
    code = f"import sys, courier; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_json_only_install_refuses_hl7_and_names_the_extra():
    """Without python-hl7 (the [mllp] extra) JSON still works and HL7 gets 415 saying what to install."""
    code = """
import sys
sys.modules["hl7"] = None  # as if the [mllp] extra were not installed
from courier.app.ingest import IngestError, parse_body
parse_body("application/json", b'{"type": "a.b", "data": {}}')
try:
    parse_body("application/hl7-v2", b"MSH|^~\\\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\\r")
except IngestError as exc:
    print(exc.status, exc.message)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("415 ") and "courier[mllp]" in out.stdout


def test_a_host_on_sqlite_commits_and_rolls_back_with_its_events(tmp_path, sink, queue_prefix):
    """pysqlite's default mode commits at a savepoint's RELEASE; emit must not use one there."""
    from courier.app.store.schema import migrate

    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/supplyroom.db", "COURIER_QUEUE_PREFIX": queue_prefix})
    engine = app.extensions["supplyroom.engine"]
    HostBase.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(StockItem(sku="gauze-10", name="Gauze", on_hand=5))
    migrate(app.extensions["courier.store"].engine, "upgrade", "head")
    client = app.test_client()

    assert issue(client, 6).status_code == 409
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        courier.emit(session, "supply.consumed", {"sku": "gauze-10"})  # the transaction's first statement
        raise RuntimeError("rolled back")
    assert counts(app) == (0, 0, 0)
    assert issue(client, 2).status_code == 201
    assert counts(app) == (1, 1, 1) and on_hand(app) == 3
    delivery = courier.start_embedded(threads=1)
    try:
        sink.wait_for(1)
        wait_statuses(app, ["delivered"])
    finally:
        delivery.stop()
        engine.dispose()
    assert len(sink.received) == 1
