"""`make cluster`: Courier scaled out on the engines it already uses, on this one machine.

    python bench/cluster.py [--async-standby] [--keep]

Starts, each on its own ports and in a scratch folder (the machine's own
PostgreSQL and RabbitMQ are not touched):
- RabbitMQ: three nodes (`rabbit1-<tag>@localhost` ...) with one Erlang cookie,
  nodes 2 and 3 joined to node 1 (`rabbitmqctl join_cluster`), so Courier's
  quorum queues get a member on each;
- PostgreSQL: a primary and a streaming standby (`pg_basebackup -R`), the
  standby synchronous (`synchronous_standby_names = 'standby'`) unless
  --async-standby; docs/scaling.md says why Courier recommends it;
- two Courier nodes, `a` and `b`: web (gunicorn), mllp, relay and worker each,
  with the Procfile's commands, on one store and one broker: DATABASE_URL is a
  libpq multi-host URL (primary, standby; target_session_attrs=read-write),
  BROKER_URL a kombu failover list starting with a different node per Courier
  node. COURIER_CONFIG (default: examples/courier.yml, as for `make run`) routes.

It prints each node's addresses, writes the shared environment to
instance/cluster.env (`set -a; . instance/cluster.env; set +a` and the
`courier` commands work against the cluster), and runs until Ctrl-C; then
everything it started is stopped and removed (--keep leaves the scratch folder).
bench/cluster_chaos.py (`make cluster-chaos`) runs faults through the same set-up.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text  # noqa: E402

from bench.chaos import CourierNode, create_database, free_block, node_env, say_now, start_courier  # noqa: E402
from bench.chaos_services import PgCluster, RabbitNode, missing_services  # noqa: E402
from bench.infra import ROOT, VENV_BIN, Stack, install_signal_handlers, run_cli  # noqa: E402

KINDS = ("web", "mllp", "relay", "worker")
NODES = ("a", "b")


class Cluster:
    """Three RabbitMQ nodes, a PostgreSQL primary and standby, and the Courier nodes on them."""

    def __init__(self, stack: Stack, base: Path, say: Callable[[str], None], sync: bool = True):
        self.stack, self.base, self.say, self.sync = stack, base, say, sync
        self.tag = secrets.token_hex(3)
        self.nodes: dict[str, CourierNode] = {}
        self.procs: dict = {}

    # -- the engines -------------------------------------------------------------

    def start_engines(self) -> None:
        t0 = time.monotonic()
        cookie = secrets.token_hex(20)
        self.rabbits = [RabbitNode(self.base, free_block(13), self.tag, name=f"rabbit{i}", cookie=cookie)
                        for i in (1, 2, 3)]
        for node in self.rabbits:
            self.stack.callback(node.close)
        errors: list[BaseException] = []

        def boot(node: RabbitNode) -> None:
            try:
                node.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                errors.append(exc)
        threads = [threading.Thread(target=boot, args=(n,)) for n in self.rabbits]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for node in self.rabbits[1:]:
            node.join(self.rabbits[0])
        self.say(f"RabbitMQ: 3 nodes on 127.0.0.1:{','.join(str(n.port) for n in self.rabbits)}, one cluster "
                 f"({time.monotonic() - t0:.1f}s)")

        t0 = time.monotonic()
        self.primary = PgCluster(self.base, free_block(1), "primary")
        self.primary.start()
        self.stack.callback(self.primary.close)
        create_database(self.primary)
        self.standby = PgCluster(self.base, free_block(1), "standby", standby_of=self.primary)
        self.standby.start()
        self.stack.callback(self.standby.close)
        if self.sync:
            # Set on the primary after the copy, so the standby, once promoted, does not wait for itself.
            self.primary_sql("ALTER SYSTEM SET synchronous_standby_names = 'standby'", "SELECT pg_reload_conf()")
        self.wait_streaming()
        self.say(f"PostgreSQL: primary 127.0.0.1:{self.primary.port}, {'synchronous' if self.sync else 'asynchronous'}"
                 f" standby 127.0.0.1:{self.standby.port} ({time.monotonic() - t0:.1f}s)")

    def primary_sql(self, *statements: str) -> None:
        engine = create_engine(self.primary.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Until the primary streams to the standby (as its synchronous standby when sync)."""
        want = "sync" if self.sync else "async"
        engine = create_engine(self.primary.url("postgres"))
        deadline = time.monotonic() + timeout
        try:
            while True:
                with engine.connect() as conn:
                    states = conn.execute(text("SELECT sync_state FROM pg_stat_replication "
                                               "WHERE application_name = 'standby'")).scalars().all()
                if want in states:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the standby is not streaming as {want} after {timeout:.0f}s: {states}")
                time.sleep(0.2)
        finally:
            engine.dispose()

    def queues(self, prefix: str) -> dict[str, tuple[str, int]]:
        """Courier's queues of `prefix` as RabbitMQ node 1 lists them: name -> (type, number of members)."""
        out = self.rabbits[0].ctl("list_queues", "name", "type", "members", "--formatter", "json", "--quiet")
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl list_queues: {out.stdout}{out.stderr}")
        return {q["name"]: (q["type"], len(q["members"] or ())) for q in json.loads(out.stdout)
                if q["name"].startswith(f"{prefix}.")}

    @property
    def database_url(self) -> str:
        """libpq's multi-host spelling, as docs/scaling.md tells users to write it."""
        return (f"postgresql+psycopg://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
                "/courier?target_session_attrs=read-write")

    def broker_url(self, first: int) -> str:
        """The three nodes as a failover list, starting with node `first` (each Courier node its own)."""
        order = self.rabbits[first:] + self.rabbits[:first]
        return ";".join(n.url for n in order)

    # -- the Courier nodes ---------------------------------------------------------

    def add_nodes(self, env: dict[str, str]) -> None:
        """Environments for Courier nodes a and b: `env` plus the store, a broker list and their own ports."""
        for i, name in enumerate(NODES):
            self.nodes[name] = node_env(env, DATABASE_URL=self.database_url, BROKER_URL=self.broker_url(i))

    def start_node(self, node: str, kinds: tuple[str, ...] = KINDS) -> None:
        """Start the node's processes, labelled `<kind>-<node>` (web-a ...)."""
        for kind in kinds:
            self.procs[f"{kind}-{node}"] = start_courier(self.stack, f"{kind}-{node}", kind, self.nodes[node])


def write_env(cluster: Cluster, path: Path) -> None:
    env = cluster.nodes[NODES[0]].env
    keys = ("DATABASE_URL", "BROKER_URL", "COURIER_CONFIG", "COURIER_QUEUE_PREFIX")
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(f"{k}='{env[k]}'\n" for k in keys if k in env))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--async-standby", action="store_true", help="an asynchronous standby (not recommended)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (data and logs) after Ctrl-C")
    args = parser.parse_args(argv)
    missing = missing_services()
    if missing:
        print(f"cannot start the cluster here: {missing}", file=sys.stderr)
        return 2
    install_signal_handlers()
    base = Path(tempfile.mkdtemp(prefix="courier-cluster-"))
    base.chmod(0o755)
    log_dir = base / "logs"
    log_dir.mkdir()
    config = os.environ.get("COURIER_CONFIG", str(ROOT / "examples" / "courier.yml"))
    try:
        with Stack(log_dir) as stack:
            if not args.keep:
                stack.callback(shutil.rmtree, base, True)
            cluster = Cluster(stack, base, say_now, sync=not args.async_standby)
            cluster.start_engines()
            cluster.add_nodes({"COURIER_CONFIG": str(Path(config).resolve()), "PYTHONUNBUFFERED": "1",
                               "COURIER_QUEUE_PREFIX": "courier"})
            run_cli([str(VENV_BIN / "courier"), "db", "upgrade"], cluster.nodes["a"].env)  # once, for every node
            for name in NODES:
                cluster.start_node(name)
                node = cluster.nodes[name]
                say_now(f"Courier node {name}: web http://127.0.0.1:{node.web_port}, "
                        f"MLLP 127.0.0.1:{node.mllp_port}, broker list from {node.env['BROKER_URL'].split(';')[0]}")
            env_file = ROOT / "instance" / "cluster.env"
            write_env(cluster, env_file)
            stack.callback(env_file.unlink, True)  # it would point at servers that are gone
            say_now(f"environment in {env_file.relative_to(ROOT)}; logs in {log_dir}; Ctrl-C stops everything")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:  # SIGTERM too (install_signal_handlers), once; everything started is stopped
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
