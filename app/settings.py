"""Settings: what a Courier process runs with, as plain frozen data (no I/O, no side effects).

`courier.app.config` reads them from the environment and the YAML routing file and validates both;
this module only says what they are, plus the small parsers (durations, rates, integers) that the
config, the CLI and the MLLP listener share. Imports nothing else of Courier.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from courier.adapters.base import TlsFiles


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every `file:line: path: message`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --- durations and rates ------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: Any) -> float:
    """`"10s"`, `"1h30m"`, `"500ms"`, `"30d"` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif _PLAIN_NUMBER.fullmatch(str(value).strip()):
        seconds = float(str(value).strip())  # "120" from an environment variable: seconds
    else:
        text = str(value).strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 10s, 5m, 1h, 30d)")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise ValueError(f"not a duration: {value!r} (must be finite)")
    if seconds < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    return seconds


_RATE = re.compile(r"(\d+)/(.+)")
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}


def parse_rate(value: Any) -> tuple[int, float]:
    """`"100/s"`, `"600/min"`, `"5000/h"` or `"30/10s"` -> (count, period in seconds)."""
    m = _RATE.fullmatch(str(value).replace(" ", "")) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"not a rate: {value!r} (use COUNT/PERIOD, e.g. 100/s, 600/min, 5000/h)")
    count, per = int(m.group(1)), m.group(2)
    period = _PERIODS.get(per)
    if period is None:
        try:
            period = parse_duration(per)
        except ValueError:
            raise ValueError(f"not a rate: {value!r}: period {per!r} is not s, min, h, day or a duration "
                             "like 10s") from None
    if count < 1 or period <= 0:
        raise ValueError(f"not a rate: {value!r}: count and period must be above zero")
    return count, period


# --- the loaded configuration ---------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    initial: float = 5.0
    max: float = 3600.0
    min_wait: float = 10.0


@dataclass(frozen=True)
class CircuitPolicy:
    failure_threshold: int = 5
    open_for: float = 30.0
    max_open_for: float = 600.0


@dataclass(frozen=True)
class RateLimit:
    """`count` messages per `period` seconds, sustained, with up to `burst` at once (courier.app.store.ratelimit)."""

    count: int
    period: float
    burst: int

    @property
    def interval(self) -> float:
        """Seconds of allowance one message uses up."""
        return self.period / self.count

    def __str__(self) -> str:
        unit = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}.get(self.period)
        return f"{self.count} per {unit or f'{self.period:g} s'} (burst {self.burst})"


@dataclass(frozen=True)
class Source:
    name: str
    allowed_types: tuple[str, ...] = ("*",)
    mllp_allow: tuple[str, ...] = ()
    mllp_senders: tuple[str, ...] = ()  # "APP" or "APP^FACILITY" patterns for MSH-3.1/MSH-4.1
    rate_limit: RateLimit | None = None  # off unless configured
    charset: str | None = None  # how HL7 v2 without MSH-18 is read (an MSH-18 name); None: ASCII

    def allows(self, message_type: str) -> bool:
        return any(fnmatch.fnmatchcase(message_type, p) for p in self.allowed_types)

    def allows_peer(self, address: str) -> bool:
        """Whether an MLLP peer at this IP address may connect as this source (mllp_allow)."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if getattr(ip, "ipv4_mapped", None):  # ::ffff:10.0.0.5 on a dual-stack socket is 10.0.0.5
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.mllp_allow)

    def sent_by(self, application: str, facility: str) -> bool | None:
        """Whether MSH-3.1/MSH-4.1 match mllp_senders; None when the source lists no senders."""
        if not self.mllp_senders:
            return None
        return any(fnmatch.fnmatchcase(f"{application}^{facility}", p if "^" in p else p + "^*")
                   for p in self.mllp_senders)


@dataclass(frozen=True)
class Destination:
    name: str
    url: str
    owner: str = ""
    clearance: str = "deidentified"
    transform: str | None = None
    timeout: float = 10.0
    retry: RetryPolicy = RetryPolicy()
    circuit: CircuitPolicy = CircuitPolicy()
    secret: str | None = field(default=None, repr=False)
    ordered_by: str | None = None
    tls: TlsFiles | None = None  # https:// only: private CA and client certificate files


@dataclass(frozen=True)
class Route:
    source: str
    type: str
    to: tuple[str, ...]

    def matches(self, source: str, message_type: str) -> bool:
        return fnmatch.fnmatchcase(source, self.source) and fnmatch.fnmatchcase(message_type, self.type)


@dataclass(frozen=True)
class RoutingConfig:
    sources: Mapping[str, Source]
    destinations: Mapping[str, Destination]
    routes: tuple[Route, ...]
    path: str = ""

    def destinations_for(self, source: str, message_type: str) -> list[str]:
        """Every destination of every matching route, once each, in config order."""
        names: dict[str, None] = {}
        for route in self.routes:
            if route.matches(source, message_type):
                names.update(dict.fromkeys(route.to))
        return list(names)


# --- environment ----------------------------------------------------------

DEFAULT_DATABASE_URL = "sqlite:///instance/courier.db"  # DATABASE_URL's default (docs/configuration.md)


@dataclass(frozen=True)
class Settings:
    """Process settings from the environment (docs/configuration.md) plus the routing file."""

    database_url: str
    broker_url: str
    config_path: str
    routing: RoutingConfig
    port: int = 8000
    mllp_port: int = 2575
    sentry_dsn: str | None = None
    encryption_key: str | None = field(default=None, repr=False)
    pseudonym_key: bytes | None = field(default=None, repr=False)  # COURIER_PSEUDONYM_KEY (courier.app.domain.governance)
    max_message_bytes: int = 10 * 1024 * 1024
    queue_prefix: str = "courier"
    relay_lease: float = 120.0
    relay_batch: int = 200
    relay_task_size: int = 10
    relay_poll: float = 1.0
    relay_linger: float = 0.02
    log_level: str = "INFO"

    def queue_for(self, destination: str) -> str:
        return f"{self.queue_prefix}.deliver.{destination}"


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """An integer environment variable; ConfigError naming it (settings here, the MLLP listener's options)."""
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ConfigError([f"environment: {name}={env[name]!r} is not an integer"]) from None


def env_duration(env: Mapping[str, str], name: str, default: float) -> float:
    """A duration environment variable ("30s", "10m", seconds); ConfigError naming it."""
    try:
        return parse_duration(env.get(name, default))
    except ValueError as exc:
        raise ConfigError([f"environment: {name}: {exc}"]) from None
