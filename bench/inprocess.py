"""The in-process A/B harness of bench/ratelimit.py and bench/encryption.py: `courier.app.ingest.ingest()`
(what HTTP and MLLP both run) against a scratch PostgreSQL database at Alembic head, two variants
measured in alternating short rounds (so load from elsewhere hits both alike), medians compared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from alembic import command  # noqa: E402

from courier.app.store.schema import alembic_config  # noqa: E402
from courier.app.store.db import Store  # noqa: E402
from courier.app.ingest import ingest  # noqa: E402
from courier.app.settings import RoutingConfig
from courier.app.config import load_routing  # noqa: E402
from bench.infra import Stack  # noqa: E402


def arguments(doc: str) -> argparse.Namespace:
    """--messages per round, --threads to try, --rounds per variant: the options both benchmarks take."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    return parser.parse_args()


@contextmanager
def scratch(name: str, sources: dict, threads: int) -> Iterator[tuple[Store, RoutingConfig]]:
    """A migrated scratch database and a routing of `sources` to one file destination, for `threads`."""
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp)) as stack:
        url = stack.database(name)
        command.upgrade(alembic_config(url), "head")
        path = Path(tmp) / "courier.yml"
        path.write_text(yaml.safe_dump({
            "sources": sources,
            "destinations": {"erp": {"url": f"file://{tmp}/erp", "clearance": "phi"}},
            "routes": [{"match": {"source": "*", "type": "*"}, "to": ["erp"]}],
        }))
        store = Store(url, pool_size=threads + 2)
        stack.callback(store.dispose)
        yield store, load_routing(path, {})


def accepts_per_second(store: Store, routing, source: str, n: int, threads: int, tag: str) -> float:
    """n ingests of unique JSON events for `source` from `threads` threads; accepts per second."""
    def one(i: int) -> None:
        body = json.dumps({"type": "lab.result", "id": f"{tag}-{i}", "data": {"n": i}}).encode()
        results, _ = ingest(store, routing, source=source, content_type="application/json", body=body)
        assert results[0].created

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t0)


def alternating_medians(variants: dict[str, Callable[[str], float]], rounds: int) -> dict[str, float]:
    """Each variant's median over `rounds`, run in alternating order (A B, B A, ...); a variant gets a unique tag."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(variants[name](f"{name}-r{r}"))
    return {name: statistics.median(values) for name, values in runs.items()}
