"""What a source's rate limit costs an ingest: accepts/s of one source with and without a limit.

    .venv/bin/python bench/ratelimit.py [--messages 500] [--threads 1 8] [--rounds 9]

Needs the local PostgreSQL (as `make test`). Creates a scratch database at Alembic head and
calls `courier.app.ingest.ingest()` (what HTTP and MLLP both run) N times for source `free` (no limit)
and for source `limited` (a limit too high to refuse anything, so every ingest pays the extra
transaction and nothing is refused), from 1 and from 8 threads: with 8, every ingest of the
source takes the same row lock, the worst case for the shared row. Rounds alternate the two
sources (short rounds, so load from elsewhere hits both alike); the median round is printed, and
the extra milliseconds per ingest it implies. Also times `ratelimit.take()` alone. Asserts nothing.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from courier.app.store import ratelimit  # noqa: E402
from courier.app.store.db import Store  # noqa: E402
from bench.inprocess import accepts_per_second, alternating_medians, arguments, scratch  # noqa: E402

HIGH = "100000000/s"  # never refuses at these rates: the benchmark measures the check, not refusals


def takes_per_second(store: Store, routing, n: int, threads: int) -> float:
    limit = routing.sources["limited"].rate_limit
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        assert all(w is None for w in pool.map(lambda _: ratelimit.take(store, "limited", limit), range(n)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    args = arguments(__doc__)
    with scratch("ratelimit", {"free": {}, "limited": {"rate_limit": HIGH}}, max(args.threads)) as (store, routing):
        accepts_per_second(store, routing, "free", 200, 4, "warm")  # connections, prepared statements
        accepts_per_second(store, routing, "limited", 200, 4, "warm")
        print(f"{args.messages} ingests per round, {args.rounds} rounds, median accepts/s (PostgreSQL, in-process)")
        print(f"{'threads':>7} {'no limit':>10} {'limited':>10} {'change':>7} {'ms/ingest':>9} {'take() alone':>13}")
        for threads in args.threads:
            medians = alternating_medians({source: lambda tag, source=source: accepts_per_second(
                store, routing, source, args.messages, threads, f"t{threads}-{tag}") for source in ("free", "limited")},
                args.rounds)
            free, limited = medians["free"], medians["limited"]
            take = takes_per_second(store, routing, args.messages, threads)
            extra_ms = 1000 * threads * (1 / limited - 1 / free)  # per ingest, as one thread sees it
            print(f"{threads:>7} {free:>10.0f} {limited:>10.0f} {100 * (limited / free - 1):>+6.0f}% "
                  f"{extra_ms:>+9.2f} {take:>13.0f}")


if __name__ == "__main__":
    main()
