"""Courier's benchmark: `make bench` (or `python bench/run.py [--duration 60] [--quick]`).

What it measures, each on the real processes started with the Procfile's
commands (gunicorn, `courier relay`, a threads-pool celery worker) against the
machine's PostgreSQL (a scratch database) and RabbitMQ (scratch queues):

1. raw limits with Courier's client libraries (bench/raw.py): RabbitMQ
   confirmed persistent publishes and acked consumes, PostgreSQL single-row
   commits. They are the ceilings the ratios are taken against.
2. ingest: durable accepts/s over HTTP, gunicorn alone, driven by wrk with
   unique Idempotency-Keys (bench/ingest.lua); then over MLLP, `courier mllp`
   alone, driven by 16 connections sending unique ADT^A01s and waiting for
   each ACK (bench/mllp_load.py). Both counted in the store.
3. end-to-end: each message routed to two destinations (bench/sink.py on
   loopback), first at a fixed 200 msg/s, then at saturation (a closed loop
   keeping `--window` messages undelivered, see bench/load.py). Latency is
   from the 202 to the arrival of the message's last delivery at the sink.
   Loss: every delivery id the client got in a 202 must reach the sink, once
   (duplicates are counted), and the store's counts must agree.
4. memory: peak RSS of web + relay + worker together, sampled from /proc.
5. profile: py-spy on web, relay and worker during one more saturation run
   (separate, so the numbers above are unprofiled).
6. the naive baseline (bench/naive.py) through the same client and sink.

It prints a table and writes bench/RESULTS.md (machine, command, date, load
averages, the table, CPU per component, the profile). Goals are printed next
to the numbers; nothing is asserted. Everything it creates (processes,
database, queues) is removed at the end, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from kombu import Connection  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

from bench import load, measure, mllp_load, profile, raw  # noqa: E402
from bench.infra import (BROKER_URL, ROOT, VENV_BIN, Stack, free_port, install_signal_handlers,  # noqa: E402
                         procfile_command, run_cli, stop, wait_http, wait_log)
from tests.support.config import write_config  # noqa: E402

DESTINATIONS = ("a", "b")
FIXED_RATE = 200
MLLP_CONNECTIONS = 16  # as many as wrk's, and as the ingest threads of the Procfile's 2 listener processes
# Issue 18's targets, as ratios against the naive app in the same run where they can be.
GOALS = {
    "ingest": ">= 1.0x naive", "mllp": ">= 610/s (2x 305)", "e2e": ">= 1.5x naive", "deliveries": "-",
    "p99_fixed": "<= 250 ms and <= naive", "p99_sat": "-", "loss": "0 lost", "rss": "<= 400 MB",
    "cpu_ms": "<= 4.0",
}
RESULTS = Path(__file__).with_name("RESULTS.md")
OUT = Path(__file__).with_name("out")  # logs, profiles and quick reports of each run (git-ignored)


# -- one end-to-end phase -------------------------------------------------------

@dataclass
class E2E:
    """An end-to-end phase as the client and the sink saw it."""

    offered: str
    messages: int = 0            # accepted (202) by the client
    accept_rate: float = 0.0
    errors: int = 0
    first_error: str = ""
    delivered_messages: int = 0  # every delivery of the message arrived
    deliveries: int = 0          # distinct keys at the sink, of accepted deliveries
    missing: int = 0             # accepted deliveries that never arrived
    duplicates: int = 0          # arrivals beyond the first, per key
    msgs_per_s: float = 0.0      # fully delivered messages / (last arrival - start)
    latency_ms: dict = field(default_factory=dict)
    drain_s: float = 0.0
    store: str = ""              # Courier only: the store's delivery counts by status
    cpu: dict = field(default_factory=dict)
    cpu_ms: dict = field(default_factory=dict)  # component -> CPU-ms per delivered message


def run_e2e(offered: str, url: str, headers: dict, sink: load.Sink, duration: float, roots: dict,
            drain_timeout: float, settled=lambda: True, **drive) -> E2E:
    """Drive load for `duration`, wait for the sink to get everything accepted, and reconcile.

    `settled()` says whether the system under test has nothing left to do (Courier: no open
    delivery in the store); the drain waits for it as well as for the sink's count.
    """
    sink.dump()  # start from an empty sink
    with measure.CpuAccount(roots) as cpu:
        started = time.time()
        got = load.drive(url, headers, duration, sink=sink, **drive)
        drain_s = _drain(sink, len(got.accepted), settled, drain_timeout)
    arrived = sink.dump()
    result = E2E(offered, got.messages, got.rate, got.errors, got.first_error, drain_s=drain_s, cpu=cpu.result)
    _reconcile(result, got.accepted, arrived, started)
    result.cpu_ms = cpu.per_message(result.delivered_messages)
    return result


def _drain(sink: load.Sink, expected: int, settled, timeout: float) -> float:
    """Seconds until the sink has `expected` distinct keys and `settled()`, or `timeout` with no progress."""
    t0 = last_progress = time.monotonic()
    seen = -1
    while True:
        now_seen = sink.distinct()
        if now_seen >= expected and settled():
            return time.monotonic() - t0
        if now_seen != seen:
            seen, last_progress = now_seen, time.monotonic()
        if time.monotonic() - last_progress > timeout:
            return time.monotonic() - t0
        time.sleep(0.2)


def _reconcile(result: E2E, accepted: dict, arrived: dict, started: float) -> None:
    last_arrival, latencies = {}, []
    for delivery_id, (message_no, _) in accepted.items():
        hit = arrived.get(delivery_id)
        if hit is None:
            result.missing += 1
            last_arrival[message_no] = None
            continue
        result.deliveries += 1
        result.duplicates += hit[0] - 1
        if message_no not in last_arrival or last_arrival[message_no] is not None:
            last_arrival[message_no] = max(last_arrival.get(message_no) or 0.0, hit[1])
    accepted_at = {message_no: t for message_no, t in accepted.values()}
    for message_no, t in last_arrival.items():
        if t is not None:
            latencies.append(1000 * (t - accepted_at[message_no]))
    result.delivered_messages = len(latencies)
    ends = [t for t in last_arrival.values() if t is not None]
    result.msgs_per_s = len(latencies) / (max(ends) - started) if ends else 0.0
    result.latency_ms = measure.percentiles(latencies)


# -- Courier ----------------------------------------------------------------------

class Courier:
    """Courier's processes on a scratch database and queue prefix, routing every message to a and b."""

    def __init__(self, stack: Stack, sink_port: int, workdir: Path):
        self.stack = stack
        self.db_url = stack.database("courier")
        queues = [f"{kind}.{d}" for kind in ("deliver", "dead") for d in DESTINATIONS] + ["default"]
        prefix = stack.queue_prefix("courier", queues, ["deliver", "dead"])
        config = write_config(workdir / "courier.yml",
                              {d: f"http://127.0.0.1:{sink_port}/{d}" for d in DESTINATIONS},
                              timeout="10s", retry={"max_attempts": 10, "initial": "1s", "max": "10s"})
        allow_mllp(config, "lab")
        self.port = free_port()
        self.env = {"DATABASE_URL": self.db_url, "BROKER_URL": BROKER_URL, "COURIER_CONFIG": str(config),
                    "COURIER_QUEUE_PREFIX": prefix, "PORT": str(self.port)}
        self.url = f"http://127.0.0.1:{self.port}/api/v1/messages"
        self.procs = {}
        run_cli([str(VENV_BIN / "courier"), "db", "upgrade"], self.env)
        token = run_cli([str(VENV_BIN / "courier"), "tokens", "create", "--source", "lab"], self.env).split()[-1]
        self.headers = {"Authorization": f"Bearer {token}"}
        self.engine = create_engine(self.db_url)
        stack.callback(self.engine.dispose)

    def start_web(self) -> None:
        self.procs["web"] = self.stack.start("courier-web", procfile_command("web"), self.env)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", self.procs["web"], self.stack)

    def start_mllp(self) -> int:
        """Start the Procfile's `mllp` process on a free loopback port; returns the port once it listens."""
        port = free_port()
        # Loopback only: the default 0.0.0.0 would open a port to the network of a shared machine.
        self.procs["mllp"] = self.stack.start("courier-mllp", procfile_command("mllp") + " --host 127.0.0.1",
                                              {**self.env, "MLLP_PORT": str(port)})
        mllp_load.wait_listening(port, lambda: self.procs["mllp"].poll() is None)
        return port

    def stop_mllp(self) -> None:
        """Stop the MLLP listener and forget it, so later phases neither count nor profile it."""
        proc = self.procs.pop("mllp", None)
        if proc is not None:
            stop(proc)

    def start_pipeline(self) -> None:
        self.procs["relay"] = self.stack.start("courier-relay", procfile_command("relay"), self.env)
        self.procs["worker"] = self.stack.start("courier-worker", worker_command("courier.tasks.worker", "courier"),
                                                self.env)
        wait_log(self.stack, self.procs["worker"], r" ready\.")

    @property
    def roots(self) -> dict[str, int]:
        return {label: p.pid for label, p in self.procs.items()}

    def messages_stored(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(text("SELECT count(*) FROM courier_messages"))

    def settled(self) -> bool:
        """No delivery is pending, in flight or retrying."""
        with self.engine.connect() as conn:
            return not conn.scalar(text("SELECT count(*) FROM courier_deliveries "
                                        "WHERE status IN ('pending', 'in_flight', 'retrying')"))

    def stop(self) -> None:
        """Stop the processes now, so they use no CPU during the next scenario."""
        for proc in self.procs.values():
            stop(proc)

    def store_summary(self) -> str:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM courier_deliveries GROUP BY status ORDER BY 1"))
            return ", ".join(f"{status} {n}" for status, n in rows) or "empty"

    def reset(self) -> None:
        """Empty the store between phases (the processes keep running).

        A request still finishing when the load stopped may deadlock with TRUNCATE's lock: retry.
        """
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    conn.execute(text("TRUNCATE courier_attempts, courier_deliveries, courier_messages CASCADE"))
                return
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(1)


def allow_mllp(config: Path, source: str) -> None:
    """Let `source` of the routing file (its types and routes unchanged) send over MLLP from 127.0.0.1."""
    doc = yaml.safe_load(config.read_text())
    doc["sources"][source]["mllp_allow"] = ["127.0.0.1/32"]
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def worker_command(app: str, name: str) -> str:
    """The Procfile's worker command for celery app `app`, with a node name of its own.

    --without-mingle/--without-gossip keep it from syncing with other engineers' test
    workers on the same RabbitMQ (the test harness does the same).
    """
    command = procfile_command("worker").replace("courier.tasks.worker", app)
    return f"{command} -n bench-{name}-{os.getpid()}@%h --without-mingle --without-gossip"


def measured_services(stack: Stack, sink_pid: int) -> dict[str, int]:
    """The process trees measured beside the system's own: the sink, the harness (last: it started
    everything) and, when found, the PostgreSQL server in use, so other clusters count as 'other'."""
    postmaster = stack.postmaster_pid()
    return {**({"postgres": postmaster} if postmaster else {}), "sink": sink_pid, "client": os.getpid()}


def ingest(url: str, headers: dict, duration: float, roots: dict,
           extra: dict) -> tuple[load.WrkResult, measure.CpuAccount, int]:
    """wrk against the web process alone; returns wrk's result, the CPU account (of `roots` and the
    harness's `extra`) and the peak RSS (of `roots` only: the load client is not the system under test)."""
    with measure.RssSampler(roots) as rss, measure.CpuAccount({**roots, **extra}) as cpu:
        result = load.run_wrk(url, headers, duration)
    return result, cpu, rss.peak


# -- the scenarios ------------------------------------------------------------------

@dataclass
class Results:
    raw: dict = field(default_factory=dict)
    courier: dict = field(default_factory=dict)
    naive: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)        # phase -> component -> % of one core
    cpu_ms: dict = field(default_factory=dict)     # phase -> component -> CPU-ms per message
    notes: list = field(default_factory=list)


def bench_raw(stack: Stack, seconds: float, res: Results) -> None:
    print(f"raw limits ({seconds:.0f} s each)...", flush=True)
    prefix = stack.queue_prefix("raw", ["raw"], ["raw"])
    res.raw.update(raw.rabbitmq(prefix, seconds))
    res.raw.update(raw.postgresql(stack.database("raw"), seconds))


def bench_courier(stack: Stack, args, sink: load.Sink, sink_pid: int, workdir: Path, res: Results) -> None:
    courier = Courier(stack, sink.port, workdir)
    courier.start_web()
    extra = measured_services(stack, sink_pid)
    print(f"courier ingest ({args.duration:.0f} s, wrk)...", flush=True)
    wrk, cpu, rss = ingest(courier.url, courier.headers, args.duration, courier.roots, extra)
    time.sleep(2)  # requests in hand when wrk stopped still commit: count them, then empty the store
    stored = courier.messages_stored()
    res.cpu["Courier ingest"], res.cpu_ms["Courier ingest"] = cpu.result, cpu.per_message(stored)
    res.courier["ingest"] = stored / args.duration
    res.courier["ingest_wrk"] = wrk
    courier.reset()
    mllp_ingest(courier, args, extra, res)
    courier.start_pipeline()
    peaks = [rss]
    for name, drive in (("fixed", {"rate": FIXED_RATE}), ("saturation", {"window": args.window})):
        print(f"courier end-to-end, {name} ({args.duration:.0f} s)...", flush=True)
        with measure.RssSampler(courier.roots) as sampler:
            e2e = run_e2e(_offered(drive), courier.url, courier.headers, sink, args.duration,
                          {**courier.roots, **extra}, args.drain_timeout, courier.settled, **drive)
        e2e.store = courier.store_summary()
        res.courier[name], res.cpu[f"Courier e2e {name}"], res.cpu_ms[f"Courier e2e {name}"] = e2e, e2e.cpu, e2e.cpu_ms
        peaks.append(sampler.peak)
        by_process = res.courier.setdefault("rss_by_process", {})
        for label, peak in sampler.peak_by_label.items():
            by_process[label] = max(by_process.get(label, 0), peak)
        courier.reset()
    res.courier["rss"] = max(peaks)
    if args.profile:
        profile_courier(courier, args, sink, workdir, res)
    courier.stop()


def mllp_ingest(courier: Courier, args, extra: dict, res: Results) -> None:
    """Durable MLLP accepts/s of `courier mllp` alone (the idle web process stays up), then an empty store.

    A failure here is noted and the run goes on: the end-to-end phases do not depend on it.
    """
    print(f"courier MLLP ingest ({args.duration:.0f} s, {MLLP_CONNECTIONS} connections)...", flush=True)
    try:
        port = courier.start_mllp()
        roots = {"mllp": courier.procs["mllp"].pid}
        with measure.RssSampler(roots) as rss, measure.CpuAccount({**courier.roots, **extra}) as cpu:
            client = mllp_load.drive(port, args.duration, MLLP_CONNECTIONS)
        # Every frame sent has had its answer (AA only after the commit), so the count is final; unless
        # some were cut off or timed out (their commits may still land): then wait as the HTTP phase does.
        if client.other_errors or client.ae:
            time.sleep(2)
        stored = courier.messages_stored()
        res.courier["mllp"] = stored / args.duration
        res.courier["mllp_client"], res.courier["mllp_rss"] = client, rss.peak
        res.cpu["Courier MLLP ingest"], res.cpu_ms["Courier MLLP ingest"] = cpu.result, cpu.per_message(stored)
    except Exception as exc:
        res.notes.append(f"MLLP ingest failed: {type(exc).__name__}: {str(exc)[:500]} (log: courier-mllp.log)")
        print(f"MLLP ingest FAILED: {exc}", file=sys.stderr)
    finally:
        courier.stop_mllp()
        courier.reset()


def profile_courier(courier: Courier, args, sink: load.Sink, workdir: Path, res: Results) -> None:
    if not profile.py_spy():
        res.notes.append("profile skipped: py-spy not installed (`.venv/bin/pip install py-spy`)")
        return
    seconds = args.profile_seconds
    print(f"courier profile ({seconds:.0f} s at saturation, py-spy)...", flush=True)
    spies = {f"{label} {mode}": profile.record(f"{label}-{mode}", pid, seconds, workdir, gil=(mode == "cpu"),
                                                 subprocesses=(label == "web"))
             for label, pid in courier.roots.items() for mode in profile.MODES}
    e2e = run_e2e(_offered({"window": args.window}), courier.url, courier.headers, sink, seconds,
                  courier.roots, args.drain_timeout, courier.settled, window=args.window)
    for label, spy in spies.items():
        spy.wait(timeout=60)
        stacks = workdir / f"{label.replace(' ', '-')}.stacks"
        if stacks.exists() and stacks.stat().st_size:
            res.profiles[label] = profile.summarise(stacks)
        else:
            log = stacks.with_suffix(".py-spy.log")
            res.notes.append(f"profile of {label}: py-spy wrote nothing ({log.read_text()[-300:].strip()})")
    res.courier["profiled"] = e2e
    courier.reset()


def bench_naive(stack: Stack, args, sink: load.Sink, sink_pid: int, res: Results) -> None:
    prefix = stack.queue_prefix("naive", ["q"], ["q"])
    port = free_port()
    env = {"BROKER_URL": BROKER_URL, "NAIVE_QUEUE": f"{prefix}.q", "PORT": str(port),
           "NAIVE_DESTINATIONS": " ".join(f"{d}=http://127.0.0.1:{sink.port}/{d}" for d in DESTINATIONS)}
    url = f"http://127.0.0.1:{port}/api/v1/messages"
    web = stack.start("naive-web", procfile_command("web").replace("courier.app:create_app()", "bench.naive:app"), env)
    wait_http(f"http://127.0.0.1:{port}/", web, stack)
    roots, extra = {"web": web.pid}, measured_services(stack, sink_pid)
    print(f"naive ingest ({args.duration:.0f} s, wrk)...", flush=True)
    wrk, cpu, rss = ingest(url, {}, args.duration, roots, extra)
    res.naive["ingest"] = (wrk.requests - wrk.non_2xx) / args.duration
    res.cpu["naive ingest"], res.cpu_ms["naive ingest"] = cpu.result, cpu.per_message(wrk.requests - wrk.non_2xx)
    res.naive["ingest_wrk"] = wrk
    with Connection(BROKER_URL) as conn:  # what ingest queued must not reach the sink in the next phase
        conn.default_channel.queue_purge(f"{prefix}.q")
    worker = stack.start("naive-worker", worker_command("bench.naive:celery", "naive"), env)
    roots["worker"] = worker.pid
    wait_log(stack, worker, r" ready\.")
    peaks = [rss]
    for name, drive in (("fixed", {"rate": FIXED_RATE}), ("saturation", {"window": args.window})):
        print(f"naive end-to-end, {name} ({args.duration:.0f} s)...", flush=True)
        with measure.RssSampler(roots) as sampler:
            e2e = run_e2e(_offered(drive), url, {}, sink, args.duration, {**roots, **extra},
                          args.drain_timeout, **drive)
        res.naive[name], res.cpu[f"naive e2e {name}"], res.cpu_ms[f"naive e2e {name}"] = e2e, e2e.cpu, e2e.cpu_ms
        peaks.append(sampler.peak)
    res.naive["rss"] = max(peaks)


def _offered(drive: dict) -> str:
    return f"{drive['rate']} msg/s" if "rate" in drive else f"window {drive['window']} msgs"


# -- the report -----------------------------------------------------------------------

def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def _n(x, digits: int = 0) -> str:
    return f"{x:,.{digits}f}" if isinstance(x, (int, float)) else "-"


def _lat(e2e: E2E | None) -> str:
    if e2e is None or not e2e.latency_ms:
        return "-"
    return " / ".join(f"{e2e.latency_ms[p]:,.0f}" for p in (50, 95, 99))


def _loss(e2e: E2E | None) -> str:
    return "-" if e2e is None else f"{e2e.missing} lost, {e2e.duplicates} dup"


def summary_rows(res: Results, window: int) -> list[list[str]]:
    """The headline table: metric, Courier, naive, raw, Courier/naive, Courier/raw, goal."""
    c, n, r = res.courier, res.naive, res.raw
    c_sat, n_sat, c_fix, n_fix = c.get("saturation"), n.get("saturation"), c.get("fixed"), n.get("fixed")
    msgs = lambda e: e.msgs_per_s if e else None  # noqa: E731
    dels = lambda e: 2 * e.msgs_per_s if e else None  # noqa: E731
    p99 = lambda e: e.latency_ms.get(99) if e and e.latency_ms else None  # noqa: E731
    mb = lambda v: v / 2**20 if v else None  # noqa: E731
    cpu_ms = lambda e: system_cpu_ms(e.cpu_ms) if e and e.cpu_ms else None  # noqa: E731
    return [
        ["HTTP ingest, accepts/s (Courier: durable, counted in the store)", _n(c.get("ingest")), _n(n.get("ingest")),
         f"{_n(r.get('commit_8'))} PG commits/s (8 clients)", _ratio(c.get("ingest"), n.get("ingest")),
         _ratio(c.get("ingest"), r.get("commit_8")), GOALS["ingest"]],
        [f"MLLP ingest, accepts/s (Courier: durable, counted in the store; {MLLP_CONNECTIONS} connections)",
         _n(c.get("mllp")), "-", f"{_n(r.get('commit_8'))} PG commits/s (8 clients)", "-",
         _ratio(c.get("mllp"), r.get("commit_8")), GOALS["mllp"]],
        [f"end-to-end msg/s at saturation (window {window})", _n(msgs(c_sat)), _n(msgs(n_sat)), "-",
         _ratio(msgs(c_sat), msgs(n_sat)), "-", GOALS["e2e"]],
        ["deliveries/s at saturation (2 per message)", _n(dels(c_sat)), _n(dels(n_sat)),
         f"{_n(r.get('publish_1'))} confirmed publishes/s (1 publisher)", _ratio(dels(c_sat), dels(n_sat)),
         _ratio(dels(c_sat), r.get("publish_1")), GOALS["deliveries"]],
        [f"end-to-end msg/s at {FIXED_RATE} msg/s offered", _n(msgs(c_fix)), _n(msgs(n_fix)), "-",
         _ratio(msgs(c_fix), msgs(n_fix)), "-", f"{FIXED_RATE}"],
        [f"latency p50 / p95 / p99 ms at {FIXED_RATE} msg/s", _lat(c_fix), _lat(n_fix), "-",
         _ratio(p99(c_fix), p99(n_fix)) + " (p99)", "-", GOALS["p99_fixed"]],
        ["latency p50 / p95 / p99 ms at saturation", _lat(c_sat), _lat(n_sat), "-",
         _ratio(p99(c_sat), p99(n_sat)) + " (p99)", "-", GOALS["p99_sat"]],
        [f"loss at {FIXED_RATE} msg/s", _loss(c_fix), _loss(n_fix), "-", "-", "-", GOALS["loss"]],
        ["loss at saturation", _loss(c_sat), _loss(n_sat), "-", "-", "-", GOALS["loss"]],
        ["CPU-ms per message at saturation (processes + PostgreSQL + RabbitMQ)", _n(cpu_ms(c_sat), 2),
         _n(cpu_ms(n_sat), 2), "-", _ratio(cpu_ms(c_sat), cpu_ms(n_sat)), "-", GOALS["cpu_ms"]],
        ["peak RSS, all processes together, MB", _n(mb(c.get("rss"))) + _by_process(c.get("rss_by_process")),
         _n(mb(n.get("rss"))), "-",
         _ratio(c.get("rss"), n.get("rss")), "-", GOALS["rss"]],
    ]


def _by_process(peaks: dict | None) -> str:
    """Each process tree's own peak during the end-to-end phases, as " (web 150, relay 80, worker 120)"."""
    if not peaks:
        return ""
    return " (" + ", ".join(f"{label} {_n(v / 2**20)}" for label, v in peaks.items()) + ")"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def raw_rows(raw_results: dict) -> list[list[str]]:
    reference = {"publish_1": "850", "publish_4": "1,300", "consume": "4,800", "commit_1": "2,150",
                 "commit_8": "5,900"}
    names = {"publish_1": "RabbitMQ persistent publish, confirm per message, 1 publisher",
             "publish_4": "... 4 publishers", "consume": "RabbitMQ consume, ack per message (prefetch 8)",
             "commit_1": "PostgreSQL single-row INSERT per commit, 1 client", "commit_8": "... 8 clients"}
    return [[names[k], _n(v), reference[k]] for k, v in raw_results.items()]


def phase_rows(res: Results) -> list[list[str]]:
    rows = []
    for who, data in (("Courier", res.courier), ("naive", res.naive)):
        for name in ("fixed", "saturation", "profiled"):
            e = data.get(name)
            if e is None:
                continue
            rows.append([f"{who} {name}", e.offered, _n(e.messages), _n(e.accept_rate), _n(e.delivered_messages),
                         _n(e.msgs_per_s), _lat(e), str(e.missing), str(e.duplicates), _n(e.drain_s, 1),
                         f"{e.errors}" + (f" ({e.first_error[:80]})" if e.errors else ""), e.store or "-"])
    return rows


CPU_COLUMNS = ["web", "mllp", "relay", "worker", "sink", "client", "postgres", "rabbitmq", "other", "idle"]
SYSTEM = ("web", "mllp", "relay", "worker", "postgres", "rabbitmq")  # the system under test: not sink, client, other


def cpu_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    rows = [[phase] + [_n(shares.get(c, 0.0)) for c in CPU_COLUMNS] for phase, shares in res.cpu.items()]
    return ["phase (% of one core; 200 = both)"] + CPU_COLUMNS, rows


def cpu_ms_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    """CPU-ms per message by process, and the system's total (its processes with PostgreSQL and RabbitMQ)."""
    columns = [c for c in CPU_COLUMNS if c not in ("idle", "other")]
    rows = [[phase] + [_n(ms.get(c, 0.0), 2) for c in columns] + [_n(system_cpu_ms(ms), 2)]
            for phase, ms in res.cpu_ms.items() if ms]
    return ["phase (CPU-ms per message)"] + columns + ["system total"], rows


def system_cpu_ms(ms: dict) -> float:
    return sum(ms.get(c, 0.0) for c in SYSTEM)


def ingest_lines(res: Results) -> list[str]:
    lines = []
    for who, data in (("Courier", res.courier), ("naive", res.naive)):
        w = data.get("ingest_wrk")
        if w:
            lat = ", ".join(f"{k} {v}" for k, v in w.latency.items())
            lines.append(f"- {who} HTTP: wrk {w.requests_per_s:,.0f} req/s, {w.requests:,} requests, "
                         f"{w.non_2xx} non-2xx, socket errors: {w.socket_errors}; latency {lat}")
    m = res.courier.get("mllp_client")
    if m:
        lat = " / ".join(f"{m.latency_ms[p]:,.1f}" for p in (50, 95, 99))
        first = f" (first: {m.first_error[:120]})" if m.errors else ""
        lines.append(f"- Courier MLLP: {m.connections} connections, {m.sent:,} ADT^A01 sent, {m.accepted:,} AA "
                     f"({m.rate:,.0f}/s), {m.ae} AE, {m.ar} AR, {m.other_errors} other errors{first}; "
                     f"send to ACK p50 / p95 / p99 {lat} ms; listener peak RSS "
                     f"{_n(res.courier['mllp_rss'] / 2**20)} MB")
    return lines


def profile_section(res: Results) -> list[str]:
    out = []
    for label, prof in res.profiles.items():
        out += [f"### {label}: {prof.samples:,} samples at {profile.RATE} Hz ({profile.MODES[label.split()[-1]]})", "",
                "Self (on top of the stack):", ""]
        out += [f"- {share:5.1f}%  `{frame}`" for frame, share in prof.self_top]
        out += ["", "Inclusive (Courier's functions and the library calls under them):", ""]
        out += [f"- {share:5.1f}%  `{frame}`" for frame, share in prof.inclusive_top]
        out.append("")
    return out


def write_report(path: Path, res: Results, args, info: dict, loads: tuple, started: datetime.datetime,
                 elapsed: float) -> str:
    header = ["metric", "Courier", "naive", "raw limit", "Courier/naive", "Courier/raw", "goal"]
    summary = markdown_table(header, summary_rows(res, args.window))
    noisy = loads[0][0] > 0.5 or any(s.get("other", 0) > 20 for s in res.cpu.values())
    cpu_header, cpu_table = cpu_rows(res)
    doc = [
        "# Courier benchmark results", "",
        f"Command: `{args.command}`  ",
        f"Date: {started:%Y-%m-%d %H:%M} (local), {elapsed / 60:.1f} minutes  ",
        f"Load average at start: {' '.join(f'{x:.2f}' for x in loads[0])}; at end: "
        f"{' '.join(f'{x:.2f}' for x in loads[1])} (1, 5, 15 min)  ",
        "**Noisy run**: other work was using this machine (load at start > 0.5 or 'other' CPU > 20% "
        "in a phase); rerun on a quiet machine for the record." if noisy else "Quiet run.", "",
        "## Machine", "",
        *[f"- {k}: {v}" for k, v in info.items()], "",
        "## Results", "",
        f"Duration {args.duration:.0f} s per phase; two HTTP destinations per message (bench/sink.py on loopback); "
        "goals are goals, not assertions.", "",
        summary, "",
        "Ingest, as wrk and the MLLP client saw it:", "", *ingest_lines(res), "",
        "### End-to-end phases", "",
        markdown_table(["phase", "offered", "accepted", "accepts/s", "delivered msgs", "e2e msg/s",
                        "p50/p95/p99 ms", "lost", "dup", "drain s", "client errors", "store after"],
                       phase_rows(res)), "",
        "### Raw limits of this machine (same client libraries)", "",
        markdown_table(["what", "ops/s", "machine's raw limit (docs/benchmarks.md)"], raw_rows(res.raw)), "",
        "### CPU by component", "",
        "From /proc; 'client' is the harness (load client, wrk, py-spy), 'other' is everything else on the "
        "machine (other people's work).", "",
        markdown_table(cpu_header, cpu_table), "",
        "### CPU-ms per message", "",
        "CPU time of each process tree during the phase divided by the messages it stored (ingest) or "
        "delivered to both destinations (end-to-end); 'system total' is Courier's processes (or the naive "
        "app's) with PostgreSQL and RabbitMQ, without the load client and the sink.", "",
        markdown_table(*cpu_ms_rows(res)), "",
        "## Where the time goes (py-spy, saturation run)", "",
        *profile_section(res),
        *(["## Notes", "", *[f"- {n}" for n in res.notes], ""] if res.notes else []),
    ]
    path.write_text("\n".join(doc) + "\n" + _kept_analysis(path))
    return summary


ANALYSIS_MARKER = "<!-- analysis: written by hand, kept when bench/run.py rewrites this file -->"


def _kept_analysis(path: Path) -> str:
    """The hand-written analysis at the end of the previous report, if any: a rerun keeps it for editing."""
    previous = path.read_text() if path.exists() else ""
    return previous[previous.index(ANALYSIS_MARKER):] if ANALYSIS_MARKER in previous else ""


# -- main --------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load phase (default 60)")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per phase, to check the harness works (writes bench/out/)")
    parser.add_argument("--window", type=int, default=1000,
                        help="saturation: messages accepted but not yet delivered, at most (default 1000)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy run")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--output", type=Path, help="where to write the report (default bench/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 5.0)
    args.raw_seconds = 2.0 if args.quick else 10.0
    args.profile_seconds = min(args.duration, 30.0)
    args.drain_timeout = 20.0 if args.quick else 60.0  # seconds without any delivery before giving up
    args.output = args.output or (OUT / "RESULTS.quick.md" if args.quick else RESULTS)
    args.command = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    return args



def service_versions(stack: Stack) -> tuple[str, str]:
    engine = create_engine(stack.database("probe"))
    with engine.connect() as conn:
        pg = conn.scalar(text("SHOW server_version"))
    engine.dispose()
    with Connection(BROKER_URL) as conn:
        conn.connect()
        version = conn.connection.server_properties.get("version", "?")
    return pg, version.decode() if isinstance(version, bytes) else str(version)


def main() -> None:
    args = parse_args()
    install_signal_handlers()
    started, t0, load_start = datetime.datetime.now(), time.monotonic(), measure.load_average()
    workdir = OUT / f"{started:%Y%m%d-%H%M%S}"
    workdir.mkdir(parents=True, exist_ok=True)
    res = Results()
    print(f"logs, stacks: {workdir}", flush=True)
    with Stack(workdir) as stack:
        info = measure.machine(*service_versions(stack))
        sink_port = free_port()
        sink_proc = stack.start("sink", f"{sys.executable} bench/sink.py {sink_port}", {})
        wait_http(f"http://127.0.0.1:{sink_port}/_count", sink_proc, stack)
        sink = load.Sink(sink_port)
        bench_raw(stack, args.raw_seconds, res)
        try:
            bench_courier(stack, args, sink, sink_proc.pid, workdir, res)
            if not args.skip_naive:
                bench_naive(stack, args, sink, sink_proc.pid, res)
        except Exception as exc:  # still report what was measured; the logs say the rest
            res.notes.append(f"run stopped early: {type(exc).__name__}: {str(exc)[:500]}")
            print(f"FAILED: {exc}", file=sys.stderr)
    loads = (load_start, measure.load_average())
    summary = write_report(args.output, res, args, info, loads, started, time.monotonic() - t0)
    print(summary)
    print(f"\nload average start {load_start[0]:.2f}, end {loads[1][0]:.2f}; full report: "
          f"{args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
