"""Loopback HTTP destination for tests: records what it receives, answers as told.

    with HttpSink() as sink:                      # 127.0.0.1, a free port
        sink.respond((503, {"Retry-After": "5"}, b"busy"))   # first answer
        ...                                       # then `sink.status` (200) for the rest
        send_to(sink.url)
        assert sink.count_by_key() == {"delivery-1": 1}

Answers come from the queue given to `respond()`, in order, then `status`.
`delay` (seconds) holds every answer back, to simulate a slow destination;
the request is recorded before the delay, as a real server would have it.
HTTP/1.1 with keep-alive, so connection reuse shows in `Received.client_port`.
`stop()` also cuts open keep-alive connections, so a stopped sink is really
down; `start()` again listens on the same port, so `url` stays valid.
"""
from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HttpSink", "Received"]


@dataclass(frozen=True)
class Received:
    """One request as the sink saw it. Header names are lower-cased."""

    method: str
    path: str              # with the query string
    headers: dict[str, str]
    body: bytes
    time: float            # time.time() when the request was read
    client_port: int       # the same port means the same TCP connection


class HttpSink:
    def __init__(self, status: int = 200, *, path: str = "/", delay: float = 0.0, port: int = 0):
        self.status = status
        self.delay = delay
        self.path = path
        self.port = port
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._plan: collections.deque[tuple[int, dict[str, str], bytes]] = collections.deque()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def received(self) -> list[Received]:
        """A copy of the requests so far, oldest first."""
        with self._lock:
            return list(self._received)

    def respond(self, *responses: tuple[int, dict[str, str], bytes]) -> None:
        """Queue answers (status, headers, body), given in order before falling back to `status`."""
        with self._lock:
            self._plan.extend(responses)

    def count_by_key(self) -> collections.Counter:
        """How many requests carried each Idempotency-Key."""
        return collections.Counter(r.headers.get("idempotency-key") for r in self.received)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` requests arrived; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received
            if len(got) >= count:
                return got
            time.sleep(0.01)
        raise AssertionError(f"sink got {len(self.received)} requests, expected {count} within {timeout}s")

    def start(self) -> "HttpSink":
        sink = self

        class Handler(_Handler):
            pass

        Handler.sink = sink
        self._server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        # A short poll interval keeps stop() quick: shutdown() waits for one poll.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"HttpSink:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._connections = list(self._connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "HttpSink":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Called from handler threads.
    def _record(self, received: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self._received.append(received)
            return self._plan.popleft() if self._plan else (self.status, {}, b"")


class _Server(ThreadingHTTPServer):
    # Idle keep-alive connections would make server_close() wait forever.
    block_on_close = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sink: HttpSink

    def setup(self) -> None:
        super().setup()
        with self.sink._lock:
            self.sink._connections.add(self.connection)

    def finish(self) -> None:
        with self.sink._lock:
            self.sink._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            # The sender died mid-request (a test SIGKILLs workers while they send): a real
            # server would not act on half a body, so neither does the sink record it.
            self.close_connection = True
            return
        status, headers, payload = self.sink._record(Received(
            method=self.command, path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body, time=time.time(), client_port=self.client_address[1],
        ))
        if self.sink.delay:
            time.sleep(self.sink.delay)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            # 1xx, 204 and 304 have no body and must not announce one.
            if not (status < 200 or status in (204, 304)):
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload and not (status < 200 or status in (204, 304)):
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout) or the sink is stopping
            self.close_connection = True

    do_POST = do_PUT = do_PATCH = do_GET = do_DELETE = _answer

    def log_message(self, format: str, *args) -> None:
        pass
