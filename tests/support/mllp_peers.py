"""MLLP on loopback for tests: Courier's listener in a thread, a raw socket client, and
python-hl7's own asyncio MLLP server as a destination that answers as told; each over TLS
when given an ssl.SSLContext (tests/support/tls_ca.py makes the certificates)."""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from courier.app.hl7.listener import END_BLOCK, START_BLOCK, MllpListener, frame


@contextmanager
def listener_thread(settings, store, **options):
    """Courier's MllpListener on 127.0.0.1:<free port>, run by its own event loop in a thread."""
    listener = MllpListener(settings, store, host="127.0.0.1", port=0, **options)
    thread = threading.Thread(target=asyncio.run, args=(listener.run(),), daemon=True, name="mllp-listener")
    thread.start()
    assert listener.started.wait(10), "listener did not start"
    try:
        yield listener
    finally:
        listener.stop_threadsafe()
        thread.join(30)
        assert not thread.is_alive(), "listener did not stop within 30s"


class Client:
    """A blocking MLLP client over a raw socket (TLS with `tls`): send any bytes, read whole answer frames."""

    def __init__(self, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                 server_hostname: str = "127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname)
        self.buffer = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def read_frame(self) -> bytes:
        """The next answer payload; raises socket.timeout, or EOFError if the server closed first."""
        while END_BLOCK not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; {len(self.buffer)} bytes of a frame read")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(END_BLOCK)
        self.buffer = self.buffer.removeprefix(b"\r")
        assert head.startswith(START_BLOCK), head[:20]
        return head[1:]

    def exchange(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.read_frame()

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True once the server has closed the connection (reads EOF or a reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ack_for(message: bytes, code: str, control_id: str | None = None, text: str = "") -> bytes:
    """A plain ACK for `message` written here by hand (not courier.app.hl7.er7), MSA-2 = its MSH-10 unless told."""
    msh = message.replace(b"\n", b"\r").split(b"\r")[0].decode()
    sep = msh[3]
    fields = msh.split(sep)
    msa2 = fields[9] if control_id is None else control_id
    ack = f"MSH{sep}{fields[1]}{sep}DEST{sep}DESTFAC{sep}{fields[2]}{sep}{fields[3]}{sep}20240101000000{sep}{sep}" \
          f"ACK{sep}ACK{time.monotonic_ns()}{sep}P{sep}2.5\rMSA{sep}{code}{sep}{msa2}"
    return (ack + (f"{sep}{text}" if text else "") + "\r").encode()


@dataclass
class Hl7Server:
    """python-hl7's asyncio MLLP server (`hl7.mllp.start_hl7_server`) in a thread.

    `behaviour(message_bytes) -> bytes | None` makes the ACK payload; None sends nothing.
    Received messages (raw payload bytes, via python-hl7's own readblock) land in `.received`.
    """

    behaviour: object = None
    received: list = field(default_factory=list)
    connections: int = 0
    port: int = 0
    close_after_ack: bool = False  # hang up after each answer, as some engines do
    ssl_context: ssl.SSLContext | None = None  # a server context: MLLP inside TLS (mllps://)

    def __post_init__(self):
        self.behaviour = self.behaviour or (lambda message: ack_for(message, "AA"))
        self._ready = threading.Event()

    async def _main(self):
        import hl7.mllp

        async def on_connect(reader, writer):
            self.connections += 1
            try:
                while not reader.at_eof():
                    block = await reader.readblock()
                    self.received.append(block)
                    answer = self.behaviour(block)
                    if answer is not None:
                        writer.writeblock(answer)
                        await writer.drain()
                    if self.close_after_ack:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await hl7.mllp.start_hl7_server(on_connect, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def __enter__(self):
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"{'mllp' if self.ssl_context is None else 'mllps'}://127.0.0.1:{self.port}"
