"""Courier's failure suite: `make chaos` (or `python bench/chaos.py [--quick] [--seed N] [--only NAME,...]`).

It starts its own PostgreSQL cluster and RabbitMQ node on other ports
(bench/chaos_services.py), so the machine's services stay up; runs Courier's
real processes with the Procfile's commands (gunicorn `web`, `courier relay`,
a threads-pool celery `worker`, `courier mllp`) against them; and offers steady
load: JSON events over HTTP, each with its own Idempotency-Key, routed to two
HTTP destinations (`alpha`, `beta`: bench/chaos_sink.py on loopback), plus HL7
ADT messages over MLLP routed to `alpha` and a file drop `drop` on a small
tmpfs. Then, one fault per phase, at a random moment under load:

- kill -9 (the whole process group) of web, relay, worker, mllp, or all at once,
  restarted after a random pause;
- RabbitMQ stopped cleanly and restarted, or SIGKILLed and restarted;
- PostgreSQL restarted (`pg_ctl restart -m fast`), or crashed (`-m immediate`, WAL recovery);
- destination `beta` down (its sink process stopped, then started again);
- the file drop's disk full (a filler file takes the tmpfs), then freed.

After each fault it drains (no delivery open any more) and reconciles against
the store, cumulatively since the start:
- every message that got a 202 (delivery ids from its body) or an MLLP AA
  (found by MSH-10) has a delivery per routed destination, each `delivered`
  or `dead` with a reason; else it counts as lost;
- a delivery `delivered` to alpha/beta has its Idempotency-Key in the sink's
  key file; one to `drop` has its file; else lost;
- the sinks' distinct keys equal the store's delivered count for alpha+beta;
- duplicates = requests at the sinks minus distinct keys.
"Time to recover" is from the fault's end (process restarted, service or
destination back) until every delivery of a message stored before that moment
is delivered or dead: the backlog the fault left is gone.

The relay's lease is 10 s here (COURIER_RELAY_LEASE, default 120 s): a
delivery claimed by a relay or worker that died is dispatched again after it.
Exit status 1 if anything acknowledged was lost. Everything it starts is
stopped and removed at the end, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench.chaos_services import PgCluster, RabbitNode, TmpfsDir, missing_services  # noqa: E402
from bench.infra import (VENV_BIN, Stack, free_port, install_signal_handlers, procfile_command,  # noqa: E402
                         run_cli, wait_http)
from bench.load import Load, drive  # noqa: E402

OUT = Path(__file__).with_name("out")
HTTP_DESTINATIONS = ("alpha", "beta")
OPEN = ("pending", "in_flight", "retrying")
ADT = "MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20240101120000||ADT^A01|{id}|P|2.5\rPID|1||{n}^^^HOSP^MR||DOE^JANE\r"
SB, EB = b"\x0b", b"\x1c\x0d"


@dataclass
class Profile:
    """How long and how hard: the full suite (`make chaos`) or the short one (`make test`)."""
    http_rate: float = 25.0   # JSON events/s over HTTP (2 deliveries each)
    mllp_rate: float = 4.0    # HL7 messages/s over MLLP (2 deliveries each)
    phase_s: float = 20.0     # load per phase
    outage_s: float = 60.0    # destination down
    disk_full_s: float = 30.0
    drain_s: float = 180.0
    faults: tuple[str, ...] = ("baseline", "kill web", "kill relay", "kill worker", "kill mllp", "kill all",
                               "restart rabbitmq", "crash rabbitmq", "restart postgres", "crash postgres",
                               "destination down", "disk full")


QUICK = Profile(http_rate=20.0, mllp_rate=4.0, phase_s=10.0, outage_s=10.0, disk_full_s=8.0, drain_s=90.0,
                faults=("kill worker", "kill web+relay", "crash postgres", "crash rabbitmq", "destination down"))


@dataclass
class Row:
    fault: str
    accepted: int = 0        # messages acknowledged (202 or AA) in this phase
    refused: int = 0         # requests that got no acknowledgement (connection refused, 503, AE): not promised
    lost: int = 0
    duplicates: int = 0      # extra requests at the sinks in this phase
    dead: int = 0
    failed_attempts: int = 0  # attempts that failed temporarily in this phase: evidence the fault hit
    recover_s: float | None = None
    notes: list[str] = field(default_factory=list)


def free_block(n: int) -> int:
    """A port p with p..p+n-1 all free, below the ephemeral range and clear of RabbitMQ's defaults."""
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(20000, 30000 - n)
        if any(q in range(p, p + n) for q in (25672, 27017)):
            continue
        try:
            socks = []
            for q in range(p, p + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


# -- MLLP load -------------------------------------------------------------------

class MllpLoad:
    """One connection sending ADT messages at `rate`/s; remembers the MSH-10 of each AA."""

    def __init__(self, port: int, rate: float, run: str, node: str = ""):
        self.port, self.rate, self.run, self.node = port, rate, run, node
        self.accepted: list[str] = []
        self.refused = 0
        self.first_error = ""
        self.counter = 0

    def drive(self, duration: float) -> None:
        start, sock, buf = time.monotonic(), None, b""
        i = 0
        while True:
            due = start + i / self.rate
            if due - start >= duration:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            control = f"{self.run}-{self.counter}"
            self.counter += 1
            i += 1
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
                    buf = b""
                sock.sendall(SB + ADT.format(id=control, n=self.counter).encode() + EB)
                while EB not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise EOFError("closed by the listener")
                    buf += chunk
                ack, _, buf = buf.partition(EB)
                msa = next((s for s in ack.decode(errors="replace").split("\r") if s.startswith("MSA|")), "")
                fields = msa.split("|")
                if len(fields) > 2 and fields[1] == "AA" and fields[2] == control:
                    self.accepted.append(control)
                else:
                    self.refused += 1
                    self.first_error = self.first_error or f"answer {msa!r}"
            except (OSError, EOFError) as exc:
                self.refused += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


# -- Courier's processes ---------------------------------------------------------------

@dataclass
class CourierNode:
    """One set of Courier's processes: their environment and the ports its web and mllp listen on."""
    env: dict[str, str]
    web_port: int
    mllp_port: int


def node_env(env: dict[str, str], **more: str) -> CourierNode:
    web, mllp = free_port(), free_port()
    return CourierNode({**env, **more, "PORT": str(web), "MLLP_PORT": str(mllp)}, web, mllp)


def create_database(pg: PgCluster, name: str = "courier") -> None:
    admin = create_engine(pg.url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()


def ingest_headers(env: dict[str, str]) -> dict[str, str]:
    """Migrate the store (`courier db upgrade`) and make an ingest token for source `lab`: its headers."""
    courier = str(VENV_BIN / "courier")
    run_cli([courier, "db", "upgrade"], env)
    token = run_cli([courier, "tokens", "create", "--source", "lab"], env).strip().splitlines()[-1]
    return {"Authorization": f"Bearer {token}"}


def start_courier(stack: Stack, label: str, kind: str, node: CourierNode) -> subprocess.Popen:
    """Start the Procfile's `kind` process (web, worker, relay, mllp) as `label`; return once it serves."""
    command = procfile_command(kind)
    if kind == "mllp":
        command += " --host 127.0.0.1"
    elif kind == "worker":
        command += f" -n {label}@%h"  # two workers of one name on one host confuse Celery's monitoring
    log = stack.log_dir / f"{label}.log"
    mark = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
    proc = stack.start(label, command, node.env)
    # Ready: web answers /healthz; a worker consumes (celery's " ready."); mllp listens.
    ready = {"worker": b" ready.", "mllp": b"MLLP listener on"}.get(kind)
    if kind == "web":
        wait_http(f"http://127.0.0.1:{node.web_port}/healthz", proc, stack, timeout=60)
    elif ready is not None:
        deadline = time.monotonic() + 60
        while ready not in log.read_bytes()[mark:]:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} not ready:\n{stack.log_tail(label)}")
            time.sleep(0.1)
    return proc


# -- the suite ---------------------------------------------------------------------

class Chaos:
    def __init__(self, stack: Stack, base: Path, profile: Profile, seed: int, say: Callable[[str], None]):
        self.stack, self.base, self.profile, self.say = stack, base, profile, say
        self.rng = random.Random(seed)
        self.tag = secrets.token_hex(3)
        self.procs: dict = {}
        self.http_loads: list[Load] = []
        self.mllp = None
        self.lost_keys: set[str] = set()
        self.mllp_accepted: list[str] = []
        self.dupes_before = 0
        self.dead_before = 0
        self.failed_before = 0
        self.disk_note = ""

    # -- set-up --------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.monotonic()
        self.engines()
        self.engine = create_engine(self.db_url, pool_pre_ping=True, pool_size=2)
        self.stack.callback(self.engine.dispose)
        config = self.destinations()
        self.env = {"DATABASE_URL": self.db_url, "BROKER_URL": self.rabbit.url, "COURIER_CONFIG": str(config),
                    "COURIER_QUEUE_PREFIX": f"chaos-{self.tag}", "COURIER_RELAY_LEASE": "10s",
                    "PYTHONUNBUFFERED": "1", "COURIER_LOG_LEVEL": "INFO"}
        self.headers = ingest_headers(self.env)
        self.nodes = {"": node_env(self.env)}
        for name in ("web", "worker", "relay", "mllp"):
            self.start(name)
        self.say(f"Courier up (web :{self.nodes[''].web_port}, mllp :{self.nodes[''].mllp_port}) in "
                 f"{time.monotonic() - t0:.1f}s")

    def engines(self) -> None:
        """PostgreSQL with an empty `courier` database (sets db_url) and RabbitMQ."""
        self.pg = PgCluster(self.base, free_block(1))
        self.pg.start()
        self.stack.callback(self.pg.close)
        create_database(self.pg)
        self.db_url = self.pg.url("courier")
        self.rabbit = RabbitNode(self.base, free_block(13), self.tag)
        self.stack.callback(self.rabbit.close)
        boot = self.rabbit.start()
        self.say(f"own PostgreSQL on 127.0.0.1:{self.pg.port}, own RabbitMQ node {self.rabbit.node} on "
                 f"127.0.0.1:{self.rabbit.port} (booted in {boot:.1f}s)")

    def destinations(self) -> Path:
        """The drop folder (a small tmpfs if it can be mounted), the two HTTP sinks and the routing file."""
        why_not = TmpfsDir.available()
        if why_not is None:
            try:
                self.drop = TmpfsDir(self.base / "drop", size="64m")
                self.stack.callback(self.drop.close)
            except Exception as exc:  # noqa: BLE001 - a sandbox may refuse mount even to root
                why_not = f"mount refused: {exc}"
        if why_not is not None:
            self.drop = None
            (self.base / "drop").mkdir()
            self.disk_note = why_not
        self.drop_dir = self.base / "drop"

        self.sink_ports = {name: free_port() for name in HTTP_DESTINATIONS}
        for name in HTTP_DESTINATIONS:
            self.start_sink(name)
        retry = {"max_attempts": 50, "initial": "200ms", "max": "2s"}
        circuit = {"failure_threshold": 5, "open_for": "1s", "max_open_for": "4s"}
        doc = {
            "sources": {"lab": {"allowed_types": ["*"], "mllp_allow": ["127.0.0.1/32"]}},
            "destinations": {
                # clearance phi: the sinks get the messages as sent (passthrough), which only a
                # destination cleared for PHI may (the config check refuses it otherwise).
                **{n: {"url": f"http://127.0.0.1:{p}/{n}", "timeout": "5s", "retry": retry, "circuit": circuit,
                       "clearance": "phi"} for n, p in self.sink_ports.items()},
                "drop": {"url": self.drop_dir.as_uri(), "retry": retry, "circuit": circuit, "clearance": "phi"},
            },
            "routes": [{"match": {"source": "lab", "type": "service.completed"}, "to": ["alpha", "beta"]},
                       {"match": {"source": "lab", "type": "HL7v2:ADT^*"}, "to": ["alpha", "drop"]}],
        }
        config = self.base / "courier.yml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        return config

    def start(self, name: str) -> None:
        """Start process `name`: a Procfile process (web, worker, relay, mllp), `-<node>` in a cluster."""
        kind, _, node = name.partition("-")
        self.procs[name] = start_courier(self.stack, name, kind, self.nodes[node])

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def start_sink(self, name: str) -> None:
        port = self.sink_ports[name]
        proc = self.stack.start(f"sink-{name}", f"python bench/chaos_sink.py {port} {self.base / f'keys-{name}'}",
                                {})
        self.procs[f"sink-{name}"] = proc
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sink {name} did not start:\n{self.stack.log_tail(f'sink-{name}')}")
            time.sleep(0.05)

    # -- faults: (inject, restore) -------------------------------------------

    def fault(self, name: str) -> tuple[Callable[[], None], Callable[[], None], float]:
        """What to do at the fault, what to do to end it, and how long it lasts."""
        pause = self.rng.uniform(0.2, 2.0)
        if name == "baseline":
            return (lambda: None), (lambda: None), 0.0
        if name.startswith("kill "):
            names = ["web", "relay", "worker", "mllp"] if name == "kill all" else name[5:].split("+")

            def inject():
                for n in names:
                    self.kill(n)

            def restore():
                for n in names:
                    self.start(n)
            return inject, restore, pause
        if name == "restart rabbitmq":
            return self.rabbit.stop, self._rabbit_up, pause
        if name == "crash rabbitmq":
            return self.rabbit.kill, self._rabbit_up, pause
        if name == "restart postgres":
            return (lambda: self.pg.stop("fast")), self.pg.start, pause
        if name == "crash postgres":
            return (lambda: self.pg.stop("immediate")), self.pg.start, pause
        if name == "destination down":
            return (lambda: self.kill("sink-beta")), (lambda: self.start_sink("beta")), self.profile.outage_s
        if name == "disk full":
            if self.drop is None:
                raise Skip(self.disk_note)

            def fill():
                self.disk_note = f"filler took {self.drop.fill() / 1e6:.1f} MB"
            return fill, self.drop.free, self.profile.disk_full_s
        raise ValueError(f"unknown fault {name!r}")

    def _rabbit_up(self) -> None:
        self.say(f"  RabbitMQ booted again in {self.rabbit.start():.1f}s")

    # -- one phase -------------------------------------------------------------

    def phase(self, name: str) -> Row:
        row = Row(name)
        try:
            inject, restore, lasts = self.fault(name)
        except Skip as why:
            row.notes.append(f"skipped: {why}")
            row.lost = 0
            return row
        duration = max(self.profile.phase_s, lasts + self.profile.phase_s * 0.6)
        http_loads, mllps = self._start_load(duration)
        at = self.rng.uniform(0.2, 0.5) * self.profile.phase_s
        time.sleep(at)
        t_fault = time.monotonic()
        inject()
        time.sleep(lasts)
        restore()
        t_end = time.monotonic()
        mark = self._retry_db(lambda c: c.execute(text("SELECT max(received_at) FROM courier_messages")).scalar())
        recover = self._wait_closed(mark, self.profile.drain_s + duration)
        row.recover_s = None if recover is None else recover - t_end
        for t in self._load_threads:
            t.join()
        drained = self._wait_closed(None, self.profile.drain_s)
        if drained is None:
            row.notes.append(f"not drained after {self.profile.drain_s:.0f}s")
        row.accepted = sum(h.messages for h in http_loads) + sum(len(m.accepted) for m in mllps)
        row.refused = sum(h.errors for h in http_loads) + sum(m.refused for m in mllps)
        for h in http_loads:
            if h.first_error:
                row.notes.append(f"http{' to node ' + h.node if h.node else ''}: {h.errors} refused, first: "
                                 f"{h.first_error[:80]}")
        for m in mllps:
            if m.first_error:
                row.notes.append(f"mllp{' to node ' + m.node if m.node else ''}: {m.refused} refused, first: "
                                 f"{m.first_error[:80]}")
            self.mllp_accepted.extend(m.accepted)
        self.http_loads.extend(http_loads)
        self._reconcile(row)
        self.say(f"  {name}: fault at {at:.1f}s for {t_end - t_fault:.1f}s; {row.accepted} accepted, "
                 f"{row.lost} lost, {row.duplicates} duplicates, recovered "
                 f"{'never' if row.recover_s is None else f'in {row.recover_s:.1f}s'}")
        return row

    def _start_load(self, duration: float):
        """HTTP and MLLP load on every node (split evenly); returns the HTTP loads (filled when done) and
        the MLLP senders."""
        http_box: list[Load] = []
        mllps = [MllpLoad(node.mllp_port, self.profile.mllp_rate / len(self.nodes),
                          f"{self.tag}-{len(self.http_loads)}{name}", name) for name, node in self.nodes.items()]
        self._load_threads = [threading.Thread(target=m.drive, args=(duration,), daemon=True) for m in mllps]
        rate = self.profile.http_rate / len(self.nodes)

        def http(name: str, node: CourierNode) -> None:
            load = drive(f"http://127.0.0.1:{node.web_port}/api/v1/messages", self.headers, duration, rate=rate,
                         connections=4)
            load.node = name
            http_box.append(load)
        self._load_threads += [threading.Thread(target=http, args=item, daemon=True) for item in self.nodes.items()]
        for t in self._load_threads:
            t.start()
        return http_box, mllps

    def _retry_db(self, fn, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.engine.connect() as conn:
                    return fn(conn)
            except Exception:  # noqa: BLE001 - the store may be restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _wait_closed(self, mark, timeout: float) -> float | None:
        """Wait until no delivery of a message stored up to `mark` (None: any) is open; when, or None."""
        query = ("SELECT count(*) FROM courier_deliveries d JOIN courier_messages m ON m.id = d.message_id "
                 "WHERE d.status IN ('pending', 'in_flight', 'retrying')"
                 + (" AND m.received_at <= :mark" if mark is not None else ""))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self._retry_db(lambda c: c.execute(text(query), {"mark": mark}).scalar())
            if n == 0:
                return time.monotonic()
            time.sleep(0.2)
        return None

    # -- reconciliation ----------------------------------------------------------

    def sink_keys(self) -> tuple[collections.Counter, int]:
        seen: collections.Counter = collections.Counter()
        for name in HTTP_DESTINATIONS:
            path = self.base / f"keys-{name}"
            if path.exists():
                seen.update(line for line in path.read_text().splitlines() if line)
        return seen, sum(seen.values())

    def _reconcile(self, row: Row) -> None:
        rows = self._retry_db(lambda c: c.execute(text(
            "SELECT d.id, d.destination, d.status, d.last_error, m.dedup_key, m.id "
            "FROM courier_deliveries d JOIN courier_messages m ON m.id = d.message_id")).all())
        by_id = {r[0]: r for r in rows}
        by_control: dict[str, list] = collections.defaultdict(list)
        controls = set(self.mllp_accepted)
        for r in rows:
            if r[1] == "drop" or r[4] in controls:
                by_control[r[4]].append(r)
        seen, requests = self.sink_keys()
        files = set(self.drop_dir.iterdir()) if self.drop_dir.exists() else set()
        files = {p.name.split(".")[0] for p in files if not p.name.startswith(".")}
        lost: dict[str, str] = {}

        def check(delivery, what: str) -> None:
            did, destination, status, last_error = delivery[:4]
            if status in OPEN:
                lost[did] = f"{what}: still {status} after the drain"
            elif status == "dead" and not (last_error or "").strip():
                lost[did] = f"{what}: dead without a reason"
            elif status == "delivered" and destination in HTTP_DESTINATIONS and did not in seen:
                lost[did] = f"{what}: delivered in the store, never reached {destination}"
            elif status == "delivered" and destination == "drop" and did not in files:
                lost[did] = f"{what}: delivered in the store, no file in the drop"
            elif status not in ("delivered", "dead"):
                lost[did] = f"{what}: status {status}"

        for load in self.http_loads:
            per_message: dict[int, list[str]] = collections.defaultdict(list)
            for did, (i, _) in load.accepted.items():
                per_message[i].append(did)
            for i, ids in per_message.items():
                if len(ids) != 2:
                    lost[f"http-{i}"] = f"HTTP message {i}: 202 listed {len(ids)} deliveries, not 2"
                for did in ids:
                    if did not in by_id:
                        lost[did] = f"HTTP message {i}: delivery {did} of its 202 is not in the store"
                    else:
                        check(by_id[did], f"HTTP message {i}")
        for control in self.mllp_accepted:
            deliveries = by_control.get(control, [])
            if sorted(d[1] for d in deliveries) != ["alpha", "drop"]:
                lost[f"mllp-{control}"] = (f"MLLP {control}: AA sent, deliveries in the store: "
                                           f"{sorted(d[1] for d in deliveries)}")
            for d in deliveries:
                check(d, f"MLLP {control}")

        new = set(lost) - self.lost_keys
        row.lost = len(new)
        for key in sorted(new)[:5]:
            row.notes.append(lost[key])
        self.lost_keys |= set(lost)
        self.lost_detail = lost

        delivered_http = sum(1 for r in rows if r[2] == "delivered" and r[1] in HTTP_DESTINATIONS)
        if len(seen) != delivered_http:
            extra = sorted(set(seen) - {r[0] for r in rows if r[2] == "delivered"})
            row.notes.append(f"sinks saw {len(seen)} distinct keys, the store has {delivered_http} delivered "
                             f"to alpha/beta (keys not delivered in the store: {extra[:3]})")
        dupes = requests - len(seen)
        row.duplicates, self.dupes_before = dupes - self.dupes_before, dupes
        failed = self._retry_db(lambda c: c.execute(text(
            "SELECT count(*) FROM courier_attempts WHERE outcome <> 'delivered'")).scalar())
        row.failed_attempts, self.failed_before = failed - self.failed_before, failed
        dead = sum(1 for r in rows if r[2] == "dead")
        row.dead, self.dead_before = dead - self.dead_before, dead
        self.totals = {"messages_in_store": len({r[5] for r in rows}), "deliveries": len(rows),
                       "delivered": sum(1 for r in rows if r[2] == "delivered"), "dead": dead,
                       "sink_distinct": len(seen), "sink_requests": requests, "drop_files": len(files)}


class Skip(Exception):
    pass


def table(rows: list[Row]) -> str:
    lines = ["| fault | accepted | refused (no ack) | lost | duplicates | dead | failed attempts | time to recover |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        recover = "-" if r.recover_s is None else f"{r.recover_s:.1f} s"
        if any(n.startswith("skipped") for n in r.notes):
            recover = "skipped"
        lines.append(f"| {r.fault} | {r.accepted} | {r.refused} | {r.lost} | {r.duplicates} | {r.dead} | {r.failed_attempts} "
                     f"| {recover} |")
    return "\n".join(lines)


def say_now(line: str) -> None:
    print(line, flush=True)


def run(profile: Profile, seed: int | None = None, say: Callable[[str], None] = say_now,
        keep: bool = False, suite: Callable[..., Chaos] = Chaos,
        name: str = "chaos") -> tuple[list[Row], dict, Path]:
    """Run the suite (`suite`: Chaos or a subclass, bench/cluster_chaos.py's); returns the rows, the cumulative
    totals and the log directory, bench/out/<name>-<time>."""
    missing = missing_services()
    if missing:
        raise RuntimeError(f"cannot run the failure suite here: {missing}")
    seed = secrets.randbelow(10**6) if seed is None else seed
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = OUT / f"{name}-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"courier-{name}-"))
    base.chmod(0o755)
    say(f"seed {seed}; logs in {log_dir}; scratch in {base}")
    rows: list[Row] = []
    t0 = time.monotonic()
    with Stack(log_dir) as stack:
        if not keep:
            stack.callback(shutil.rmtree, base, True)
        chaos = suite(stack, base, profile, seed, say)
        chaos.setup()
        for name in profile.faults:
            rows.append(chaos.phase(name))
        acknowledged = sum(r.accepted for r in rows)
        # A message can be stored without its 202/AA reaching the sender (web killed after the commit):
        # not a loss, it is delivered all the same; the sender's resend would be answered as a duplicate.
        totals = dict(chaos.totals, acknowledged=acknowledged,
                      stored_without_ack=chaos.totals["messages_in_store"] - acknowledged,
                      seconds=round(time.monotonic() - t0, 1), seed=seed,
                      lost_detail=list(chaos.lost_detail.items())[:20])
        if chaos.disk_note:
            totals["disk"] = chaos.disk_note
    return rows, totals, log_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short version (a few faults, under 3 minutes)")
    parser.add_argument("--seed", type=int, help="random seed for the fault moments (printed otherwise)")
    parser.add_argument("--only", help="comma-separated faults to run, e.g. 'kill relay,crash postgres'")
    parser.add_argument("--outage", type=float, help="seconds the destination stays down")
    args = parser.parse_args(argv)
    install_signal_handlers()
    profile = QUICK if args.quick else Profile()
    if args.only:
        profile.faults = tuple(f.strip() for f in args.only.split(","))
    if args.outage:
        profile.outage_s = args.outage
    rows, totals, log_dir = run(profile, args.seed)
    report = table(rows)
    notes = [f"- {r.fault}: {n}" for r in rows for n in r.notes]
    print("\n" + report)
    print("\n".join(notes))
    print(f"\ntotals: {totals}")
    (log_dir / "report.md").write_text(report + "\n\n" + "\n".join(notes) + f"\n\ntotals: {totals}\n")
    lost = sum(r.lost for r in rows)
    print(f"\n{f'LOST {lost} (acknowledged messages missing from the store, or their deliveries)' if lost else 'nothing acknowledged was lost'}"
          f" ({totals['seconds']:.0f}s)")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
