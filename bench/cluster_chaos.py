"""`make cluster-chaos`: node failures under load on the scale-out set-up of `make cluster`.

    python bench/cluster_chaos.py [--quick] [--seed N] [--async-standby]

Starts bench/cluster.py's cluster (three RabbitMQ nodes, a PostgreSQL primary
with a synchronous standby, two Courier nodes a and b), with bench/chaos.py's
destinations (two HTTP sinks, a file drop) and load (JSON events over HTTP and
HL7 over MLLP, half to each Courier node, as HAProxy would spread it). Then,
one fault per phase, at a random moment under load:

- kill rabbitmq node: SIGKILL RabbitMQ node 1 (first in node a's broker list,
  where the quorum queues' leaders start), restarted after a pause; it rejoins;
- kill courier node: SIGKILL every process of Courier node b (web, mllp, relay,
  worker), restarted after a pause; node a carries on;
- fail over postgres: the primary crashes (`pg_ctl stop -m immediate`), and
  after a pause the standby is promoted (`pg_ctl promote`, what Patroni or
  pg_auto_failover would do); Courier finds it through DATABASE_URL's
  `target_session_attrs=read-write`. Last, because no new standby is made.

After each it drains and reconciles every 202 and AA against the store and
the destinations exactly as bench/chaos.py does (lost, duplicates, time to
recover from the fault's end until the backlog it left is closed), and
measures the longest stretch without a delivery from the fault's start
(the delivery stall). Exit status 1 if anything acknowledged was lost; the
full run writes the table to bench/CLUSTER.md, --quick (CI) to bench/out/.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402

from bench.chaos import Chaos, Profile, Row, ingest_headers, run  # noqa: E402
from bench.cluster import KINDS, NODES, Cluster  # noqa: E402
from bench.infra import ROOT, install_signal_handlers  # noqa: E402
from courier.app.service_urls import database_url  # noqa: E402

FULL = Profile(http_rate=30.0, mllp_rate=6.0, phase_s=30.0, drain_s=180.0,
               faults=("baseline", "kill rabbitmq node", "kill courier node", "fail over postgres"))
QUICK = Profile(http_rate=20.0, mllp_rate=4.0, phase_s=12.0, drain_s=120.0,
                faults=("kill rabbitmq node", "kill courier node", "fail over postgres"))


class ClusterChaos(Chaos):
    """bench/chaos.py's phases and reconciliation, on two Courier nodes and the engines' clusters."""

    def __init__(self, *args, sync: bool = True):
        super().__init__(*args)
        self.sync = sync

    def setup(self) -> None:
        t0 = time.monotonic()
        self.cluster = Cluster(self.stack, self.base, self.say, sync=self.sync)
        self.cluster.start_engines()
        self.db_url = self.cluster.database_url
        self.engine = create_engine(database_url(self.db_url), pool_pre_ping=True, pool_size=2)
        self.stack.callback(self.engine.dispose)
        config = self.destinations()
        self.cluster.add_nodes({"COURIER_CONFIG": str(config), "COURIER_QUEUE_PREFIX": f"cluster-{self.tag}",
                                "COURIER_RELAY_LEASE": "10s", "PYTHONUNBUFFERED": "1", "COURIER_LOG_LEVEL": "INFO"})
        self.nodes = self.cluster.nodes
        self.headers = ingest_headers(self.nodes[NODES[0]].env)
        for node in NODES:
            for kind in KINDS:
                self.start(f"{kind}-{node}")
        queues = self.cluster.queues(f"cluster-{self.tag}")
        single = {name: q for name, q in queues.items() if q != ("quorum", 3)}
        if single or not queues:
            raise RuntimeError(f"Courier's queues are not quorum queues on all three nodes: {single or queues}")
        self.say(f"{len(queues)} queues, each a quorum queue with a member on every RabbitMQ node")
        self.say(f"Courier nodes up ({', '.join(f'{n}: web :{c.web_port}, mllp :{c.mllp_port}' for n, c in self.nodes.items())})"
                 f" in {time.monotonic() - t0:.1f}s")

    def fault(self, name: str) -> tuple[Callable[[], None], Callable[[], None], float]:
        inject, restore, lasts = self._fault(name)

        def timed() -> None:  # the delivery stall is measured from here
            self.fault_at = datetime.datetime.now(datetime.timezone.utc)
            inject()
        return timed, restore, lasts

    def _fault(self, name: str) -> tuple[Callable[[], None], Callable[[], None], float]:
        pause = self.rng.uniform(1.0, 3.0)
        if name == "kill rabbitmq node":
            rabbit = self.cluster.rabbits[0]

            def back() -> None:
                self.say(f"  RabbitMQ node 1 booted again in {rabbit.start():.1f}s")
            return rabbit.kill, back, pause
        if name == "kill courier node":
            labels = [f"{kind}-{NODES[1]}" for kind in KINDS]
            return (lambda: [self.kill(label) for label in labels]), \
                   (lambda: [self.start(label) for label in labels]), pause
        if name == "fail over postgres":
            return (lambda: self.cluster.primary.stop("immediate")), self.cluster.standby.promote, pause
        return super().fault(name)

    def phase(self, name: str) -> Row:
        row = super().phase(name)
        if row.recover_s is not None:
            row.notes.append(f"longest stretch without a delivery: {self.stall():.1f} s")
        return row

    def stall(self) -> float:
        """Seconds of the longest stretch without a delivered attempt, from the fault until now."""
        started = self._retry_db(lambda c: c.execute(text(
            "SELECT started_at FROM courier_attempts WHERE outcome = 'delivered' AND started_at >= :t "
            "ORDER BY started_at"), {"t": self.fault_at}).scalars().all())
        marks = [self.fault_at, *started]
        return max((b - a).total_seconds() for a, b in zip(marks, marks[1:])) if started else float("nan")


def table(rows: list[Row]) -> str:
    lines = ["| fault | accepted | refused (no ack) | lost | duplicates | dead | failed attempts | time to recover "
             "| longest delivery stall |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stall = next((n.split(": ")[1] for n in r.notes if n.startswith("longest stretch")), "-")
        recover = "never" if r.recover_s is None else f"{r.recover_s:.1f} s"
        lines.append(f"| {r.fault} | {r.accepted} | {r.refused} | {r.lost} | {r.duplicates} | {r.dead} | "
                     f"{r.failed_attempts} | {recover} | {stall} |")
    return "\n".join(lines)


def machine() -> str:
    cpus = os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rabbit = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True,
                            text=True).stdout or "?"
    pg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postgresql"], capture_output=True,
                        text=True).stdout or "?"
    return (f"{platform.node()}, {cpus} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, RabbitMQ {rabbit}, PostgreSQL {pg}; load average at start {load}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short version .ci/run runs (about 3 minutes)")
    parser.add_argument("--seed", type=int, help="random seed for the fault moments (printed otherwise)")
    parser.add_argument("--async-standby", action="store_true",
                        help="an asynchronous standby: shows what a failover can lose without a synchronous one")
    args = parser.parse_args(argv)
    install_signal_handlers()
    started = machine()
    suite = functools.partial(ClusterChaos, sync=not args.async_standby)
    rows, totals, log_dir = run(QUICK if args.quick else FULL, args.seed, suite=suite, name="cluster")
    report = table(rows)
    notes = "\n".join(f"- {r.fault}: {n}" for r in rows for n in r.notes)
    lost = sum(r.lost for r in rows)
    verdict = (f"LOST {lost} (acknowledged messages missing from the store, or their deliveries)" if lost
               else "nothing acknowledged was lost")
    print(f"\n{report}\n{notes}\n\ntotals: {totals}\n\n{verdict} ({totals['seconds']:.0f}s)")
    command = "make cluster-chaos" + (" CLUSTER_CHAOS_ARGS=--quick" if args.quick else "")
    record = (f"# Cluster failure run\n\n`{command}` (bench/cluster_chaos.py, seed {totals['seed']}), "
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}, on {started}.\n"
              f"{'Synchronous' if not args.async_standby else 'Asynchronous'} standby. {verdict}; "
              f"{totals['seconds']:.0f} s in all.\n\n{report}\n\n{notes}\n\ntotals: "
              f"{ {k: v for k, v in totals.items() if k != 'lost_detail'} }\n")
    (log_dir / "report.md").write_text(record)
    if not args.quick:
        (ROOT / "bench" / "CLUSTER.md").write_text(record)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
