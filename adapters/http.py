"""HTTP(S) adapter: one POST per delivery.

URL
===

.. code-block::

    http://HOST[:PORT][/PATH][?QUERY]
    https://[USER:PASSWORD@]HOST[:PORT][/PATH][?QUERY]

The URL is used as is: the query string is sent unchanged (it is the
destination's, not ours), and user info becomes HTTP Basic auth. Proxy
settings come from the usual environment variables (HTTPS_PROXY, NO_PROXY,
REQUESTS_CA_BUNDLE), resolved once, as requests resolves them, when the
adapter is made.

Options
=======

There are no URL options. The destination's config gives:

* ``timeout``: seconds, used as both the connect and the read timeout.
* ``secret``: when set, each request is signed (below).
* ``tls`` (``https://`` only; ``courier.adapters.base.TlsFiles``): PEM files, each optional.
  ``ca``: the CA(s) that sign the destination's certificate, used instead of
  the system store and REQUESTS_CA_BUNDLE (a private CA). ``cert``: our client
  certificate, for a destination that requires mutual TLS; ``key``: its private
  key (leave it out if the ``cert`` file holds both; ``key`` without ``cert`` is
  an error).

The destination's certificate and name are always verified; there is
deliberately no option to turn that off (as for ``mllps://``). The files are
read by the process that sends (the worker), when it connects: a renewed file
is used from the next new connection on, and a missing or unreadable one makes
each send a TemporaryError ``TLS: ca=PATH: cannot read (...)``.

Request
=======

``POST`` of the body with ``Content-Type``, ``Idempotency-Key: <delivery id>``
(the same on every attempt, so the destination can drop duplicates),
``X-Correlation-ID``, ``User-Agent: courier/<version>`` and, with a secret,
``X-Courier-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``
(the key is the secret's UTF-8 bytes). Delivery id, correlation id and
content type must be printable ASCII, or the send is a PermanentError.
Redirects are not followed.

Outcome
=======

* 2xx: sent.
* 408, 425, 429, 5xx, timeouts, refused/reset connections, DNS and TLS
  failures: TemporaryError, with ``Retry-After`` (seconds or HTTP-date) as
  ``retry_after``. TLS failures (certificate not trusted or not for this name,
  our client certificate refused or missing, a ``tls`` file unusable) have a
  detail starting ``TLS:``, as ``mllps://`` does: the operator fixes a
  certificate and the held deliveries go out unchanged.
* Any other status (3xx, 4xx): PermanentError.

Error details carry the status and the first line of the destination's
answer (at most 200 characters), never our body.

Threads: an instance holds one urllib3 connection pool of one kept-alive
connection and is not thread-safe; use one adapter per thread. urllib3, not
requests, sends: requests' per-request work (settings merged, hooks, the CA
bundle's path checked on disk) was a third of the worker's CPU.
"""
from __future__ import annotations

import email.utils
import errno
import hashlib
import hmac
import os
import re
import socket
import ssl
import time
from datetime import timezone
from importlib import metadata
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationValueError, NewConnectionError,
                                ReadTimeoutError)
from urllib3.exceptions import SSLError as Urllib3SSLError

from courier.adapters.base import (Adapter, DeliveryError, Outgoing, PermanentError, Sent, TemporaryError, TlsFiles,
                                   scheme_of)

try:
    _VERSION = metadata.version("courier")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    _VERSION = "0"

USER_AGENT = f"courier/{_VERSION}"

# 408 Request Timeout, 425 Too Early, 429 Too Many Requests: the request was fine,
# the moment was not. Every 5xx is the destination's own trouble.
TEMPORARY_STATUSES = frozenset({408, 425, 429})

_DETAIL_CHARS = 200
# Read at most this much of an answer for its first line; a longer answer is
# abandoned (its connection closed) rather than downloaded.
_SNIPPET_BYTES = 64 * 1024
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")
_CHARSET = re.compile(r"charset=[\"']?([\w.:-]+)", re.IGNORECASE)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The X-Courier-Signature value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or garbage."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no claim about local time
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class HttpAdapter(Adapter):
    """POSTs each delivery to one URL over a kept-alive session."""

    scheme = ("http", "https")

    # `tls` is this adapter's own keyword, not the base class's: no other adapter takes TLS files
    # from the config (mllps:// has them in its URL), and one that silently ignored them would
    # hide a mistake. The config check allows `tls` on https:// destinations only.
    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None,
                 tls: TlsFiles | None = None):
        super().__init__(url, timeout=timeout, secret=secret)
        if tls is not None and scheme_of(url) != "https":
            raise ValueError(f"TLS files apply to https:// URLs only, not {scheme_of(url)}://")
        self.tls = tls
        # Here, not at the top: the config check resolves this class in every process (web, relay) and only
        # a worker makes one; requests costs each of those processes about 3 MB of RSS.
        import requests

        # The environment's proxy and CA settings for this URL, resolved once as requests would.
        environment = requests.Session().merge_environment_settings(url, {}, None, None, None)
        verify = tls.ca if tls and tls.ca else environment["verify"]
        if verify is True:
            verify = requests.certs.where()  # requests' own CA bundle (certifi), as before
        cert, key = environment["cert"], None
        if isinstance(cert, tuple):
            cert, key = cert
        if tls and tls.cert:
            cert, key = tls.cert, tls.key
        # Files, not a context: urllib3 reads them at each new connection, so renewed ones need no restart.
        pool = dict(num_pools=1, maxsize=1, cert_reqs="CERT_REQUIRED", cert_file=cert, key_file=key,
                    **({"ca_cert_dir": verify} if os.path.isdir(verify) else {"ca_certs": verify}))
        parts = urlsplit(url)
        self._headers = {}
        if parts.username is not None:
            self._headers.update(urllib3.make_headers(
                basic_auth=f"{unquote(parts.username)}:{unquote(parts.password or '')}"))
        proxy = requests.utils.select_proxy(url, environment["proxies"])
        if proxy:
            proxy_parts = urlsplit(proxy)
            proxy_headers = urllib3.make_headers(proxy_basic_auth=f"{unquote(proxy_parts.username)}:"
                                                 f"{unquote(proxy_parts.password or '')}") \
                if proxy_parts.username is not None else None
            self._manager = urllib3.ProxyManager(proxy, proxy_headers=proxy_headers, **pool)
        else:
            self._manager = urllib3.PoolManager(**pool)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        if re.search(r"[\s\x00-\x1f\x7f]", url):
            raise ValueError("URL contains spaces or control characters; percent-encode them (%20)")
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"{parts.scheme} URL needs a host, e.g. {parts.scheme}://host.example/path")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{parts.scheme} URL has an invalid port (expected 1-65535)") from None
        if parts.port == 0:
            raise ValueError(f"{parts.scheme} URL has an invalid port (expected 1-65535)")

    def send(self, out: Outgoing) -> Sent:
        for name, value in (("delivery id", out.delivery_id), ("correlation id", out.correlation_id),
                            ("content type", out.content_type)):
            if not _HEADER_VALUE.fullmatch(value):
                # http.client would raise something we cannot classify; resending cannot help.
                raise PermanentError(f"{name} cannot go in an HTTP header (printable ASCII only)")
        headers = {
            "Content-Type": out.content_type,
            "Idempotency-Key": out.delivery_id,
            "X-Correlation-ID": out.correlation_id,
            "User-Agent": USER_AGENT,
        }
        if self.secret:
            headers["X-Courier-Signature"] = sign(self.secret, out.body, int(time.time()))
        if self.tls is not None:
            self._check_tls_files()
        try:
            # Not preloaded: we read the answer ourselves, and only its head. No retries, no redirects:
            # retrying is the outbox's job, and a redirect is the destination's configuration to fix.
            resp = self._manager.urlopen("POST", self.url, body=out.body, headers={**self._headers, **headers},
                                         timeout=self._timeout, retries=False, redirect=False,
                                         preload_content=False, assert_same_host=False)
        except HTTPError as exc:
            raise _classify_exception(exc, self.timeout) from None
        try:
            return _classify_response(resp)
        finally:
            resp.release_conn()

    def _check_tls_files(self) -> None:
        """TemporaryError naming the file if a `tls` file cannot be read: requests would raise a bare
        OSError for a missing one, or a connection error for an unreadable one."""
        for name in ("ca", "cert", "key"):
            path = getattr(self.tls, name)
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise TemporaryError(f"TLS: {name}={path}: cannot read ({_root_cause(exc)})") from None

    def close(self) -> None:
        self._manager.clear()


def _classify_response(resp: urllib3.BaseHTTPResponse) -> Sent:
    code = resp.status
    if 200 <= code < 300:
        # The destination said yes; a broken answer body after that changes nothing.
        _first_line(resp)
        return Sent(detail=f"HTTP {code}", status_code=code)
    detail = f"HTTP {code}"
    if 300 <= code < 400 and resp.headers.get("Location"):
        detail += f" redirect to {_clean(resp.headers['Location'])} not followed"
    line = _first_line(resp)
    if line:
        detail += f": {line}"
    if code in TEMPORARY_STATUSES or 500 <= code < 600:
        raise TemporaryError(detail, status_code=code,
                             retry_after=parse_retry_after(resp.headers.get("Retry-After")))
    raise PermanentError(detail, status_code=code)


def _first_line(resp: urllib3.BaseHTTPResponse) -> str:
    """The first non-blank line of the answer, cleaned and cut to fit a detail.

    An answer read to its end leaves the connection fit for the next send; a longer one (or a
    broken one) closes it rather than download the rest.
    """
    try:
        data = resp.read(_SNIPPET_BYTES)
        if len(data) >= _SNIPPET_BYTES:
            resp.close()
    except (HTTPError, OSError):
        data = b""  # the status already decides; a broken body only costs us the detail
        resp.close()
    charset = _CHARSET.search(resp.headers.get("Content-Type", ""))
    try:
        text = data.decode(charset.group(1) if charset else "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = data.decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.strip():
            return _clean(line)
    return ""


def _clean(text: str) -> str:
    text = _UNPRINTABLE.sub("?", text.strip())
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS - 3] + "..."


def _classify_exception(exc: HTTPError, timeout: float) -> DeliveryError:
    # urllib3's messages may quote the URL (query strings may hold credentials), so the detail
    # is rebuilt from the root cause instead.
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return TemporaryError(f"connect timeout after {timeout:g}s")
    if isinstance(exc, ReadTimeoutError):
        return TemporaryError(f"read timeout after {timeout:g}s", throttled=True)
    if isinstance(exc, LocationValueError):
        return PermanentError(f"request cannot be sent: {type(exc).__name__}")
    tls_error = next((cur for cur in _chain(exc) if isinstance(cur, ssl.SSLError)), None)
    if isinstance(exc, Urllib3SSLError) or tls_error is not None:
        # Certificates expire and get renewed: the operator's problem, not the message's. With TLS 1.3
        # a destination refuses our client certificate after the handshake, so that SSLError comes
        # wrapped in a connection error: hence the search of the chain.
        return TemporaryError(f"TLS: {_tls_reason(tls_error) if tls_error else _root_cause(exc)}")
    # Refused, reset, closed without an answer, DNS, the proxy: all "the destination is not there now".
    return TemporaryError(f"connection failed: {_root_cause(exc)}")


def _chain(exc: BaseException):
    """Every exception an exception was made from, outermost first (depth-first, each once)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        # urllib3's ProtocolError holds the socket error in its args; a proxy error in .original_error.
        for nxt in (getattr(cur, "original_error", None), cur.__cause__, cur.__context__, *cur.args):
            if isinstance(nxt, BaseException):
                stack.append(nxt)


def _tls_reason(exc: ssl.SSLError) -> str:
    """What went wrong in TLS, in words an operator can act on (the errno of an SSLError means nothing)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _clean(f"the destination's certificate is not accepted: {exc.verify_message} "
                      f"(check its certificate and the destination's tls.ca)")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return ("the destination ended the connection during TLS (also how it refuses a missing or "
                "untrusted client certificate: the destination's tls.cert and tls.key)")
    reason = getattr(exc, "reason", None)
    if reason and "ALERT" in reason:  # the destination refused the handshake, e.g. TLSV1_ALERT_UNKNOWN_CA
        return _clean(f"the destination refused the handshake: {reason} (if about our client certificate: "
                      f"the destination's tls.cert and tls.key)")
    if reason:  # e.g. NO_CERTIFICATE_OR_CRL_FOUND: a tls file that is not the PEM it should be
        return _clean(f"{reason} (check the destination's tls files)")
    return _clean(f"{type(exc).__name__}: {exc}")


def _root_cause(exc: BaseException) -> str:
    """The innermost OS-level reason in an exception chain, e.g. "Connection refused (ECONNREFUSED)"."""
    fallback = None
    for cur in _chain(exc):
        if isinstance(cur, OSError):
            if isinstance(cur, socket.gaierror):
                return _clean(f"DNS lookup failed: {cur.strerror}")
            if cur.strerror:
                code = errno.errorcode.get(cur.errno, cur.errno) if isinstance(cur.errno, int) else cur.errno
                return _clean(f"{cur.strerror} ({code})")
            fallback = fallback or _clean(f"{type(cur).__name__}: {cur}")
    return fallback or type(exc).__name__
