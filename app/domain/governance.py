"""Data minimisation: what of a canonical event a destination may see, by its clearance.

`minimise(event, clearance, key)` returns a copy of a canonical envelope
(`{"type", "version", "id", "occurred_at", "data"}`) in which every field classified
above the clearance (courier.app.domain.canonical: phi > limited > none) is removed, except the join
keys marked `pseudonymise` in courier.app.domain.canonical, which are replaced by `pseudonym()`:

    psn:<24 lowercase base32 characters>     HMAC-SHA256(key, namespace NUL value), 120 bits

Stable (same key, namespace and value, same pseudonym: the ERP can join on it), keyed
(without the key nobody can recompute or reverse one, not even by trying every MRN),
and separated by namespace (a visit number equal to an MRN gets another pseudonym).

Fails closed: below phi, anything the schema does not classify (an unknown event type or
version, an unknown key, a value of the wrong shape) is removed; a pseudonym needed
without a key raises MissingKey rather than sending the raw value or silently dropping
the join key. The key is COURIER_PSEUDONYM_KEY (at least 32 characters), read from the
process environment by the transforms and checked at start by courier.app.settings.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import numbers
import os
import re
from typing import Any, Mapping

from marshmallow import Schema, fields

from courier.app.domain import canonical

__all__ = ["KEY_VARIABLE", "MIN_KEY_LENGTH", "MissingKey", "PSEUDONYM", "is_pseudonym", "minimise",
           "parse_key", "process_key", "pseudonym"]

KEY_VARIABLE = "COURIER_PSEUDONYM_KEY"
MIN_KEY_LENGTH = 32  # characters: with MRNs as inputs, the key's secrecy is all the protection there is
PREFIX = "psn:"
_LENGTH = 24  # base32 characters: 120 bits, collision-free for any hospital's population
PSEUDONYM = re.compile(rf"{PREFIX}[a-z2-7]{{{_LENGTH}}}")


class MissingKey(RuntimeError):
    """A pseudonym is needed but no key is configured."""


def parse_key(text: str | None) -> bytes | None:
    """The key as bytes (None if unset or empty); ValueError if it is too short to be a secret."""
    if not text:
        return None
    if len(text) < MIN_KEY_LENGTH:
        raise ValueError(f"{KEY_VARIABLE} must be at least {MIN_KEY_LENGTH} characters (it has {len(text)}); "
                         "make one with: openssl rand -base64 32")
    return text.encode("utf-8")


def process_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The key of this process's environment (what a worker formatting a delivery uses)."""
    return parse_key((os.environ if env is None else env).get(KEY_VARIABLE))


def pseudonym(value: str, namespace: str, key: bytes) -> str:
    """The keyed pseudonym of one identifier value in its namespace ('patient', 'visit', ...)."""
    digest = hmac.new(key, f"{namespace}\x00{value}".encode("utf-8"), hashlib.sha256).digest()
    return PREFIX + base64.b32encode(digest).decode("ascii").lower()[:_LENGTH]


def is_pseudonym(value: Any) -> bool:
    return isinstance(value, str) and PSEUDONYM.fullmatch(value) is not None


_DROP = object()  # a value the destination may not see


def minimise(event: Mapping[str, Any], clearance: str, key: bytes | None) -> dict:
    """A copy of a canonical envelope with only what `clearance` may see (see the module docstring)."""
    if clearance not in canonical.CLEARANCES:
        raise ValueError(f"unknown clearance {clearance!r}")
    if clearance == "phi":
        return _copy(event)  # phi sees everything, unknown fields included: nothing to protect from it
    out: dict = {}
    for name, value in event.items():
        level = canonical.ENVELOPE_CLASSIFICATION.get(name)
        if level is not None and canonical.visible_to(level, clearance):
            out[name] = _copy(value)
    version = event.get("version", 1)
    schema = canonical.EVENTS.get((event.get("type"), 1 if version is None else version))
    data = event.get("data")
    if schema is not None and isinstance(data, dict):
        kept = _object(canonical._instance(schema), data, clearance, key)
        out["data"] = {} if kept is _DROP else kept
    elif "data" in event:
        out["data"] = {}  # not a canonical event: nothing in it is classified, so nothing of it goes
    return out


def _object(schema: Schema, document: Any, clearance: str, key: bytes | None, item: bool = False) -> Any:
    if not isinstance(document, dict):
        return _DROP
    out = {}
    for name, value in document.items():
        field = schema.fields.get(name)
        kept = _DROP if field is None else _field(field, value, clearance, key)
        if kept is not _DROP:
            out[name] = kept
        elif item and field is not None and field.required:
            return _DROP  # a list item without what makes it one (a telecom without its number) goes whole
    return out or _DROP  # an object emptied of everything says nothing worth sending


def _field(field: fields.Field, value: Any, clearance: str, key: bytes | None) -> Any:
    if value is None:
        return _DROP
    nested = field.inner if isinstance(field, fields.List) else field
    if isinstance(nested, fields.Nested) and (nested.many or nested is not field):  # a list of objects
        return _items(value, lambda one: _object(nested.schema, one, clearance, key, item=True))
    if isinstance(field, fields.Nested):
        return _object(field.schema, value, clearance, key)
    if isinstance(field, fields.List) and isinstance(field.inner, fields.List):
        return _items(value, lambda one: _field(field.inner, one, clearance, key))
    # A leaf, or a list of plain values (one leaf, classified on the list, as canonical.walk reads it).
    level = canonical.classification(field)
    if isinstance(field, fields.List) and canonical.classification(field.inner) not in (None, level):
        level = None  # the list and its items disagree: unclassified
    items = value if isinstance(field, fields.List) and isinstance(value, (list, tuple)) else [value]
    if level is None or not all(map(_scalar, items)):  # an object where a value belongs: unclassified too
        return _DROP
    if canonical.visible_to(level, clearance):
        return _copy(value)
    namespace = field.metadata.get("pseudonymise")
    if namespace and isinstance(value, str) and value:
        if key is None:
            raise MissingKey(f"{KEY_VARIABLE} is not set: the {namespace} identifier must be pseudonymised "
                             f"for a {clearance} destination")
        return pseudonym(value, namespace, key)
    return _DROP


def _items(value: Any, one) -> Any:
    if not isinstance(value, (list, tuple)):
        return _DROP
    kept = [k for k in map(one, value) if k is not _DROP]
    return kept or _DROP


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, numbers.Number))  # Decimal and bool count


def _copy(value: Any) -> Any:
    """A deep copy of JSON-like data (dicts, lists, scalars)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value
