"""Encryption at rest of message bodies and attempt details (COURIER_ENCRYPTION_KEY).

COURIER_ENCRYPTION_KEY is a comma-separated list of Fernet keys (AES-128-CBC + HMAC-SHA256,
from `cryptography`): the first encrypts, every one decrypts, so a key is rotated by putting
a new one first, running `courier keys rotate`, then dropping the old one.

A stored value says how it was stored, so rows written before a key was set still read and
rotation finds what is not under the current key:

    fernet:<key id>:<Fernet token>     key id = first 8 hex digits of SHA-256(key): names the
                                       key without revealing it (never the key in an error)
    anything else                      plaintext, as written without a key

The empty value stays empty (retention's purged bodies). A value under a key that is not
configured, or whose token fails its integrity check, raises Unreadable naming the key id:
never ciphertext or garbage in place of a body.

The column types EncryptedBytes and EncryptedText apply this to every statement, ORM and
Core alike, with the key ring `attach`ed to the engine that runs it: each Store carries the ring of
its own settings (courier.app.store.db.Store.from_settings), so two Courier apps in one process keep
their own keys, and a process without a store has none.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, LargeBinary, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

# `cryptography` is imported where a key is parsed (parse_keys) or a value decrypted: without
# COURIER_ENCRYPTION_KEY no process needs it, and it costs each one about 8 MB of RSS.
if TYPE_CHECKING:
    from cryptography.fernet import Fernet

__all__ = ["KEY_VARIABLE", "PREFIX", "KeyRing", "Unreadable", "EncryptedBytes", "EncryptedText", "parse_keys",
           "attach", "ring_of", "ring_for", "key_id", "stored_key_id"]

KEY_VARIABLE = "COURIER_ENCRYPTION_KEY"
PREFIX = "fernet:"
_STORED = re.compile(rb"fernet:([0-9a-f]{8}):")


class Unreadable(Exception):
    """A stored value this process cannot decrypt; `key_id` names the key it needs (None: corrupted)."""

    def __init__(self, message: str, key_id: str | None):
        super().__init__(message)
        self.key_id = key_id


def key_id(key: bytes | str) -> str:
    """The public name of a key: 8 hex digits of its SHA-256, stored with each value it encrypted."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:8]


def stored_key_id(stored: bytes | str) -> str | None:
    """The key id a stored value is encrypted under, None for plaintext (or empty)."""
    m = _STORED.match(stored.encode("ascii", "replace") if isinstance(stored, str) else stored)
    return m.group(1).decode("ascii") if m else None


@dataclass(frozen=True)
class KeyRing:
    """The configured keys by id, in configured order: the first encrypts, all decrypt."""

    keys: dict[str, Fernet] = field(default_factory=dict)

    @property
    def current_id(self) -> str | None:
        return next(iter(self.keys), None)

    def seal(self, data: bytes) -> bytes:
        """`data` as stored: encrypted under the first key, or as it is when no key is configured."""
        current = self.current_id
        if current is None or not data:
            return data
        return f"{PREFIX}{current}:".encode("ascii") + self.keys[current].encrypt(data)

    def unseal(self, stored: bytes) -> bytes:
        """The plaintext of a stored value; Unreadable if its key is missing or it was altered."""
        m = _STORED.match(stored)
        if m is None:
            return stored  # written before a key was set
        kid = m.group(1).decode("ascii")
        fernet = self.keys.get(kid)
        if fernet is None:
            have = ", ".join(self.keys) or "none"
            raise Unreadable(f"stored value is encrypted under key id {kid}, which is not in {KEY_VARIABLE} "
                             f"(configured key ids: {have})", kid)
        from cryptography.fernet import InvalidToken  # loaded already: parse_keys made `fernet`

        try:
            return fernet.decrypt(stored[m.end():])
        except InvalidToken:
            raise Unreadable(f"stored value under key id {kid} fails its integrity check "
                             "(altered or corrupted in the database)", None) from None

    def seal_text(self, text: str) -> str:
        return self.seal(text.encode("utf-8")).decode("ascii") if self.current_id else text

    def unseal_text(self, stored: str) -> str:
        if stored_key_id(stored) is None:
            return stored
        return self.unseal(stored.encode("utf-8")).decode("utf-8")


def parse_keys(text: str | None) -> KeyRing:
    """The key ring of a COURIER_ENCRYPTION_KEY value; ValueError naming the bad position (never a key)."""
    if not text or not text.strip():
        return KeyRing()
    from cryptography.fernet import Fernet

    parts = [p.strip() for p in text.split(",")]
    keys: dict[str, Fernet] = {}
    for position, part in enumerate(parts, 1):
        where = f"{KEY_VARIABLE}: key {position} of {len(parts)}"
        if not part:
            raise ValueError(f"{where} is empty (keys are separated by single commas)")
        try:
            fernet = Fernet(part)
        except (ValueError, TypeError):  # wrong length or not url-safe base64; the message would not help
            raise ValueError(f"{where} is not a Fernet key (32 random bytes in url-safe base64, 44 characters); "
                             "make one with: courier keys generate") from None
        kid = key_id(part)
        if kid in keys:
            raise ValueError(f"{where} repeats an earlier key (key id {kid})")
        keys[kid] = fernet
    return KeyRing(keys)


NO_KEYS = KeyRing()  # an engine without a ring stores values as they are
_ATTRIBUTE = "courier_key_ring"  # on the engine's dialect, the one object every statement's types are given


def attach(engine: Engine, keys: KeyRing, *, replace: bool = False) -> None:
    """Make `keys` the ring of every Courier column read or written through `engine`.

    An engine shared with a host (or with a second Courier app) keeps one ring: other keys are
    refused unless `replace` (a key change in tests and benchmarks) says they are meant."""
    held = getattr(engine.dialect, _ATTRIBUTE, None)
    if held is not None and not replace and list(held.keys) != list(keys.keys):
        raise ValueError(f"this database engine already carries other {KEY_VARIABLE} keys (key ids "
                         f"{', '.join(held.keys) or 'none'}): every Courier app on one engine must use the same keys")
    setattr(engine.dialect, _ATTRIBUTE, keys)


def ring_of(dialect: Dialect) -> KeyRing:
    return getattr(dialect, _ATTRIBUTE, NO_KEYS)


def ring_for(session: Session | Connection) -> KeyRing:
    """The ring of the engine `session` (or a connection) works on."""
    return ring_of(session.get_bind().dialect if isinstance(session, Session) else session.dialect)


class EncryptedBytes(TypeDecorator):
    """A LargeBinary column stored encrypted under its engine's key ring (message bodies)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else ring_of(dialect).seal(bytes(value))

    def process_result_value(self, value, dialect):
        return None if value is None else ring_of(dialect).unseal(bytes(value))

    def coerce_compared_value(self, op, value):
        return self.impl_instance  # a comparison's literal is not encrypted (it would never match)


class EncryptedText(TypeDecorator):
    """A Text column stored encrypted under its engine's key ring (attempt details, last errors).

    `clear_prefix`: a value starting with it keeps it readable, so SQL can still select by it
    (a fixed word such as "waiting: ", never data); the rest is encrypted.
    """

    impl = Text
    cache_ok = True

    def __init__(self, clear_prefix: str = ""):
        super().__init__()
        self.clear_prefix = clear_prefix

    def _split(self, value: str) -> tuple[str, str]:
        if self.clear_prefix and value.startswith(self.clear_prefix):
            return self.clear_prefix, value[len(self.clear_prefix):]
        return "", value

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        head, rest = self._split(value)
        return head + ring_of(dialect).seal_text(rest)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        head, rest = self._split(value)
        return head + ring_of(dialect).unseal_text(rest)

    def coerce_compared_value(self, op, value):
        return self.impl_instance  # startswith("waiting: ") compares the clear prefix as it is
