"""TLS for Courier's two servers, the HTTP API (gunicorn, deploy/gunicorn.conf.py) and the MLLP listener.

Each reads three variables under its own prefix (COURIER_TLS for HTTP, COURIER_MLLP_TLS for MLLP):
PREFIX_CERT and PREFIX_KEY, PEM files, both or neither (neither: plain TCP); PREFIX_CLIENT_CA, optional,
a PEM bundle: when set, every client must present a certificate signed by it (mutual TLS). TLS 1.2 is
the minimum. A half-done setting stops the process at start with the variable named, never a silent
plain-text listener.
"""
from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import Mapping

from courier.app.settings import ConfigError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
log = logging.getLogger("courier.tls")


@dataclass(frozen=True)
class ServerTls:
    """Where a server's certificate, key and (optional) client CA are; `prefix` names them in errors."""

    prefix: str
    cert: str
    key: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server context; made again only when a file changed, so renewed files need no restart.

        A change that does not load (a renewal half-written, a key not yet matching its certificate)
        keeps the last good context, with a warning once; without one, ConfigError naming the variable.
        """
        stamp = self._stamp()
        last = _CONTEXTS.get(self)
        if last is not None and last[0] == stamp:
            return last[1]
        try:
            context = self._build()
        except ConfigError as exc:
            if last is None:
                raise
            log.warning("TLS files changed but cannot be used (%s); still serving the previous ones",
                        "; ".join(exc.problems))
            context = last[1]
        _CONTEXTS[self] = (stamp, context)
        return context

    def _stamp(self) -> tuple:
        """What tells a changed file: (mtime, ctime, size, inode) of each, None for one that cannot be read."""
        stamp = []
        for path in (self.cert, self.key, self.client_ca):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            stamp.append(st and (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
        return tuple(stamp)

    def _build(self) -> ssl.SSLContext:
        # CLIENT_AUTH: a server's context; no system CAs are loaded, so only client_ca can vouch for a client.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = MINIMUM_VERSION
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError([f"environment: {self.prefix}_CERT={self.cert} / {self.prefix}_KEY={self.key}: "
                               f"not a usable certificate and private key ({_reason(exc)})"]) from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ValueError) as exc:
                raise ConfigError([f"environment: {self.prefix}_CLIENT_CA={self.client_ca}: not a usable PEM "
                                   f"CA bundle ({_reason(exc)})"]) from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


# ServerTls -> (file stamp, context): making a context costs about 2 ms, and both servers ask for one per
# connection. Shared by threads (gunicorn's); a race only builds the same context twice.
_CONTEXTS: dict[ServerTls, tuple[tuple, ssl.SSLContext]] = {}


def from_env(prefix: str, env: Mapping[str, str] | None = None) -> ServerTls | None:
    """The TLS settings under `prefix` (e.g. "COURIER_TLS"), checked by building a context once; None if unset.

    Raises ConfigError when only one of CERT/KEY is set, CLIENT_CA is set without them, or a file
    cannot be read or used.
    """
    env = os.environ if env is None else env
    cert, key, client_ca = (env.get(f"{prefix}_{name}", "").strip() or None for name in ("CERT", "KEY", "CLIENT_CA"))
    if cert is None and key is None:
        if client_ca:
            raise ConfigError([f"environment: {prefix}_CLIENT_CA is set but {prefix}_CERT and {prefix}_KEY are "
                               f"not: client certificates need TLS; set both or unset {prefix}_CLIENT_CA"])
        return None
    if cert is None or key is None:
        missing, present = (f"{prefix}_CERT", f"{prefix}_KEY") if cert is None else (f"{prefix}_KEY", f"{prefix}_CERT")
        raise ConfigError([f"environment: {present} is set but {missing} is not: TLS needs both the certificate "
                           f"and its private key (set neither to serve without TLS)"])
    for name, path in (("CERT", cert), ("KEY", key), ("CLIENT_CA", client_ca)):
        if path is not None and not os.access(path, os.R_OK):
            why = "does not exist" if not os.path.exists(path) else "is not readable by this process"
            raise ConfigError([f"environment: {prefix}_{name}={path}: the file {why}"])
    tls = ServerTls(prefix, cert, key, client_ca)
    _CONTEXTS.pop(tls, None)  # checked now, from the files as they are: not a context cached before
    tls.context()
    return tls


def _reason(exc: BaseException) -> str:
    """OpenSSL's short reason (e.g. KEY_VALUES_MISMATCH) rather than its whole error string."""
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
