"""API tokens: random, shown once, stored as SHA-256 hashes, bound to a scope (and a source for ingest)."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from courier.app.store.models import ApiToken, utcnow

SCOPES = ("ingest", "view", "operate", "admin")
# What each scope may do; admin may do everything. `view` reads statuses, counts, attempts and
# errors; `body` (operate, admin) is reading a message's body or a PHI field (the console's detail).
GRANTS = {"ingest": {"ingest"}, "view": {"read"}, "operate": {"read", "body", "replay"},
          "admin": {"ingest", "read", "body", "replay", "admin"}}
PREFIX = "courier_"
LAST_USED_RESOLUTION = timedelta(seconds=60)  # don't turn every request into a write
# A token seen valid is trusted for this long without asking the store again: the lookup was a
# transaction of its own on every request (a third of an ingest's round trips). Revoking in
# this process takes effect at once; in other running processes within this many seconds.
CACHE_SECONDS = 5.0

_cache: dict[str, tuple[float, ApiToken]] = {}
_cache_lock = threading.Lock()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create(session: Session, *, scope: str, source: str | None, name: str = "") -> tuple[ApiToken, str]:
    """Make a token; returns the row and the plaintext, which is never stored."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if scope == "ingest" and not source:
        raise ValueError("an ingest token must be bound to a source (--source NAME)")
    plaintext = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(scope=scope, source=source, name=name, token_hash=_hash(plaintext))
    session.add(row)
    session.flush()
    return row, plaintext


def revoke(session: Session, token_id: str) -> ApiToken | None:
    row = session.get(ApiToken, token_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    with _cache_lock:
        _cache.clear()
    return row


def cached(plaintext: str) -> ApiToken | None:
    """The token `authenticate` found for `plaintext` less than CACHE_SECONDS ago, detached; else None."""
    hit = _cache.get(_hash(plaintext))
    if hit is None or hit[0] < time.monotonic():
        return None
    return hit[1]


def remember(plaintext: str, token: ApiToken) -> None:
    """Keep a detached, valid token for CACHE_SECONDS."""
    with _cache_lock:
        if len(_cache) > 10_000:  # a flood of distinct valid tokens cannot grow memory without bound
            _cache.clear()
        _cache[_hash(plaintext)] = (time.monotonic() + CACHE_SECONDS, token)


def authenticate(session: Session, plaintext: str) -> ApiToken | None:
    """The live token for `plaintext`, or None. Lookup is by hash, so timing reveals nothing of the secret."""
    if not plaintext.startswith(PREFIX) or len(plaintext) > 200:
        return None
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == _hash(plaintext))).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()  # now: the caller may expunge the row before its commit, which would drop the change
    return row


def allows(token: ApiToken, action: str) -> bool:
    return action in GRANTS.get(token.scope, set())
