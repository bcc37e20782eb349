"""What encryption at rest costs: seal/unseal per body size, and ingest accepts/s with and without a key.

    .venv/bin/python bench/encryption.py [--messages 500] [--threads 1 8] [--rounds 9]

Needs the local PostgreSQL (as `make test`). The first table times `app.crypto`'s seal and unseal
(Fernet) of random bodies; the second calls `app.ingest.ingest()` (what HTTP and MLLP both run)
against a scratch database at Alembic head with no key and with COURIER_ENCRYPTION_KEY's ring
installed, in alternating short rounds (as bench/ratelimit.py), and prints the median. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alembic import command  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from app import crypto  # noqa: E402
from app.cli import alembic_config  # noqa: E402
from app.db import Store  # noqa: E402
from bench.infra import Stack  # noqa: E402
from bench.ratelimit import accepts_per_second, write_routing  # noqa: E402


def seal_costs(ring: crypto.KeyRing) -> None:
    print(f"{'body':>8} {'seal µs':>9} {'unseal µs':>10} {'stored/plain':>13}")
    for size in (2_048, 65_536, 1_048_576):
        body = os.urandom(size)
        stored = ring.seal(body)
        number = max(5, 20_000_000 // size)
        seal = min(timeit.repeat(lambda: ring.seal(body), number=number, repeat=5)) / number
        unseal = min(timeit.repeat(lambda: ring.unseal(stored), number=number, repeat=5)) / number
        print(f"{size:>8} {seal * 1e6:>9.1f} {unseal * 1e6:>10.1f} {len(stored) / size:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    plain, keyed = crypto.KeyRing(), crypto.parse_keys(Fernet.generate_key().decode())
    seal_costs(keyed)
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp)) as stack:
        url = stack.database("encryption")
        command.upgrade(alembic_config(url), "head")
        routing = write_routing(Path(tmp))
        store = Store(url, pool_size=max(args.threads) + 2)
        stack.callback(store.dispose)
        for ring in (plain, keyed):  # warm: connections, prepared statements
            crypto.install(ring)
            accepts_per_second(store, routing, "free", 200, 4, f"warm-{ring.current_id}")
        print(f"\n{args.messages} ingests per round, {args.rounds} rounds, median accepts/s (PostgreSQL, in-process)")
        print(f"{'threads':>7} {'no key':>8} {'key':>8} {'change':>7}")
        for threads in args.threads:
            runs: dict[str, list[float]] = {"plain": [], "keyed": []}
            for r in range(args.rounds):
                for name in ("plain", "keyed") if r % 2 == 0 else ("keyed", "plain"):
                    crypto.install(plain if name == "plain" else keyed)
                    runs[name].append(accepts_per_second(store, routing, "free", args.messages, threads,
                                                         f"{name}-t{threads}-r{r}"))
            p, k = statistics.median(runs["plain"]), statistics.median(runs["keyed"])
            print(f"{threads:>7} {p:>8.0f} {k:>8.0f} {100 * (k / p - 1):>+6.0f}%")
        crypto.install(plain)


if __name__ == "__main__":
    main()
