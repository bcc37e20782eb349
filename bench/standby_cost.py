"""What a synchronous PostgreSQL standby costs Courier's durable accepts (docs/scaling.md).

    python bench/standby_cost.py [--duration 15] [--rounds 2] [--connections 16]

Starts bench/cluster.py's engines (a primary and a streaming standby on this
machine) and one Courier web process (gunicorn, the Procfile's command) on
them, then posts unique JSON events with wrk (16 kept-alive connections as
`make bench` does, or --connections) for `duration` seconds in each mode, alternating:
- synchronous: synchronous_standby_names = 'standby', synchronous_commit = on
  (every 202 waits until the standby has the WAL on disk);
- asynchronous: synchronous_standby_names = '' (the standby streams, nobody waits);
and once, last, with the standby stopped (a single server). Prints accepts/s
and wrk's latency percentiles per mode. Both servers share this machine's
disk and cores and talk over loopback, so the round trip a real network adds
(0.1-0.5 ms within a data centre) is not in these numbers: add it per commit.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.chaos import ingest_headers, say_now  # noqa: E402
from bench.cluster import Cluster  # noqa: E402
from bench.infra import Stack, install_signal_handlers  # noqa: E402
from bench.load import run_wrk, wrk_available  # noqa: E402
from bench.measure import load_average  # noqa: E402

CONFIG = {"sources": {"lab": {"allowed_types": ["*"]}},
          "destinations": {"alpha": {"url": "http://127.0.0.1:9/alpha", "clearance": "phi"}},
          "routes": [{"match": {"source": "lab", "type": "service.completed"}, "to": ["alpha"]}]}
NAMES = {"synchronous": "standby", "asynchronous": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per mode and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of synchronous then asynchronous")
    parser.add_argument("--connections", type=int, default=16,
                        help="wrk's connections (1 shows the commit's own latency, 16 what group commit hides)")
    args = parser.parse_args(argv)
    if not wrk_available():
        print("needs wrk, the HTTP load client: apt-get install wrk", file=sys.stderr)
        return 2
    install_signal_handlers()
    base = Path(tempfile.mkdtemp(prefix="courier-standby-"))
    base.chmod(0o755)
    (base / "logs").mkdir()
    results: list[tuple[str, float, dict]] = []
    say_now(f"load average at start: {', '.join(f'{x:.2f}' for x in load_average())}")
    with Stack(base / "logs") as stack:
        stack.callback(shutil.rmtree, base, True)
        cluster = Cluster(stack, base, say_now, sync=True)
        cluster.start_engines()
        config = base / "courier.yml"
        config.write_text(yaml.safe_dump(CONFIG))
        cluster.add_nodes({"COURIER_CONFIG": str(config), "COURIER_QUEUE_PREFIX": f"standby-{cluster.tag}"})
        node = cluster.nodes["a"]
        headers = ingest_headers(node.env)
        cluster.start_node("a", kinds=("web",))
        url = f"http://127.0.0.1:{node.web_port}/api/v1/messages"
        run_wrk(url, headers, 3)  # warm-up: connections, caches, the first plans

        def measure(mode: str) -> None:
            result = run_wrk(url, headers, args.duration, connections=args.connections)
            results.append((mode, result.requests_per_s, result.latency))
            say_now(f"{mode}: {result.requests_per_s:.0f} accepts/s, latency {result.latency}, "
                    f"non-2xx {result.non_2xx}, socket errors {result.socket_errors}")

        for _ in range(args.rounds):
            for mode, names in NAMES.items():
                cluster.primary_sql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'",
                                    "SELECT pg_reload_conf()")
                cluster.sync = mode == "synchronous"
                cluster.wait_streaming()
                measure(mode)
        cluster.standby.stop("fast")
        time.sleep(1)
        measure("no standby")
    print("\n| mode | accepts/s | p50 | p99 |\n|---|---:|---:|---:|")
    for mode, rate, latency in results:
        print(f"| {mode} | {rate:.0f} | {latency.get('50%', '?')} | {latency.get('99%', '?')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
