"""What a source's rate limit costs an ingest: accepts/s of one source with and without a limit.

    .venv/bin/python bench/ratelimit.py [--messages 500] [--threads 1 8] [--rounds 9]

Needs the local PostgreSQL (as `make test`). Creates a scratch database at Alembic head and
calls `app.ingest.ingest()` (what HTTP and MLLP both run) N times for source `free` (no limit)
and for source `limited` (a limit too high to refuse anything, so every ingest pays the extra
transaction and nothing is refused), from 1 and from 8 threads: with 8, every ingest of the
source takes the same row lock, the worst case for the shared row. Rounds alternate the two
sources (short rounds, so load from elsewhere hits both alike); the median round is printed, and
the extra milliseconds per ingest it implies. Also times `ratelimit.take()` alone. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from alembic import command  # noqa: E402

from app import ratelimit  # noqa: E402
from app.cli import alembic_config  # noqa: E402
from app.db import Store  # noqa: E402
from app.ingest import ingest  # noqa: E402
from app.settings import load_routing  # noqa: E402
from bench.infra import Stack  # noqa: E402

HIGH = "100000000/s"  # never refuses at these rates: the benchmark measures the check, not refusals


def write_routing(workdir: Path):
    path = workdir / "courier.yml"
    path.write_text(yaml.safe_dump({
        "sources": {"free": {}, "limited": {"rate_limit": HIGH}},
        "destinations": {"erp": {"url": f"file://{workdir}/erp", "clearance": "phi"}},
        "routes": [{"match": {"source": "*", "type": "*"}, "to": ["erp"]}],
    }))
    return load_routing(path, {})


def accepts_per_second(store: Store, routing, source: str, n: int, threads: int, tag: str) -> float:
    def one(i: int) -> None:
        body = json.dumps({"type": "lab.result", "id": f"{tag}-{i}", "data": {"n": i}}).encode()
        results, _ = ingest(store, routing, source=source, content_type="application/json", body=body)
        assert results[0].created

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0)


def takes_per_second(store: Store, routing, n: int, threads: int) -> float:
    limit = routing.sources["limited"].rate_limit
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        assert all(w is None for w in pool.map(lambda _: ratelimit.take(store, "limited", limit), range(n)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp)) as stack:
        url = stack.database("ratelimit")
        command.upgrade(alembic_config(url), "head")
        routing = write_routing(Path(tmp))
        store = Store(url, pool_size=max(args.threads) + 2)
        stack.callback(store.dispose)
        accepts_per_second(store, routing, "free", 200, 4, "warm")  # connections, prepared statements
        accepts_per_second(store, routing, "limited", 200, 4, "warm")
        print(f"{args.messages} ingests per round, {args.rounds} rounds, median accepts/s (PostgreSQL, in-process)")
        print(f"{'threads':>7} {'no limit':>10} {'limited':>10} {'change':>7} {'ms/ingest':>9} {'take() alone':>13}")
        for threads in args.threads:
            runs: dict[str, list[float]] = {"free": [], "limited": []}
            for r in range(args.rounds):
                for source in ("free", "limited") if r % 2 == 0 else ("limited", "free"):
                    runs[source].append(accepts_per_second(store, routing, source, args.messages, threads,
                                                           f"t{threads}-r{r}"))
            free, limited = statistics.median(runs["free"]), statistics.median(runs["limited"])
            take = takes_per_second(store, routing, args.messages, threads)
            extra_ms = 1000 * threads * (1 / limited - 1 / free)  # per ingest, as one thread sees it
            print(f"{threads:>7} {free:>10.0f} {limited:>10.0f} {100 * (limited / free - 1):>+6.0f}% "
                  f"{extra_ms:>+9.2f} {take:>13.0f}")


if __name__ == "__main__":
    main()
