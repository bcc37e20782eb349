"""What every adapter shares: the message handed to it, its answer, and its two kinds of failure.

An adapter sends one message to one destination and says how it went. It never
sleeps, retries or consults a circuit breaker: the caller owns retry policy,
and only needs to know whether a failure is worth retrying.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

# RFC 3986 scheme, read up to the first "+" so "sql+postgresql://" is "sql".
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9.-]*)(?:\+[A-Za-z0-9+.-]*)?:")


def scheme_of(url: str) -> str:
    """The adapter scheme of a URL, lower-cased: "https://x" -> "https", "sql+postgresql://..." -> "sql"."""
    match = _SCHEME.match(url.strip())
    if not match:
        raise ValueError("URL has no scheme (expected e.g. https://host/path or file:///dir)")
    return match.group(1).lower()


class DeliveryError(Exception):
    """A send that did not succeed.

    `detail` is a short reason for operators and the attempt log; it never holds
    the message body (PHI). `retry_after` is the destination's own hint, in seconds.
    """

    def __init__(self, detail: str, *, retry_after: float | None = None, status_code: int | None = None,
                 throttled: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.status_code = status_code
        # The destination is overloaded (429, a timeout): the caller should back off at least a minimum.
        self.throttled = throttled or status_code == 429

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.detail!r}, retry_after={self.retry_after!r}, "
                f"status_code={self.status_code!r})")


class TemporaryError(DeliveryError):
    """Worth retrying later: the destination is down, slow, busy, or asked us to come back."""


class PermanentError(DeliveryError):
    """Never worth retrying: the destination refused this message, or it can never be sent."""


@dataclass(frozen=True)
class Outgoing:
    """One delivery attempt's message, already transformed for its destination."""

    delivery_id: str       # stable across attempts: the idempotency key
    message_id: str
    correlation_id: str
    body: bytes
    content_type: str      # e.g. "application/json" or "application/hl7-v2"
    message_type: str      # e.g. "service.completed" or "HL7v2:ADT^A01"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a destination's TLS (a destination config's ``tls`` block): paths only.

    ``ca`` replaces the system's trust store; ``cert`` is our client certificate and
    ``key`` its private key (left out when the ``cert`` file holds both). The adapter
    reads the files when it connects, not here: the process that checks the config
    (the web host) may legitimately not have them.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self):
        if self.key and not self.cert:
            raise ValueError("key needs cert (the client certificate it belongs to)")


@dataclass(frozen=True)
class Sent:
    """The destination accepted the message."""

    detail: str            # e.g. "HTTP 202" or "wrote /dir/<id>.json"
    status_code: int | None = None


class Adapter:
    """Base class: one instance talks to one destination URL.

    Construction validates the URL with `check_url` and so raises ValueError
    for an unusable one (config validation at start makes that rare). `send`
    reports every failure of the destination or of the message as
    TemporaryError or PermanentError; any other exception is a bug.
    """

    scheme: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None):
        self.check_url(url)
        self.url = url
        self.timeout = timeout
        self.secret = secret

    def send(self, out: Outgoing) -> Sent:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections or handles; the default has none."""

    @classmethod
    def check_url(cls, url: str) -> None:
        """Raise ValueError with a clear message if this adapter cannot use `url`."""
        scheme = scheme_of(url)
        if scheme not in cls.scheme:
            raise ValueError(f"{cls.__name__} handles {', '.join(cls.scheme)} URLs, not {scheme}")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"


def redact(url: str) -> str:
    """The URL without password and query string, fit for logs (those may carry credentials)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))
