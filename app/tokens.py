"""API tokens: random, shown once, stored as SHA-256 hashes, bound to a scope (and a source for ingest)."""
from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiToken, utcnow

SCOPES = ("ingest", "operate", "admin")
# What each scope may do; admin may do everything.
GRANTS = {"ingest": {"ingest"}, "operate": {"read", "replay"}, "admin": {"ingest", "read", "replay", "admin"}}
PREFIX = "courier_"
LAST_USED_RESOLUTION = timedelta(seconds=60)  # don't turn every request into a write


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
    return row


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
    return row


def allows(token: ApiToken, action: str) -> bool:
    return action in GRANTS.get(token.scope, set())
