"""Delivery adapters, chosen by the scheme of a destination's URL.

`SCHEMES` is the one table from scheme to adapter class; adding a technology
is one line here plus its module. Classes are imported only when resolved, so
importing this package does not pull in requests or a database driver.

This package (courier.adapters) imports nothing of courier.app or courier.tasks (an import
contract in pyproject.toml): it sends and classifies failures (TemporaryError / PermanentError);
the caller decides about retries.
"""
from __future__ import annotations

import importlib

from courier.adapters.base import Adapter, DeliveryError, Outgoing, PermanentError, Sent, TemporaryError, scheme_of

__all__ = [
    "SCHEMES", "UnknownScheme", "scheme_of", "resolve", "open_adapter",
    "Adapter", "DeliveryError", "TemporaryError", "PermanentError", "Outgoing", "Sent",
]

SCHEMES: dict[str, str] = {
    "http": "courier.adapters.http:HttpAdapter",
    "https": "courier.adapters.http:HttpAdapter",
    "file": "courier.adapters.file:FileAdapter",
    "mllp": "courier.adapters.mllp:MllpAdapter",
    "mllps": "courier.adapters.mllp:MllpAdapter",
    "sql": "courier.adapters.sql:SqlAdapter",
    "amqp": "courier.adapters.amqp:AmqpAdapter",
    "amqps": "courier.adapters.amqp:AmqpAdapter",
}


class UnknownScheme(ValueError):
    """A URL whose scheme no adapter handles."""

    def __init__(self, scheme: str):
        self.scheme = scheme
        self.supported = sorted(SCHEMES)
        super().__init__(f"unknown destination URL scheme {scheme!r}; supported: {', '.join(self.supported)}")


def resolve(url: str) -> type[Adapter]:
    """The adapter class for `url`; raises UnknownScheme (a ValueError) if there is none."""
    scheme = scheme_of(url)
    try:
        target = SCHEMES[scheme]
    except KeyError:
        raise UnknownScheme(scheme) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def open_adapter(url: str, **kwargs) -> Adapter:
    """An adapter instance for `url` (kwargs: timeout, secret); ValueError if the URL is unusable."""
    return resolve(url)(url, **kwargs)
