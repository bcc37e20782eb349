"""Transforms: turn a stored message into the body one destination receives.

A destination's `transform` names an entry of `REGISTRY` or a
`package.module:function` of the operator's own. A transform that raises is a
permanent error for that delivery (it goes dead with the reason); retrying
the same input through the same code cannot succeed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Envelope:
    """What a transform sees: the stored message and where it is going."""

    message_id: str
    source: str
    message_type: str
    content_type: str
    body: bytes
    destination: str
    clearance: str


Transform = Callable[[Envelope], "tuple[bytes, str]"]


def passthrough(envelope: Envelope) -> tuple[bytes, str]:
    """Send the message exactly as received."""
    return envelope.body, envelope.content_type


REGISTRY: dict[str, Transform] = {"passthrough": passthrough}


def resolve(name: str | None) -> Transform:
    """A registry name or `package.module:function`; LookupError says why not."""
    if not name:
        return passthrough
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise LookupError(f"unknown transform {name!r} (known: {', '.join(sorted(REGISTRY))}; "
                          "or give package.module:function)")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"cannot load transform {name!r}: {exc}") from None
    if not callable(fn):
        raise LookupError(f"transform {name!r} is not callable")
    return fn
