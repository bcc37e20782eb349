"""MLLP adapter: one HL7 v2 message per delivery over a kept-open TCP connection, answered by an ACK.

URL
===

.. code-block::

    mllp://HOST:PORT

    mllp://10.0.0.5:2575
    mllp://interface-engine.hospital.local:6661

The port is required (MLLP has no standard port; 2575 is common). No path,
query, user info or fragment: there are no URL options.

Options
=======

The destination's config gives:

* ``timeout``: seconds for connecting and, separately, for the whole ACK to
  arrive after the message was sent.

``secret`` is accepted and ignored (MLLP has no authentication; use a VPN or
a TLS tunnel).

Sending
=======

The transformed body must be one HL7 v2 message (starting with ``MSH``; CR,
LF or CRLF segment ends are sent as they are) with a non-empty MSH-10. It goes
as one frame ``<VT> body <FS><CR>``; the adapter then reads one answer frame.
The connection stays open for the next delivery and is reopened when the peer
closed it; after any failure it is dropped, so a late ACK can never be taken for
the answer to a later message.

Outcome
=======

* MSA-1 ``AA`` or ``CA``, with MSA-2 equal to the sent MSH-10: sent.
* ``AE`` or ``CE``: TemporaryError (the receiver asks for a resend).
* ``AR`` or ``CR``: PermanentError (the receiver will never take it).
* MSA-2 not equal to MSH-10, an answer that is not an ACK, no answer within
  ``timeout``, refused or reset connections: TemporaryError; the receiver may
  or may not hold the message, and a resend with the same MSH-10 is the safe move.
* A body that is not an HL7 v2 message, has no MSH-10, or contains the framing
  bytes VT or FS: PermanentError.

Details carry the ACK code and MSA-3 (or ERR-8) of the answer, never our body.

Threads: an instance holds one socket and is not thread-safe; use one adapter
per thread (the worker caches adapters per thread).
"""
from __future__ import annotations

import errno
import re
import select
import socket
import time
from urllib.parse import urlsplit

from adapters.base import Adapter, Outgoing, PermanentError, Sent, TemporaryError

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
MAX_ACK_BYTES = 1024 * 1024  # an ACK is a few hundred bytes; more is a confused peer
_DETAIL_CHARS = 200
_SEGMENT_END = re.compile(rb"\r\n|\r|\n")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")


def _parse(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("mllp URL needs a host and port, e.g. mllp://10.0.0.5:2575")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("mllp URL has an invalid port (expected 1-65535)") from None
    if not port:
        raise ValueError("mllp URL needs a port (MLLP has no default), e.g. mllp://10.0.0.5:2575")
    if parts.username or parts.password:
        raise ValueError("mllp URL must not carry user info: MLLP has no authentication")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("mllp URL takes no path, query options or fragment: mllp://HOST:PORT")
    return parts.hostname, port


def control_id(body: bytes) -> str:
    """MSH-10 of an HL7 v2 message, read directly (adapters do not import app.hl7v2).

    PermanentError when the body is not a message that an ACK could be matched to.
    """
    text = body.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text.startswith(b"MSH") or len(text) < 4:
        raise PermanentError("body is not an HL7 v2 message (does not start with MSH); the MLLP adapter "
                             "sends HL7 v2 only")
    if START_BLOCK in body or END_BLOCK in body:
        raise PermanentError("body contains an MLLP framing byte (VT 0x0B or FS 0x1C)")
    msh = _SEGMENT_END.split(text, maxsplit=1)[0]
    fields = msh.split(msh[3:4])  # fields[n-1] is MSH-n
    value = fields[9].decode("utf-8", "replace") if len(fields) > 9 else ""
    if not value.strip():
        raise PermanentError("MSH-10 (message control id) is empty: no ACK could be matched to it")
    return value


def read_ack(payload: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3 or ERR-8) of an ACK payload; TemporaryError if it is not an ACK."""
    text = payload.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not text.startswith("MSH") or len(text) < 4:
        raise TemporaryError("answer is not an HL7 v2 ACK (does not start with MSH)")
    sep = text[3]
    segments = {}
    for segment in re.split(r"\r\n|\r|\n", text):
        segments.setdefault(segment[:3], segment.split(sep))
    msa = segments.get("MSA")
    if msa is None or len(msa) < 2:
        raise TemporaryError("answer has no MSA segment: not an acknowledgment")
    code = msa[1].strip().upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise TemporaryError(f"answer's MSA-1 is {_clean(msa[1])!r}, not an acknowledgment code")
    detail = msa[3] if len(msa) > 3 else ""
    err = segments.get("ERR")
    if not detail and err is not None and len(err) > 8:
        detail = err[8]
    return code, msa[2] if len(msa) > 2 else "", _clean(detail)


def _clean(text: str) -> str:
    text = _UNPRINTABLE.sub("?", text.strip())
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS - 3] + "..."


class MllpAdapter(Adapter):
    """Sends each delivery as one MLLP frame and classifies the ACK."""

    scheme = ("mllp",)

    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None):
        super().__init__(url, timeout=timeout, secret=secret)
        self.host, self.port = _parse(url)
        self._sock: socket.socket | None = None

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        _parse(url)

    def send(self, out: Outgoing) -> Sent:
        expected = control_id(out.body)
        reused = self._usable_connection()
        try:
            try:
                self._sock.sendall(START_BLOCK + out.body + END_BLOCK + CARRIAGE_RETURN)
                answer = self._read_frame()
            except (BrokenPipeError, ConnectionResetError, EOFError):
                if not reused:
                    raise
                # A kept-open connection the peer dropped just now: the one case where a fresh
                # connection is tried at once (like any HTTP client's keep-alive). The receiver
                # deduplicates on MSH-10 if it did get the first copy.
                self.close()
                self._usable_connection()
                self._sock.sendall(START_BLOCK + out.body + END_BLOCK + CARRIAGE_RETURN)
                answer = self._read_frame()
            code, acked, detail = read_ack(answer)
        except TemporaryError:
            self.close()
            raise
        except socket.timeout:
            self.close()
            raise TemporaryError(f"no ACK within {self.timeout:g}s", throttled=True) from None
        except EOFError:
            self.close()
            raise TemporaryError("connection closed by the receiver before its ACK") from None
        except OSError as exc:
            self.close()
            raise TemporaryError(f"connection failed: {_describe(exc)}") from None
        if acked != expected:
            # Not this message's answer: the stream is out of step, so the connection goes too.
            self.close()
            raise TemporaryError(f"ACK {code} is for MSH-10 {_clean(acked)!r}, not the sent {_clean(expected)!r}")
        said = f"ACK {code}" + (f": {detail}" if detail else "")
        if code in ("AA", "CA"):
            return Sent(detail=said)
        if code in ("AE", "CE"):
            raise TemporaryError(said)
        raise PermanentError(said)

    def _usable_connection(self) -> bool:
        """Make sure self._sock is open; True if it is a kept-open one (which may have been dropped)."""
        if self._sock is not None:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return True
            # Readable while idle: the peer closed it (EOF) or sent something unasked; either way, start over.
            self.close()
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.timeout:
            raise TemporaryError(f"connect timeout after {self.timeout:g}s") from None
        except OSError as exc:
            raise TemporaryError(f"connection failed: {_describe(exc)}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return False

    def _read_frame(self) -> bytes:
        """One answer frame's payload, within self.timeout overall (raises socket.timeout, EOFError)."""
        deadline = time.monotonic() + self.timeout
        data = b""
        while END_BLOCK not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError()
            data += chunk
            if len(data) > MAX_ACK_BYTES:
                raise TemporaryError(f"answer larger than {MAX_ACK_BYTES} bytes without an end block")
        payload = data.partition(END_BLOCK)[0]
        start = payload.rfind(START_BLOCK)
        # Bytes after the end block are not ours to read: a well-behaved peer sends one frame per message.
        return payload[start + 1:] if start != -1 else payload

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def _describe(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed: {exc.strerror}"
    code = errno.errorcode.get(exc.errno, exc.errno) if isinstance(exc.errno, int) else None
    return f"{exc.strerror or type(exc).__name__}" + (f" ({code})" if code else "")
