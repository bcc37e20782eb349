"""Prometheus metrics (courier.app.metrics): counters summed over real processes, gauges read from the store.

The main test runs the Procfile's web command (gunicorn, 2 workers), its MLLP
listener, a prefork Celery worker (2 child processes) and the relay as real
processes sharing one PROMETHEUS_MULTIPROC_DIR, posts messages over HTTP on
separate connections and one over MLLP, and checks every scrape against what it
sent and what the sinks received. About 8 s on a 2-core machine, so not marked slow.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text

from courier.app import metrics
from courier.app.store import outbox
from courier.app.store.models import Circuit, Delivery, utcnow
from bench.infra import free_port, procfile_command
from tests.support.mllp_peers import Client
from tests.support.nodes import listening
from tests.support.processes import VENV_BIN, running_courier
from tests.support.sinks import HttpSink

ROOT = Path(__file__).resolve().parents[2]
N = 30  # distinct messages posted over HTTP; one more post is a duplicate and must not count
ADT = b"MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20240101120000||ADT^A01|mllp-1|P|2.5\rPID|1||12345\r"


def parse(body: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def http_get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a new connection each time
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read().decode()
    finally:
        conn.close()


def post(port: int, headers: dict, doc: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/api/v1/messages", body=json.dumps(doc),
                     headers={**headers, "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def wait_for(predicate, what: str, logs, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout}s\n{logs()}"
        time.sleep(0.2)


def count(store, destination: str, status: str) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.destination == destination, Delivery.status == status))


def test_metrics_count_every_process(tmp_path, store, queue_prefix):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with HttpSink() as billing, HttpSink() as erp, running_courier(
            tmp_path, store, queue_prefix, {"billing": billing.url, "erp": erp.url},
            env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                 "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}) as c:
        billing.respond((400, {}, b"refused"))  # the first billing delivery ends dead at once
        with store.session() as s:
            outbox.pause_destination(s, "erp", actor="test", reason="metrics test")
        doc = yaml.safe_load(c.config.read_text())
        doc["sources"]["lab"]["mllp_allow"] = ["127.0.0.1/32"]
        c.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        with web_and_mllp(c, tmp_path) as (port, mllp_port):
            with Client(mllp_port) as mllp:
                assert b"MSA|AA|mllp-1" in mllp.exchange(ADT)
            docs = [{"type": ("service.completed", "supply.consumed")[i % 2], "id": f"m-{i}", "data": {"n": i}}
                    for i in range(N)] + [{"type": "service.completed", "id": "m-0", "data": {"n": 0}}]
            with ThreadPoolExecutor(8) as pool:  # concurrent connections: both gunicorn workers take some
                codes = list(pool.map(lambda d: post(port, c.headers, d), docs))
            assert sorted(codes) == [200] + [202] * N

            c.procs.start("worker", pool="prefork", concurrency=2)
            c.procs.start("relay")
            wait_for(lambda: count(store, "billing", "delivered") + count(store, "billing", "dead") == N + 1,
                     "billing drained", c.procs.logs)

            scrapes = [http_get(port, "/metrics") for _ in range(6)]
            assert {status for status, _, _ in scrapes} == {200}
            assert scrapes[0][1].startswith("text/plain")
            bodies = [parse(body) for _, _, body in scrapes]
            for m in bodies:  # whichever worker answered, the same sums
                assert total(m, "courier_messages_accepted_total") == N + 1
                assert total(m, "courier_messages_accepted_total", source="lab", type="service.completed") == N / 2
                assert total(m, "courier_messages_accepted_total", source="lab", type="HL7v2:ADT^A01") == 1
                assert value(m, "courier_deliveries_total", destination="billing", status="delivered") == N
                assert value(m, "courier_deliveries_total", destination="billing", status="dead") == 1
                assert value(m, "courier_delivery_attempts_total", destination="billing", outcome="delivered") == N
                assert value(m, "courier_delivery_attempts_total", destination="billing", outcome="permanent") == 1
                assert value(m, "courier_delivery_latency_seconds_count", destination="billing") == N
                assert value(m, "courier_delivery_latency_seconds_bucket", destination="billing", le="+Inf") == N
                assert value(m, "courier_backlog", destination="billing") == 0
                assert value(m, "courier_dead_deliveries", destination="billing") == 1
                assert value(m, "courier_backlog", destination="erp") == N + 1  # paused: held in the store
                assert value(m, "courier_oldest_pending_age_seconds", destination="erp") > 0
                assert value(m, "courier_destination_paused", destination="erp") == 1
                assert value(m, "courier_circuit_state", destination="billing", state="closed") == 1
                assert value(m, "courier_store_up") == 1
            assert len(billing.received) == N + 1  # the sink agrees: N + 1 requests, one refused

            # The counts came from several processes: web worker(s), the MLLP listener, Celery children.
            writers = {f.name.rsplit("_", 1)[1] for f in metrics_dir.glob("*.db")}
            assert len(writers) >= 3, sorted(os.listdir(metrics_dir))

            with store.session() as s:
                outbox.resume_destination(s, "erp", actor="test")
            wait_for(lambda: count(store, "erp", "delivered") == N + 1, "erp drained", c.procs.logs)
            with store.session() as s:  # billing's breaker open (as after failures): shown per destination
                s.merge(Circuit(destination="billing", state="open", failures=5, trips=1, changed_at=utcnow(),
                                open_until=utcnow() + timedelta(hours=1)))
            m = parse(http_get(port, "/metrics")[2])
            assert value(m, "courier_deliveries_total", destination="erp", status="delivered") == N + 1
            assert value(m, "courier_delivery_latency_seconds_count", destination="erp") == N + 1
            assert value(m, "courier_backlog", destination="erp") == 0
            assert value(m, "courier_oldest_pending_age_seconds", destination="erp") == 0
            assert value(m, "courier_destination_paused", destination="erp") == 0
            assert value(m, "courier_circuit_state", destination="billing", state="open") == 1
            assert value(m, "courier_circuit_state", destination="billing", state="closed") == 0
            assert total(m, "courier_messages_accepted_total") == N + 1
            assert total(m, "courier_delivery_attempts_total") == 2 * (N + 1)
            print(f"\nmetrics files from {len(writers)} processes: {sorted(os.listdir(metrics_dir))}")
    # No PHI in the exposition: the bodies' contents never appear.
    assert '"n"' not in scrapes[0][2] and "m-1" not in scrapes[0][2] and "12345" not in scrapes[0][2]


@contextmanager
def web_and_mllp(courier, tmp_path: Path):
    """The Procfile's web (gunicorn) and mllp processes on free ports, with `courier`'s environment,
    answering when entered, stopped on exit: (HTTP port, MLLP port)."""
    port, mllp_port = free_port(), free_port()
    env = {**courier.procs.env, "PORT": str(port), "MLLP_PORT": str(mllp_port)}
    shells = [_shell(procfile_command(name) + extra, env, tmp_path / f"{name}.log")
              for name, extra in (("web", ""), ("mllp", " --host 127.0.0.1"))]
    try:
        wait_for(lambda: _up(port), "gunicorn answers /healthz", courier.procs.logs)
        wait_for(lambda: listening(mllp_port), "the MLLP listener accepts", courier.procs.logs)
        yield port, mllp_port
    finally:
        for proc in shells:
            _stop(proc)


def _shell(command: str, env: dict, log_path: Path) -> subprocess.Popen:
    """A Procfile command in its own process group (stopped with its children by _stop)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(["sh", "-c", f"exec {command}"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)




def _up(port: int) -> bool:
    try:
        return http_get(port, "/healthz")[0] == 200
    except OSError:
        return False


def test_metrics_in_process_counts_an_accepted_message(client, make_token):
    """The route works in one process too; a duplicate is not counted again."""
    before = total(parse(client.get("/metrics").get_data(as_text=True)), "courier_messages_accepted_total",
                   source="lab", type="lab.result")
    doc = json.dumps({"type": "lab.result", "id": "metrics-1", "data": {}})
    for expected in (202, 200):
        r = client.post("/api/v1/messages", headers=make_token(), content_type="application/json", data=doc)
        assert r.status_code == expected, r.get_json()
    m = parse(client.get("/metrics").get_data(as_text=True))
    assert total(m, "courier_messages_accepted_total", source="lab", type="lab.result") == before + 1
    assert value(m, "courier_backlog", destination="billing") == 1
    assert value(m, "courier_circuit_state", destination="erp", state="closed") == 1


def test_clean_dead_keeps_live_processes_files(tmp_path):
    live, dead = os.getpid(), _dead_pid()
    for name in (f"counter_{live}.db", f"counter_{dead}.db", f"gauge_livesum_{dead}.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert metrics.clean_dead(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([f"counter_{live}.db", "notes.txt"])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_scrape_queries_use_indexes(store):
    """With many delivered rows and a small backlog, the gauges' queries read indexes, not the table."""
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO courier_messages (id, source, type, content_type, body, size, "
                          "correlation_id, status, received_at) VALUES ('m', 'lab', 't', 'application/json', "
                          "'', 0, 'm', 'accepted', now())"))
        conn.execute(text("INSERT INTO courier_deliveries (id, message_id, destination, status, attempts, "
                          "dispatches, created_at, updated_at, due_at) SELECT 'd' || g, 'm', "
                          "CASE WHEN g % 2 = 0 THEN 'billing' ELSE 'erp' END, "
                          "CASE WHEN g <= 50 THEN 'pending' WHEN g <= 60 THEN 'dead' ELSE 'delivered' END, "
                          "0, 0, now(), now(), CASE WHEN g <= 50 THEN now() END "
                          "FROM generate_series(1, 50000) g"))
        conn.execute(text("ANALYZE courier_deliveries"))
    with store.engine.connect() as conn:
        for query, index in ((metrics.open_query(), "ix_courier_deliveries_due"),
                             (metrics.dead_query(["billing", "erp"]), "ix_courier_deliveries_destination_status")):
            compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
            plan = "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {compiled}")))
            assert "Seq Scan" not in plan and index in plan, plan
            print(f"\n{compiled}\n{plan}")
            if "destination_status" in index:  # a seek by destination, not a walk of the whole index
                assert "destination" in plan.split("Index Cond:")[1].splitlines()[0], plan


def test_in_process_mode_and_store_down():
    """A host that imported prometheus_client first: Courier counts in-process; a dead store gives store_up 0."""
    script = """
import prometheus_client, types
from sqlalchemy.exc import OperationalError
from courier.app import metrics
assert metrics.multiprocess_dir() is None
metrics.accepted("lab", [types.SimpleNamespace(created=True, message=types.SimpleNamespace(type="t"))])
class Down:
    def session(self):
        raise OperationalError("SELECT 1", {}, Exception("down"))
settings = types.SimpleNamespace(routing=types.SimpleNamespace(destinations={"billing": None}))
print(metrics.exposition(Down(), settings)[0].decode())
"""
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    m = parse(out.stdout)
    assert value(m, "courier_messages_accepted_total", source="lab", type="t") == 1
    assert value(m, "courier_store_up") == 0
    assert total(m, "courier_backlog") == 0
