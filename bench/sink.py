"""The benchmark's destination: a lean HTTP/1.1 server that counts Idempotency-Keys.

    python bench/sink.py PORT

Answers every POST `200` with an empty body and remembers, per Idempotency-Key,
how many requests carried it and when the first one arrived (time.time()).
Two control paths, for the harness:

    GET /_count   {"distinct": n, "requests": n}
    GET /_dump    {"<key>": [count, first_arrival], ...}, then forgets everything

It runs in its own process (so it never shares the harness's GIL) on asyncio
with a hand-rolled parser instead of http.server, because on a 2-core machine
the sink's CPU is taken from the system under test: a thread per connection and
BaseHTTPRequestHandler cost several times more per request. tests/support/sinks.py is
the full-featured sink for tests (scripted answers, delays, bodies kept); this
one keeps only keys, so a 300 s run does not hold every body in memory.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
seen: dict[str, list] = {}  # key -> [count, first arrival]
requests_total = 0


def record(key: str) -> None:
    global requests_total
    requests_total += 1
    entry = seen.get(key)
    if entry is None:
        seen[key] = [1, time.time()]
    else:
        entry[0] += 1


def control(path: str) -> bytes:
    """The body answering a GET to a control path."""
    global requests_total
    if path == "/_dump":
        body = json.dumps(seen).encode()
        seen.clear()
        requests_total = 0
    else:
        body = json.dumps({"distinct": len(seen), "requests": requests_total}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class SinkProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: all that Courier, requests and the harness send."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
            length = int(headers.get("content-length", 0))
            if len(self.buffer) < end + 4 + length:
                return  # the body is still coming
            self.buffer = self.buffer[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            if method == "GET":
                self.transport.write(control(path))
            else:
                record(headers.get("idempotency-key", ""))
                self.transport.write(OK)
            if headers.get("connection", "").lower() == "close":
                self.transport.close()
                return


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(SinkProtocol, "127.0.0.1", port, backlog=1024)
    print(f"sink listening on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
