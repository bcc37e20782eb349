"""MLLP load for the ingest benchmark: closed-loop HL7 v2 ADT^A01 senders, one socket each.

Each of `connections` threads keeps one TCP connection to `courier mllp` and does
what an interface engine does: send one framed message (`<VT> ... <FS><CR>`),
wait for its ACK, send the next. Every message has its own MSH-10, so none is a
duplicate. ACKs are counted by MSA-1: AA is an accept, AE and AR are errors
(counted apart, with the first one's text); an ACK whose MSA-2 is not the
message's MSH-10, a timeout or a dropped connection counts as an "other" error.
The ACK is read here without Courier's code (app/hl7/er7.py), so a bug there
cannot make the client agree with the server.
"""
from __future__ import annotations

import itertools
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from bench import measure

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"

# A typical admission, modelled on HL7's own ADT^A01 example (fictional patient); the MRN,
# account number and MSH-10 change per message, the rest is as an ADT feed sends it.
ADT_A01 = "\r".join([
    "MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|COURIER|BENCH|{ts}||ADT^A01^ADT_A01|{control_id}|P|2.5.1",
    "EVN|A01|{ts}|||JSMITH^SMITH^JOHN^^^^^^GHH",
    "PID|1||{mrn}^^^GHH^MR||EVERYWOMAN^EVE^E^^^^L|JONES|19620320|F|||"
    "2222 HOME STREET^^GREENSBORO^NC^27401-1020^USA||^PRN^PH^^1^555^5551234|||S||{account}^^^GHH^AN",
    "NK1|1|NUCLEAR^NELDA^W|SPO^SPOUSE||||NK^NEXT OF KIN",
    "PV1|1|I|2000^2012^01^GHH||||004777^ATTEND^AARON^A^^^^^^^^^^^^MD|||SUR||||ADM|A0|||||||||||||||||||||||||||||"
    "{ts}",
    "AL1|1|DA|^PENICILLIN|MO|PRODUCES HIVES",
    "DG1|1||I10^ESSENTIAL HYPERTENSION^I10C||{ts}|A",
]) + "\r"


@dataclass
class MllpResult:
    """What the MLLP clients saw."""

    connections: int
    sent: int = 0
    accepted: int = 0            # AA with MSA-2 = the message's MSH-10
    ae: int = 0
    ar: int = 0
    other_errors: int = 0        # wrong MSA-2, not an ACK, timeout, connection lost
    first_error: str = ""
    elapsed: float = 0.0
    latency_ms: dict = field(default_factory=dict)  # send -> ACK received, AA only

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0

    @property
    def errors(self) -> int:
        return self.ae + self.ar + self.other_errors


def message(control_id: str, n: int) -> bytes:
    """ADT^A01 number `n` with MSH-10 `control_id`, framed for MLLP."""
    ts = time.strftime("%Y%m%d%H%M%S")
    text = ADT_A01.format(ts=ts, control_id=control_id, mrn=f"{n % 1_000_000:07d}", account=f"A{n:09d}")
    return START_BLOCK + text.encode("ascii") + END_BLOCK


def read_ack(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, text) of an ACK payload; text is MSA-3, else ERR-8, else the whole ACK."""
    segments = {s[:3]: s.split("|") for s in ack.decode("utf-8", "replace").replace("\n", "\r").split("\r")}
    msa, err = segments.get("MSA", []), segments.get("ERR", [])
    get = lambda fields, i: fields[i] if len(fields) > i else ""  # noqa: E731
    text = get(msa, 3) or get(err, 8) or ack.decode("utf-8", "replace")[:200]
    return get(msa, 1), get(msa, 2), text


def wait_listening(port: int, alive, timeout: float = 30.0) -> None:
    """Until 127.0.0.1:`port` accepts a connection; RuntimeError if `alive()` turns false or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the MLLP listener exited before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def drive(port: int, duration: float, connections: int = 16, timeout: float = 35.0) -> MllpResult:
    """Send ADT^A01s over `connections` connections for `duration` seconds, each waiting for its ACK.

    `timeout` is a bit over the listener's default COURIER_MLLP_INGEST_TIMEOUT (30 s), after
    which it answers AE itself: a client timeout then means the listener is stuck.
    """
    result, lock = MllpResult(connections), threading.Lock()
    numbers, run = itertools.count(), secrets.token_hex(4)
    latencies: list[float] = []
    start = time.monotonic()
    end = start + duration

    def error(kind: str, what: str) -> None:
        with lock:
            setattr(result, kind, getattr(result, kind) + 1)
            result.first_error = result.first_error or what

    def sender() -> None:
        sock, buffer = None, b""
        while time.monotonic() < end:
            n = next(numbers)
            control_id = f"{run}{n:010d}"
            try:
                if sock is None:
                    sock, buffer = socket.create_connection(("127.0.0.1", port), timeout=timeout), b""
                sent_at = time.perf_counter()
                sock.sendall(message(control_id, n))
                with lock:
                    result.sent += 1
                while END_BLOCK not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed by the listener")
                    buffer += chunk
                latency = 1000 * (time.perf_counter() - sent_at)
            except OSError as exc:
                error("other_errors", f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None  # an ACK arriving late must not be read as the next message's
                continue
            frame, _, buffer = buffer.partition(END_BLOCK)
            code, acked_id, text = read_ack(frame.lstrip(b"\r\n ").removeprefix(START_BLOCK))
            if code == "AA" and acked_id == control_id:
                with lock:
                    result.accepted += 1
                    latencies.append(latency)
            elif code in ("AE", "AR"):
                error(code.lower(), f"{code}: {text}")
            else:
                error("other_errors", f"MSA-1 {code!r}, MSA-2 {acked_id!r} for {control_id}: {text}")
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=sender, daemon=True, name=f"mllp-client-{i}") for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.elapsed = time.monotonic() - start
    result.latency_ms = measure.percentiles(latencies)
    return result
