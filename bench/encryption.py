"""What encryption at rest costs: seal/unseal per body size, and ingest accepts/s with and without a key.

    .venv/bin/python bench/encryption.py [--messages 500] [--threads 1 8] [--rounds 9]

Needs the local PostgreSQL (as `make test`). The first table times `courier.app.store.crypto`'s seal and unseal
(Fernet) of random bodies; the second calls `courier.app.ingest.ingest()` (what HTTP and MLLP both run)
against a scratch database at Alembic head with no key and with COURIER_ENCRYPTION_KEY's ring
installed, in alternating short rounds (bench/inprocess.py, as bench/ratelimit.py), and prints the median. Asserts nothing.
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.fernet import Fernet  # noqa: E402

from courier.app.store import crypto  # noqa: E402
from bench.inprocess import accepts_per_second, alternating_medians, arguments, scratch  # noqa: E402


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
    args = arguments(__doc__)
    rings = {"plain": crypto.KeyRing(), "keyed": crypto.parse_keys(Fernet.generate_key().decode())}
    seal_costs(rings["keyed"])
    with scratch("encryption", {"free": {}}, max(args.threads)) as (store, routing):
        def ingest_under(name: str, n: int, threads: int, tag: str) -> float:
            crypto.attach(store.engine, rings[name], replace=True)
            return accepts_per_second(store, routing, "free", n, threads, tag)

        for name in rings:  # warm: connections, prepared statements
            ingest_under(name, 200, 4, f"warm-{name}")
        print(f"\n{args.messages} ingests per round, {args.rounds} rounds, median accepts/s (PostgreSQL, in-process)")
        print(f"{'threads':>7} {'no key':>8} {'key':>8} {'change':>7}")
        for threads in args.threads:
            medians = alternating_medians({name: lambda tag, name=name: ingest_under(
                name, args.messages, threads, f"t{threads}-{tag}") for name in rings}, args.rounds)
            p, k = medians["plain"], medians["keyed"]
            print(f"{threads:>7} {p:>8.0f} {k:>8.0f} {100 * (k / p - 1):>+6.0f}%")


if __name__ == "__main__":
    main()
