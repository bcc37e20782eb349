"""The failure suite's destination: bench/sink.py that also appends every Idempotency-Key to a file.

    python bench/chaos_sink.py PORT KEYS_FILE

The chaos suite stops and starts this sink (a destination down for a minute)
and SIGKILLs it on the way out, so its in-memory counts would die with it.
Each key is written to KEYS_FILE (one line per request, line-buffered, so it is
in the kernel before the 200 goes back) and the harness counts the file:
distinct keys = deliveries that reached the destination, lines - distinct =
duplicate sends.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sink as lean  # noqa: E402


def main(port: int, keys_file: str) -> None:
    log = open(keys_file, "a", buffering=1)
    counted = lean.record

    def record(key: str) -> None:
        log.write(key + "\n")  # before the answer: a 200 the sender saw is always on file
        counted(key)

    lean.record = record  # SinkProtocol looks `record` up in its module on every request
    asyncio.run(lean.serve(port))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
