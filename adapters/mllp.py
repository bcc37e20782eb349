"""MLLP adapter: one HL7 v2 message per delivery over a kept-open TCP (or TLS) connection, answered by an ACK.

URL
===

.. code-block::

    mllp://HOST:PORT[?charset=CHARSET]
    mllps://HOST:PORT[?OPTION=VALUE[&OPTION=VALUE]...]     OPTION: charset, ca, cert, key, server_name

    mllp://10.0.0.5:2575
    mllp://interface-engine.hospital.local:6661?charset=8859/1
    mllps://engine.hospital.local:6662?ca=/etc/courier/engine-ca.pem
    mllps://10.0.0.5:6662?ca=/tls/ca.pem&cert=/tls/client.pem&key=/tls/client.key&server_name=engine.hospital.local

The port is required (MLLP has no standard port; 2575 is common). No path,
user info or fragment. Both schemes take, at most once:

* ``charset``: the character set the receiver reads, as an MSH-18 name (HL7
  table 0211: ``ASCII``, ``8859/1`` ... ``8859/16``, ``UNICODE+UTF-8`` (the
  ``+`` is a space), ``UNICODE UTF-8``'s alias ``UTF-8``, ``GB 18030-2000``,
  ``KS X 1001``, ``BIG-5``). Each message is re-encoded into it and its MSH-18
  set to that name, so a patient named Müller reaches an 8859/1 receiver as
  the byte 0xFC. The message is read in the charset its content type names
  (``charset=`` parameter), else its MSH-18, else UTF-8. A character the
  receiver's charset cannot hold is a PermanentError (it never fits, and a
  ``?`` in its place would change the data). Left out: the body is sent as
  it is, in whatever charset it came.

``mllps://`` is MLLP inside TLS (1.2 at least) and also takes these, each at
most once:

* ``ca``: PEM file of the CA(s) that sign the receiver's certificate; without
  it, the system's trust store.
* ``cert``: PEM file of our client certificate, for a receiver that asks for
  one; ``key``: its private key (leave ``key`` out if the ``cert`` file holds
  both). ``key`` without ``cert`` is an error.
* ``server_name``: the name the receiver's certificate must carry (and the SNI
  sent), when it differs from HOST, e.g. when HOST is an IP address.

Values are percent-decoded like any query string: write ``+``, ``&`` or ``%``
in a path as ``%2B``, ``%26``, ``%25``.

The receiver's certificate is always verified, hostname included; there is
deliberately no option to turn that off (a certificate nobody checks protects
no PHI): give ``ca`` for a private CA, ``server_name`` for a name mismatch. The
files are read at each new connection, so renewed files need no restart, and
only by the processes that send (workers): checking the URL does not open them.

Options
=======

The destination's config gives:

* ``timeout``: seconds for connecting (TLS handshake included) and, separately,
  for the whole ACK to arrive after the message was sent.

``secret`` is accepted and ignored (MLLP has no authentication of its own: use
``mllps://`` with a client certificate, or a VPN).

Sending
=======

The transformed body must be one HL7 v2 message (starting with ``MSH``) with a
non-empty MSH-10. It goes as one frame ``<VT> body <FS><CR>``, its segments
ending in CR as HL7 v2 over MLLP wants them (LF or CRLF segment ends, which
senders use and Courier stores as received, become CR; nothing else changes);
the adapter then reads one answer frame.
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
* TLS failures (the receiver's certificate not trusted or not for this name,
  our client certificate refused, a ``ca``/``cert``/``key`` file missing or
  unusable): TemporaryError whose detail starts ``TLS:`` and says which, as the
  HTTPS adapter does (a receiver that refuses our client certificate may just
  hang up instead: that detail then names this as a possible cause). The
  message is fine; the operator fixes a certificate or a file, and the
  deliveries held meanwhile go out unchanged. Retries stay bounded by the
  destination's ``retry.max_attempts`` (then dead, with that detail in the
  attempt log) and the circuit breaker stops the hammering, so a mismatch is
  never retried silently forever; PermanentError would instead kill every
  message queued during a certificate renewal gone wrong.
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
import ssl
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from courier.adapters.base import Adapter, Outgoing, PermanentError, Sent, TemporaryError
from courier.adapters.hl7_charsets import body_charset, charset_codec, hl7_name

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
MAX_ACK_BYTES = 1024 * 1024  # an ACK is a few hundred bytes; more is a confused peer
_DETAIL_CHARS = 200
_SEGMENT_END = re.compile(rb"\r\n|\r|\n")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")


TLS_OPTIONS = ("ca", "cert", "key", "server_name")
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class Target:
    """Where to send: host and port, and for mllps:// the TLS options (tls is False for mllp://)."""

    host: str
    port: int
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    charset: str | None = None  # the receiver's Python codec (the URL's charset option)


def _parse(url: str) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    example = "mllps://10.0.0.5:6662?ca=/path/ca.pem" if scheme == "mllps" else "mllp://10.0.0.5:2575"
    if not parts.hostname:
        raise ValueError(f"{scheme} URL needs a host and port, e.g. {example}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{scheme} URL has an invalid port (expected 1-65535)") from None
    if not port:
        raise ValueError(f"{scheme} URL needs a port (MLLP has no default), e.g. {example}")
    if parts.username or parts.password:
        raise ValueError(f"{scheme} URL must not carry user info: MLLP has no authentication "
                         f"(mllps:// takes a client certificate: ?cert=PATH&key=PATH)")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"{scheme} URL takes no path or fragment: {scheme}://HOST:PORT?OPTIONS")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"{scheme} URL query is not NAME=VALUE&...") from None
    known = ("charset",) if scheme == "mllp" else ("charset", *TLS_OPTIONS)
    options = {}
    for name, values in query.items():
        if name not in known:
            hint = " (TLS options such as ?ca= need mllps://)" if name in TLS_OPTIONS else ""
            raise ValueError(f"unknown {scheme} URL option {name!r}; known: {', '.join(known)}{hint}")
        if len(values) > 1 or not values[0].strip():
            raise ValueError(f"{scheme} URL option {name} must be given once, with a value")
        options[name] = values[0].strip()
    if "charset" in options:
        codec = charset_codec(options["charset"])
        if codec is None or hl7_name(codec) is None:
            raise ValueError(f"{scheme} URL option charset {options['charset'][:30]!r} is not an HL7 character set "
                             "Courier can write (ASCII, 8859/1 ... 8859/16, UNICODE UTF-8, ...)")
        options["charset"] = codec
    if "key" in options and "cert" not in options:
        raise ValueError("mllps URL option key needs cert (the client certificate it belongs to)")
    return Target(parts.hostname, port, tls=scheme == "mllps", **options)


def recode(body: bytes, content_type: str, codec: str) -> bytes:
    """body re-encoded into codec with MSH-18 naming it; PermanentError if it cannot be.

    The body is read in its content type's charset, else its MSH-18, else UTF-8.
    """
    source = body_charset(content_type, body) or "utf-8"
    try:
        text = body.decode(source)
    except UnicodeDecodeError as exc:
        raise PermanentError(f"body is not valid {source} (its charset) at byte {exc.start}") from None
    first, terminator, rest = _split_first(text.lstrip("\ufeff"))
    fields = first.split(first[3:4])
    fields += [""] * (18 - len(fields))
    fields[17] = hl7_name(codec)
    text = first[3:4].join(fields) + terminator + rest
    try:
        return text.encode(codec)
    except UnicodeEncodeError as exc:
        segment = text.count("\r", 0, exc.start) + text.count("\n", 0, exc.start) + 1
        raise PermanentError(f"a character in segment {segment} cannot be written in {hl7_name(codec)} (the "
                             "destination's charset)") from None


def _split_first(text: str) -> list[str]:
    """[first segment, its terminator, the rest]."""
    match = re.search(r"\r\n|\r|\n", text)
    if match is None:
        return [text, "", ""]
    return [text[:match.start()], match.group(), text[match.end():]]


def control_id(body: bytes) -> str:
    """MSH-10 of an HL7 v2 message, read directly (adapters do not import courier.app.hl7.er7).

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

    scheme = ("mllp", "mllps")

    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None):
        super().__init__(url, timeout=timeout, secret=secret)
        self.target = _parse(url)
        self.host, self.port = self.target.host, self.target.port
        self._sock: socket.socket | None = None

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        _parse(url)

    def send(self, out: Outgoing) -> Sent:
        body = out.body if self.target.charset is None else recode(out.body, out.content_type, self.target.charset)
        body = _SEGMENT_END.sub(b"\r", body)
        expected = control_id(body)
        reused = self._usable_connection()
        try:
            try:
                self._sock.sendall(START_BLOCK + body + END_BLOCK + CARRIAGE_RETURN)
                answer = self._read_frame()
            except (BrokenPipeError, ConnectionResetError, EOFError):
                if not reused:
                    raise
                # A kept-open connection the peer dropped just now: the one case where a fresh
                # connection is tried at once (like any HTTP client's keep-alive). The receiver
                # deduplicates on MSH-10 if it did get the first copy.
                self.close()
                self._usable_connection()
                self._sock.sendall(START_BLOCK + body + END_BLOCK + CARRIAGE_RETURN)
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
            # TLS 1.3 lets our side of the handshake end before the receiver has judged our certificate;
            # one that refuses it may just hang up, so this is the only sign: say so.
            hint = ("; over TLS, also how a receiver refuses a missing or untrusted client certificate "
                    "(the URL's cert= and key=)") if self.target.tls else ""
            raise TemporaryError(f"connection closed by the receiver before its ACK{hint}") from None
        except ssl.SSLError as exc:
            # TLS 1.3: a receiver that refuses our client certificate (or wants one) says so after the
            # handshake, with an alert that arrives here, at the first read.
            self.close()
            raise TemporaryError(f"TLS: the receiver ended the connection: {_tls_reason(exc)}") from None
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
            # TLS may hold decrypted bytes that select() cannot see: unasked ones too.
            if not readable and not (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()):
                return True
            # Readable while idle: the peer closed it (EOF) or sent something unasked; either way, start over.
            self.close()
        context = self._tls_context() if self.target.tls else None  # before connecting: a file problem is ours
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.timeout:
            raise TemporaryError(f"connect timeout after {self.timeout:g}s") from None
        except OSError as exc:
            raise TemporaryError(f"connection failed: {_describe(exc)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            name = self.target.server_name or self.host
            try:  # on failure wrap_socket closes the socket it took over
                sock = context.wrap_socket(sock, server_hostname=name)
            except ssl.SSLCertVerificationError as exc:
                raise TemporaryError(f"TLS: the receiver's certificate is not accepted for {name!r}: "
                                     f"{exc.verify_message} (check the destination's certificate and the URL's "
                                     f"ca= or server_name=)") from None
            except ssl.SSLError as exc:
                raise TemporaryError(f"TLS: handshake with the receiver failed: {_tls_reason(exc)}") from None
            except socket.timeout:
                raise TemporaryError(f"TLS: no handshake within {self.timeout:g}s") from None
            except OSError as exc:
                raise TemporaryError(f"connection failed during the TLS handshake: {_describe(exc)}") from None
        self._sock = sock
        return False

    def _tls_context(self) -> ssl.SSLContext:
        """A client context from the URL's options, made per connection (renewed files are picked up)."""
        target = self.target
        try:
            # Purpose SERVER_AUTH: certificate required and hostname checked; the system's CAs unless ca= is given.
            context = ssl.create_default_context(cafile=target.ca)
        except (OSError, ValueError) as exc:
            raise TemporaryError(f"TLS: ca={target.ca}: not a usable PEM CA file ({_tls_reason(exc)})") from None
        context.minimum_version = MINIMUM_TLS
        if target.cert:
            try:
                context.load_cert_chain(target.cert, target.key)
            except (OSError, ValueError) as exc:
                files = f"cert={target.cert}" + (f", key={target.key}" if target.key else "")
                raise TemporaryError(f"TLS: {files}: not a usable client certificate and key "
                                     f"({_tls_reason(exc)})") from None
        return context

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


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's short reason (e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED), or the OS error's text."""
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__


def _describe(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed: {exc.strerror}"
    code = errno.errorcode.get(exc.errno, exc.errno) if isinstance(exc.errno, int) else None
    return f"{exc.strerror or type(exc).__name__}" + (f" ({code})" if code else "")
