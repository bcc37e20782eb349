"""Load generators: wrk for the ingest ceiling, a Python client for end-to-end runs.

wrk (Debian package `wrk`, with bench/ingest.lua for unique Idempotency-Keys)
is a C client: one thread of it posts far faster than two cores of gunicorn
answer, so the ingest number is the server's.

End-to-end runs need to know *which* deliveries were accepted and when, so
they use `drive()`: threads with a kept-alive connection each, posting JSON
events and reading the 202 body (its delivery ids). Two ways to offer load:
- `rate`: open loop, request i is due at start + i/rate whatever happened to
  the earlier ones (so a slow server shows as latency, not as a lower rate);
- `window`: closed loop on the whole pipeline: post as fast as accepted while
  fewer than `window` accepted messages are still undelivered (the sink is
  asked every 20 ms). That runs the pipeline at its sustained capacity with a
  bounded backlog; the latency then reflects that backlog (Little's law).
The client's own CPU is reported with the harness's in the CPU table, so a
reader can see it was not the bottleneck.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LUA = Path(__file__).with_name("ingest.lua")
BODY = '{"type": "service.completed", "data": {"service": "US-ABD", "patient": "P123", "n": %d}}'


@dataclass
class Load:
    """What the client saw: accepted delivery ids with the time their 202 arrived."""

    accepted: dict[str, tuple[int, float]] = field(default_factory=dict)  # delivery id -> (message no, 202 time)
    messages: int = 0
    errors: int = 0
    first_error: str = ""
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed else 0.0


class Sink:
    """The harness's handle on bench/sink.py."""

    def __init__(self, port: int):
        self.port = port

    def _get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def distinct(self) -> int:
        return self._get("/_count")["distinct"]

    def dump(self) -> dict[str, list]:
        """Every key seen since the last dump: [count, first arrival]; the sink starts afresh."""
        return self._get("/_dump")


def drive(url: str, headers: dict[str, str], duration: float, *, rate: float | None = None,
          window: int | None = None, sink: Sink | None = None, connections: int = 8) -> Load:
    """Post JSON events to `url` for `duration` seconds at `rate`/s, or within `window` (see module doc)."""
    load, lock, stop = Load(), threading.Lock(), threading.Event()
    numbers, run = itertools.count(), secrets.token_hex(4)
    delivered = [0]  # distinct deliveries at the sink, refreshed by the window thread
    start = time.monotonic()
    end = start + duration

    def may_send(i: int) -> bool:
        if rate is not None:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        else:
            while len(load.accepted) - delivered[0] >= 2 * window and time.monotonic() < end:
                time.sleep(0.002)
        return time.monotonic() < end

    def sender() -> None:
        conn = None
        for i in numbers:
            if not may_send(i):
                return
            try:
                conn = conn or _connect(url)
                conn.request("POST", urlsplit(url).path, body=BODY % i, headers={
                    **headers, "Content-Type": "application/json", "Idempotency-Key": f"{run}-{i}"})
                response = conn.getresponse()
                body, now = response.read(), time.time()
            except (OSError, http.client.HTTPException) as exc:
                conn = None
                _count_error(load, lock, f"{type(exc).__name__}: {exc}")
                continue
            if response.status != 202:
                _count_error(load, lock, f"HTTP {response.status}: {body[:200]!r}")
                continue
            with lock:
                load.messages += 1
                for d in json.loads(body)["deliveries"]:
                    load.accepted[d["id"]] = (i, now)

    def watch_sink() -> None:
        while not stop.is_set():
            delivered[0] = sink.distinct()
            time.sleep(0.02)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(connections)]
    if window is not None:
        threads.append(threading.Thread(target=watch_sink, daemon=True))
    for t in threads:
        t.start()
    for t in threads[:connections]:
        t.join()
    stop.set()
    load.elapsed = time.monotonic() - start
    return load


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


def _count_error(load: Load, lock: threading.Lock, what: str) -> None:
    with lock:
        load.errors += 1
        load.first_error = load.first_error or what


# -- wrk ---------------------------------------------------------------------

@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    non_2xx: int
    socket_errors: str
    latency: dict[str, str]  # "50%" -> "3.21ms"
    output: str


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, headers: dict[str, str], duration: float, connections: int = 16,
            threads: int = 1) -> WrkResult:
    """Closed-loop POSTs of unique events with `connections` kept-alive connections."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "-s", str(LUA), *itertools.chain.from_iterable(("-H", f"{k}: {v}") for k, v in headers.items()), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         env={**os.environ, "BENCH_KEY_PREFIX": secrets.token_hex(4)}).stdout
    total = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return WrkResult(
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors.group(1).strip() if errors else "none",
        latency=dict(re.findall(r"^\s+(\d+%)\s+([\d.]+\w+)\s*$", out, re.M)),
        output=out,
    )
