"""`courier mllp --processes N`: N listener processes on one port, and their connection counts.

One asyncio process parses and commits on one core at most. With --processes N the command
forks N listeners that each bind the port with SO_REUSEPORT, so Linux spreads new connections
over them, and stays as their supervisor:

- a listener that dies (killed, crashed) is replaced at once; more than RESTARTS deaths within
  RESTART_WINDOW seconds stop the whole command with status 1, for honcho or systemd to act on:
  it never runs on with fewer listeners than asked;
- SIGTERM (or SIGINT) is passed on to every listener, each drains its connections as a single
  listener does, and the command exits 0 when all have stopped;
- a listener whose supervisor is gone (SIGKILL) gets SIGTERM from the kernel (PR_SET_PDEATHSIG),
  so no listener outlives a dead supervisor and holds the port against its successor.

COURIER_MLLP_MAX_CONNECTIONS and COURIER_MLLP_MAX_PER_PEER stay limits of the whole listener:
the counts live in shared memory (SharedCounts), one row per listener, so a listener that dies
without closing its connections is forgotten by clearing its row.
"""
from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import logging
import mmap
import os
import signal
import socket
import struct
import tempfile
import time
import zlib
from collections import Counter, deque

log = logging.getLogger("courier.mllp")

RESTARTS, RESTART_WINDOW = 5, 60.0
_PR_SET_PDEATHSIG = 1


class ConnectionCounts:
    """A listener's open connections, in all and per peer IP address (handshakes included), in this process."""

    def __init__(self):
        self._per_peer: Counter[str] = Counter()

    def admit(self, address: str, max_connections: int, max_per_peer: int) -> str | None:
        """Count a new connection from `address`; or, if a limit is reached, say which (it is not counted)."""
        total, from_peer = sum(self._per_peer.values()), self._per_peer[address]
        refused = _refusal(total, from_peer, max_connections, max_per_peer)
        if refused is None:
            self._per_peer[address] += 1
        return refused

    def release(self, address: str) -> None:
        self._per_peer[address] -= 1
        if not self._per_peer[address]:
            del self._per_peer[address]


def _refusal(total: int, from_peer: int, max_connections: int, max_per_peer: int) -> str | None:
    if total >= max_connections:
        return f"already {total} connections (COURIER_MLLP_MAX_CONNECTIONS)"
    if from_peer >= max_per_peer:
        return f"already {from_peer} connections from this address (COURIER_MLLP_MAX_PER_PEER)"
    return None


class SharedCounts:
    """ConnectionCounts of every listener process, in a shared mapping of an unlinked temporary file.

    A table of `slots` records: a peer address (16 bytes, IPv4 as IPv4-mapped IPv6) and one count per
    listener process (`rows`). A process writes only its own row (`use_row`); admitting reads them all,
    under an fcntl lock of the file, which the kernel releases if its holder dies. A record whose counts
    are all 0 may take another address; there are more records than connections can be open at once,
    so there is always one. Reading every record costs some microseconds per connection opened or
    closed: nothing next to a TCP handshake, and MLLP connections are long-lived.
    """

    def __init__(self, rows: int, max_connections: int):
        self.rows, self.slots = rows, max(256, 2 * max_connections)
        self._record = struct.Struct(f"16s{rows}i")
        self._file = tempfile.TemporaryFile(prefix="courier-mllp-counts-")
        self._file.truncate(self.slots * self._record.size)
        self._map = mmap.mmap(self._file.fileno(), self.slots * self._record.size)
        self.row = 0

    def use_row(self, row: int) -> None:
        """Make this process count in `row` (a listener process, after fork)."""
        self.row = row

    def clear_row(self, row: int) -> None:
        """Forget the connections of a listener process that died (the supervisor, before replacing it)."""
        with self._locked():
            for slot, (key, counts) in enumerate(self._records()):
                if counts[row]:
                    counts[row] = 0
                    self._write(slot, key, counts)

    def admit(self, address: str, max_connections: int, max_per_peer: int) -> str | None:
        key = _key(address)
        with self._locked():
            records = self._records()
            found = next((slot for slot, (stored, _) in enumerate(records) if stored == key), None)
            total = sum(sum(counts) for _, counts in records)
            refused = _refusal(total, 0 if found is None else sum(records[found][1]), max_connections,
                               max_per_peer)
            if refused is None:
                slot = found if found is not None else next(
                    slot for slot, (_, counts) in enumerate(records) if not any(counts))
                counts = records[slot][1]
                counts[self.row] += 1
                self._write(slot, key, counts)
            return refused

    def release(self, address: str) -> None:
        key = _key(address)
        with self._locked():
            for slot, (stored, counts) in enumerate(self._records()):
                if stored == key:
                    counts[self.row] = max(0, counts[self.row] - 1)
                    self._write(slot, key, counts)
                    return

    def counts(self) -> dict[bytes, list[int]]:
        """{address key: count per row} of the addresses with a connection open (for tests)."""
        with self._locked():
            return {key: counts for key, counts in self._records() if any(counts)}

    def _records(self) -> list[tuple[bytes, list[int]]]:
        size = self._record.size
        return [(values[0], list(values[1:])) for values in
                (self._record.unpack_from(self._map, slot * size) for slot in range(self.slots))]

    def _write(self, slot: int, key: bytes, counts: list[int]) -> None:
        self._record.pack_into(self._map, slot * self._record.size, key, *counts)

    def _locked(self) -> _FileLock:
        return _FileLock(self._file.fileno())


class _FileLock:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _key(address: str) -> bytes:
    """16 bytes naming a peer address ('?' and other non-addresses by a CRC: they only need to differ)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        return (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip).packed
    except ValueError:
        return b"\xff" * 12 + zlib.crc32(address.encode()).to_bytes(4, "big")


def check_port_free(host: str, port: int) -> None:
    """OSError (EADDRINUSE) if something listens on host:port already: with SO_REUSEPORT a second
    `courier mllp` of the same user would quietly share the port instead of refusing to start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server: TIME_WAIT is no user
        probe.bind((host, port))


class Supervisor:
    """Forks `processes` listener processes and keeps them running (see the module docstring).

    `run()` returns in each listener process, right after its fork, with that process's index (its
    row in `counts`): the caller then runs the listener there. In the supervisor it returns only at
    the end, with None, after every listener has stopped; `status` is then the exit status.
    """

    def __init__(self, processes: int, counts: SharedCounts, *, restarts: int = RESTARTS,
                 window: float = RESTART_WINDOW):
        self.processes, self.counts = processes, counts
        self.restarts, self.window = restarts, window
        self.children: dict[int, int] = {}  # pid -> index
        self.stopping = False
        self.status = 0
        self._deaths: deque[float] = deque()
        self._pid = os.getpid()

    def run(self) -> int | None:
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.processes):
                if self.stopping:
                    break
                if self._fork(index):
                    return index
            log.info("MLLP listener: %d processes (pids %s)", self.processes,
                     ", ".join(str(pid) for pid in self.children))
            while self.children:
                try:
                    pid, wait_status = os.wait()
                except ChildProcessError:
                    break
                index = self.children.pop(pid, None)
                if index is None:
                    continue
                if self.stopping:
                    continue
                log.error("MLLP listener process %d (pid %d) %s", index, pid, _describe(wait_status))
                self.counts.clear_row(index)
                if self._too_many_deaths():
                    log.error("MLLP listener: %d process deaths within %gs; stopping all (exit 1), for the "
                              "service manager to start the listener again", self.restarts + 1, self.window)
                    self.status = 1
                    self._stop()
                    continue
                if self._fork(index):
                    return index
                log.info("MLLP listener process %d started again (pid %d)", index,
                         next(p for p, i in self.children.items() if i == index))
            log.info("MLLP listener: every process stopped")
            return None
        finally:
            if os.getpid() == self._pid:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _fork(self, index: int) -> bool:
        """Start listener process `index`; True in that process, False in the supervisor."""
        # SIGTERM/SIGINT wait until the child is in self.children (so _stop reaches it) and, in the
        # child, until the supervisor's handler is gone (so it never runs there).
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            pid = os.fork()
            if pid == 0:
                for sig in stops:
                    signal.signal(sig, signal.SIG_DFL)  # until the listener's own handlers are installed
                self.children.clear()
                self.counts.use_row(index)
            else:
                self.children[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        if pid == 0:
            _die_with_parent(self._pid)
            return True
        return False

    def _stop(self, *_signal) -> None:
        if not self.stopping:
            log.info("MLLP listener: stopping %d processes", len(self.children))
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _too_many_deaths(self) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.window:
            self._deaths.popleft()
        return len(self._deaths) > self.restarts


def _describe(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"was killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(wait_status)}"


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies; exit now if it already has (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("MLLP listener: prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError):  # not Linux: the supervisor's stop is the only way out
        pass
    if os.getppid() != parent:
        os._exit(0)


__all__ = ["ConnectionCounts", "SharedCounts", "Supervisor", "check_port_free"]
