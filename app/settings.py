"""Settings: the environment variables of SPEC.md plus the YAML routing file.

Everything is validated when a process starts, so a typo in `courier.yml`
stops the process with `file:line: where: what` instead of dead-lettering
messages at three in the morning. `courier config check` runs the same code.

Data governance is checked here too: a destination below clearance phi must have a
transform that minimises (courier.app.domain.transforms: canonical ones), and those need
COURIER_PSEUDONYM_KEY; every route's transforms must be able to format the types routed
to them (see ConfigSchema._governance).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from courier import adapters
from courier.adapters.base import TlsFiles
from courier.app.domain import canonical, governance, transforms
from courier.app.store import crypto


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every `file:line: path: message`."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --- durations ------------------------------------------------------------

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


class Duration(fields.Field):
    """A marshmallow field for durations, loaded as float seconds."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc


# --- the YAML schema ------------------------------------------------------

CLEARANCES = tuple(canonical.CLEARANCES)  # phi, limited, deidentified
ORDER_KEY_GRAMMAR = re.compile(r"(?:[A-Z][A-Z0-9]{2}-\d+(?:\.\d+)?|[A-Za-z_]\w*(?:\.\w+)*)\Z")


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


class Rate(fields.Field):
    """A marshmallow field for rate limits, loaded as (count, period seconds)."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return parse_rate(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc


class StrictSchema(Schema):
    """Unknown keys are errors, so a typo is reported instead of silently ignored."""

    class Meta:
        unknown = RAISE


class RetrySchema(StrictSchema):
    max_attempts = fields.Integer(load_default=8, validate=validate.Range(min=1, max=1000))
    initial = Duration(load_default=5.0)
    max = Duration(load_default=3600.0)
    min_wait = Duration(load_default=10.0)  # floor after a 429 or a timeout: the destination is overloaded


class CircuitSchema(StrictSchema):
    failure_threshold = fields.Integer(load_default=5, validate=validate.Range(min=1))
    open_for = Duration(load_default=30.0)
    max_open_for = Duration(load_default=600.0)  # open_for doubles on each trip in a row, up to this


class SourceSchema(StrictSchema):
    allowed_types = fields.List(fields.String(validate=validate.Length(min=1)), load_default=["*"])
    mllp_allow = fields.List(fields.String(), load_default=list)
    # MSH-3/MSH-4 of the messages this source sends over MLLP, as "APP" or "APP^FACILITY"
    # shell patterns; needed when several sources share a peer address (one interface engine).
    mllp_senders = fields.List(fields.String(validate=validate.Length(min=1, max=200)), load_default=list)
    # Messages (not requests) this source may send, over HTTP and MLLP together: "600/min". Off when left out.
    rate_limit = Rate(load_default=None, allow_none=True)
    burst = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1, max=1_000_000))

    @validates_schema
    def _burst(self, data, **kwargs):
        if data.get("burst") is not None and data.get("rate_limit") is None:
            raise ValidationError({"burst": ["burst needs rate_limit (e.g. rate_limit: 600/min)"]})

    @validates_schema
    def _networks(self, data, **kwargs):
        errors = {}
        for i, net in enumerate(data.get("mllp_allow", [])):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                errors[i] = [str(exc)]
        if errors:
            raise ValidationError({"mllp_allow": errors})

    @validates_schema
    def _senders(self, data, **kwargs):
        errors = {}
        for i, pattern in enumerate(data.get("mllp_senders", [])):
            if pattern.count("^") > 1 or not pattern.split("^")[0] or re.search(r"[\s|~\\&]", pattern):
                errors[i] = ["use APP or APP^FACILITY (MSH-3.1, MSH-4.1; shell patterns like LAB* allowed), "
                             "no spaces or other HL7 delimiters"]
        if errors:
            raise ValidationError({"mllp_senders": errors})


class TlsSchema(StrictSchema):
    """An https:// destination's TLS files. Paths only: the workers read them when they connect,
    and the host that checks the config (the web process) may not have them."""

    ca = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1))
    cert = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1))
    key = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1))

    @validates_schema
    def _files(self, data, **kwargs):
        try:
            TlsFiles(**data)  # its one rule: key needs cert
        except ValueError as exc:
            raise ValidationError(str(exc), "key") from None

    @post_load
    def _make(self, data, **kwargs):
        return TlsFiles(**data)


class DestinationSchema(StrictSchema):
    url = fields.String(required=True)
    owner = fields.String(load_default="")
    clearance = fields.String(load_default="deidentified", validate=validate.OneOf(CLEARANCES))
    transform = fields.String(load_default=None, allow_none=True)
    timeout = Duration(load_default=10.0)
    retry = fields.Nested(RetrySchema, load_default=lambda: RetrySchema().load({}))
    circuit = fields.Nested(CircuitSchema, load_default=lambda: CircuitSchema().load({}))
    secret = fields.String(load_default=None, allow_none=True)
    tls = fields.Nested(TlsSchema, load_default=None, allow_none=True)
    # Same key -> delivered in acceptance order: "data.patient_id" (JSON event) or "PID-3" (HL7 v2 field).
    ordered_by = fields.String(load_default=None, allow_none=True, validate=validate.Regexp(
        ORDER_KEY_GRAMMAR, error="use a dotted JSON path like data.patient_id or an HL7 field like PID-3 or PID-3.1"))

    # skip_on_field_errors=False: a typo elsewhere in the destination must not hide a bad URL or transform.
    @validates_schema(skip_on_field_errors=False)
    def _url(self, data, **kwargs):
        errors = {}
        if "url" in data:
            try:
                adapters.resolve(data["url"]).check_url(data["url"])
            except ValueError as exc:
                errors["url"] = [str(exc)]
            else:
                scheme = adapters.scheme_of(data["url"])
                if data.get("tls") is not None and scheme != "https":
                    errors["tls"] = [f"tls applies to https:// URLs only, not {scheme}:// "
                                     "(mllps:// takes ca=, cert= and key= in its URL)"]
        if data.get("transform"):
            try:
                transforms.resolve(data["transform"])
            except LookupError as exc:
                errors["transform"] = [str(exc)]
        if errors:
            raise ValidationError(errors)


class MatchSchema(StrictSchema):
    source = fields.String(load_default="*")
    type = fields.String(load_default="*")


class RouteSchema(StrictSchema):
    match = fields.Nested(MatchSchema, load_default=lambda: MatchSchema().load({}))
    to = fields.List(fields.String(), required=True, validate=validate.Length(min=1))


_WILDCARD = re.compile(r"[*?\[]")


def _routed_types(route: dict, sources: dict) -> list[str]:
    """The types a route can carry that a check can name: known canonical and mapped HL7 v2
    types, plus the literal types of its sources and match, each one its sources allow."""
    pattern = route["match"]["type"]
    allowed = [s["allowed_types"] for n, s in sources.items() if fnmatch.fnmatchcase(n, route["match"]["source"])]
    candidates = set(transforms.known_types()) | {p for patterns in allowed for p in patterns if not _WILDCARD.search(p)}
    if not _WILDCARD.search(pattern):
        candidates.add(pattern)
    return sorted(t for t in candidates if fnmatch.fnmatchcase(t, pattern)
                  and any(fnmatch.fnmatchcase(t, p) for patterns in allowed for p in patterns))


def _resolved(name: str | None) -> transforms.Transform | None:
    try:
        return transforms.resolve(name)
    except LookupError:
        return None  # reported by DestinationSchema


class ConfigSchema(StrictSchema):
    sources = fields.Dict(keys=fields.String(), values=fields.Nested(SourceSchema), load_default=dict)
    destinations = fields.Dict(keys=fields.String(), values=fields.Nested(DestinationSchema), load_default=dict)
    routes = fields.List(fields.Nested(RouteSchema), load_default=list)

    def __init__(self, *, pseudonym_key: bytes | None = None, encrypted: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.pseudonym_key = pseudonym_key  # COURIER_PSEUDONYM_KEY: destinations below phi need it
        self.encrypted = encrypted  # COURIER_ENCRYPTION_KEY is set: so do destinations with ordered_by

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _governance(self, data, original_data, **kwargs):
        """No PHI to a destination not cleared for it, no order key stored in the clear under
        encryption at rest, and no route to a transform that cannot format what it carries. A destination with errors of its own is checked on its valid fields."""
        errors: dict = {}
        destinations = data.get("destinations", {})
        raw = original_data.get("destinations") if isinstance(original_data, dict) else None
        for name, dest in destinations.items():
            # A destination with errors of its own arrives here without its invalid fields.
            transform, clearance = _resolved(dest.get("transform")), dest.get("clearance")
            if transform is None or clearance in (None, "phi"):
                continue
            given = raw.get(name) if isinstance(raw, dict) and isinstance(raw.get(name), dict) else {}
            said = f"clearance {clearance}{'' if 'clearance' in given else ' (the default)'}"
            if not transforms.spec_of(transform).canonical:
                where = "transform" if "transform" in given else "clearance" if "clearance" in given else None
                message = (f"{said}, but transform "
                           f"{dest.get('transform') or 'passthrough (the default)'} sends messages as they came, PHI "
                           "and all: give it a transform that minimises (canonical_json, erp_csv, hl7_dft_p03, "
                           "sql_row, or your own made with courier.app.domain.transforms.canonical_transform), or, if "
                           f"{name} may see PHI, clearance: phi")
            elif self.pseudonym_key is None:
                where = "clearance" if "clearance" in given else "transform"
                message = (f"{said}: patient, visit and other identifiers reach {name} as keyed "
                           f"pseudonyms, but {governance.KEY_VARIABLE} is not set; set it to a secret of at least "
                           f"{governance.MIN_KEY_LENGTH} characters (openssl rand -base64 32) and keep it: "
                           "another key gives other pseudonyms, and joins on the old ones break")
            else:
                continue
            errors.setdefault("destinations", {})[name] = {where: [message]} if where else [message]
        if self.encrypted and self.pseudonym_key is None:  # courier.app.store.ordering.stored pseudonymises order keys
            for name, dest in destinations.items():
                if dest.get("ordered_by"):
                    message = (f"{name} keeps its deliveries in order by {dest['ordered_by']!r}; with "
                               f"{crypto.KEY_VARIABLE} set, order keys (often PHI) are stored as keyed "
                               f"pseudonyms, but {governance.KEY_VARIABLE} is not set; set it to a secret "
                               f"of at least {governance.MIN_KEY_LENGTH} characters "
                               "(openssl rand -base64 32) and keep it: another key gives other pseudonyms, and "
                               "deliveries already waiting no longer hold back new ones of their key")
                    entry = errors.setdefault("destinations", {}).setdefault(name, {})
                    (entry.setdefault("ordered_by", []) if isinstance(entry, dict) else entry).append(message)
        if "sources" in data:
            for i, route in enumerate(data.get("routes", [])):
                for j, name in enumerate(route["to"]):
                    problem = self._route_problem(route, name, destinations.get(name), data["sources"])
                    if problem:
                        errors.setdefault("routes", {}).setdefault(i, {}).setdefault("to", {})[j] = [problem]
        if errors:
            raise ValidationError(errors)

    @staticmethod
    def _route_problem(route: dict, name: str, dest: dict | None, sources: dict) -> str | None:
        transform = _resolved(dest.get("transform")) if dest else None
        spec = transforms.spec_of(transform) if transform else None
        if spec is None or not spec.canonical:
            return None  # unknown destination or transform (reported elsewhere), or one that takes anything
        label = f"destination {name} (transform {dest['transform']})"
        types = _routed_types(route, sources)
        if not types:
            return (f"{label} formats canonical events, but match.type {route['match']['type']!r} matches no "
                    "canonical event type or mapped HL7 v2 type that this route's sources may send")
        refused = [r for r in (transforms.refusal(transform, t) for t in types) if r]
        if not refused:
            return None
        formats = ", ".join(sorted(spec.accepts)) if spec.accepts else "canonical event types"
        return (f"{label} cannot format {', '.join(refused)}: it formats {formats}; "
                "narrow this route's match.type or send those types elsewhere")

    # skip_on_field_errors=False: a bad duration must not hide a route to an unknown destination.
    # A section that failed validation is missing from `data`; its names come from the original.
    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _references(self, data, original_data, **kwargs):
        def names(section: str) -> list[str]:
            if section in data:
                return list(data[section])
            raw = original_data.get(section) if isinstance(original_data, dict) else None
            return [str(k) for k in raw] if isinstance(raw, dict) else []

        destinations, sources = names("destinations"), names("sources")
        errors: dict = {}
        for i, route in enumerate(data.get("routes", [])):
            for j, name in enumerate(route["to"]):
                if name not in destinations:
                    errors.setdefault("routes", {}).setdefault(i, {}).setdefault("to", {})[j] = [
                        f"unknown destination {name!r}"]
            source = route["match"]["source"]
            if not any(fnmatch.fnmatchcase(s, source) for s in sources):
                errors.setdefault("routes", {}).setdefault(i, {}).setdefault("match", {})["source"] = [
                    f"no source matches {source!r}"]
        for name in destinations:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                errors.setdefault("destinations", {})[name] = {"key": [
                    "destination names are 1-64 letters, digits, '.', '_' or '-' (they name queues)"]}
        if errors:
            raise ValidationError(errors)


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


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, env: Mapping[str, str], missing: list[tuple[tuple, str]],
                path: tuple = ()) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in strings, so secrets stay out of the file.

    Unset variables without a default are appended to `missing` as (key path, name).
    """
    if isinstance(value, dict):
        return {k: _expand_env(v, env, missing, path + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, env, missing, path + (i,)) for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            # Shell semantics: `${VAR:-default}` uses the default when VAR is unset *or empty*.
            if env.get(m.group(1)):
                return env[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            if m.group(1) in env:
                return ""
            missing.append((path, m.group(1)))
            return ""
        return _ENV_REF.sub(sub, value)
    return value


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path in a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


def _flatten(errors: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """marshmallow's nested error dict -> [(path, message)]; Dict fields' 'value' level is dropped."""
    if isinstance(errors, dict):
        out = []
        for key, sub in errors.items():
            if key in ("value", "_schema"):
                out += _flatten(sub, path)
            elif key == "key":
                out += _flatten(sub, path)
            else:
                out += _flatten(sub, path + (key,))
        return out
    if isinstance(errors, list) and all(isinstance(e, str) for e in errors):
        return [(path, e) for e in errors]
    if isinstance(errors, list):
        return [item for e in errors for item in _flatten(e, path)]
    return [(path, str(errors))]


def _locate(path: tuple, lines: dict[tuple, int]) -> int | None:
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def load_routing(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> RoutingConfig:
    """Read and validate the YAML routing file; raise ConfigError naming file and line."""
    env = os.environ if env is None else env
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{name}: config file not found (set COURIER_CONFIG; "
                           "examples/courier.yml is a working start)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{name}: cannot read: {exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    lines = _line_map(node) if node is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{name}:1: the file must be a mapping with sources, destinations, routes"])
    missing: list[tuple[tuple, str]] = []
    raw = _expand_env(raw, env, missing)
    if missing:
        problems = []
        for p, var in missing:
            line = _locate(p, lines)
            where = f"{name}:{line}" if line else name
            problems.append(f"{where}: {'.'.join(map(str, p)) or '(top)'}: "
                            f"environment variable {var} is not set (used as ${{{var}}})")
        raise ConfigError(sorted(set(problems), key=_line_key))
    try:
        data = ConfigSchema(pseudonym_key=_pseudonym_key(env),
                            encrypted=bool((env.get(crypto.KEY_VARIABLE) or "").strip())).load(raw)
    except ValidationError as exc:
        problems = []
        for p, message in _flatten(exc.messages):
            line = _locate(p, lines)
            where = f"{name}:{line}" if line else name
            problems.append(f"{where}: {'.'.join(map(str, p)) or '(top)'}: {message}")
        raise ConfigError(sorted(set(problems), key=_line_key)) from None
    # After the transforms were loaded: a module of the operator's may have registered versions.
    incompatible = canonical.registry_problems()
    if incompatible:
        raise ConfigError([f"{name}: {problem}" for problem in incompatible])
    return RoutingConfig(
        sources={n: Source(n, tuple(s["allowed_types"]), tuple(s["mllp_allow"]), tuple(s["mllp_senders"]),
                           _rate_limit(s)) for n, s in data["sources"].items()},
        destinations={n: Destination(
            name=n, url=d["url"], owner=d["owner"], clearance=d["clearance"], transform=d["transform"],
            timeout=d["timeout"], retry=RetryPolicy(**d["retry"]), circuit=CircuitPolicy(**d["circuit"]),
            secret=d["secret"], ordered_by=d["ordered_by"], tls=d["tls"]) for n, d in data["destinations"].items()},
        routes=tuple(Route(r["match"]["source"], r["match"]["type"], tuple(r["to"])) for r in data["routes"]),
        path=name,
    )


def _rate_limit(source: dict) -> RateLimit | None:
    """A source's limit; burst defaults to the count: "600/min" may come all at once, then 10 a second."""
    if source.get("rate_limit") is None:
        return None
    count, period = source["rate_limit"]
    return RateLimit(count, period, source.get("burst") or count)


def _pseudonym_key(env: Mapping[str, str]) -> bytes | None:
    try:
        return governance.process_key(env)
    except ValueError as exc:
        raise ConfigError([f"environment: {exc}"]) from None


def _line_key(problem: str) -> tuple:
    m = re.match(r"[^:]*:(\d+):", problem)
    return (int(m.group(1)) if m else 0, problem)


# --- environment ----------------------------------------------------------

DEFAULT_DATABASE_URL = "sqlite:///instance/courier.db"  # SPEC.md: DATABASE_URL's default

@dataclass(frozen=True)
class Settings:
    """Process settings from the environment (SPEC.md) plus the routing file."""

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


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `env` (default os.environ); keyword overrides win (tests, embedding)."""
    env = os.environ if env is None else env
    config_path = overrides.pop("config_path", None) or env.get("COURIER_CONFIG", "courier.yml")
    routing = overrides.pop("routing", None) or load_routing(config_path, env)
    values: dict[str, Any] = dict(
        database_url=env.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        broker_url=env.get("BROKER_URL", "amqp://guest:guest@localhost:5672//"),
        config_path=config_path,
        routing=routing,
        port=env_int(env, "PORT", 8000),
        mllp_port=env_int(env, "MLLP_PORT", 2575),
        sentry_dsn=env.get("SENTRY_DSN") or None,
        encryption_key=env.get(crypto.KEY_VARIABLE) or None,
        pseudonym_key=_pseudonym_key(env),
        max_message_bytes=env_int(env, "COURIER_MAX_MESSAGE_BYTES", 10 * 1024 * 1024),
        queue_prefix=env.get("COURIER_QUEUE_PREFIX", "courier"),
        relay_lease=env_duration(env, "COURIER_RELAY_LEASE", 120.0),
        relay_batch=env_int(env, "COURIER_RELAY_BATCH", 200),
        relay_task_size=env_int(env, "COURIER_RELAY_TASK_SIZE", 10),
        relay_poll=env_duration(env, "COURIER_RELAY_POLL", 1.0),
        relay_linger=env_duration(env, "COURIER_RELAY_LINGER", 0.02),
        log_level=env.get("COURIER_LOG_LEVEL", "INFO").upper(),
    )
    values.update(overrides)
    _install_keys(values["encryption_key"])
    return Settings(**values)


def _install_keys(text: str | None) -> None:
    """Check COURIER_ENCRYPTION_KEY and give its key ring to this process's store (courier.app.store.crypto).

    Here because every process (web, worker, relay, MLLP, CLI, an embedding host) loads its
    settings once at start, before it touches the store.
    """
    try:
        crypto.install(crypto.parse_keys(text))
    except ValueError as exc:
        raise ConfigError([f"environment: {exc}"]) from None



# A host application's config keys (app.config) whose environment names differ.
_HOST_KEYS = {"COURIER_DATABASE_URL": "DATABASE_URL", "COURIER_BROKER_URL": "BROKER_URL"}


def settings_from_config(config: Mapping[str, Any], *, root_path: str = "",
                         database_url: str | None = None) -> Settings:
    """Settings from a host Flask app's `COURIER_*` keys (embedding); `database_url` from its engine.

    A relative COURIER_CONFIG is found next to the host's package; `${VAR}` in that file
    still reads the process environment, where secrets belong.
    """
    env = {_HOST_KEYS.get(k, k): str(v) for k, v in config.items() if k.startswith("COURIER_") and v is not None}
    if governance.KEY_VARIABLE in env:
        raise ConfigError([f"app.config: {governance.KEY_VARIABLE}: set it in the process environment instead: "
                           "the delivery threads read it there, like every secret"])
    env[governance.KEY_VARIABLE] = os.environ.get(governance.KEY_VARIABLE, "")
    if not env.get("COURIER_CONFIG"):
        raise ConfigError(["app.config: COURIER_CONFIG: set it to the routing file (sources, destinations, "
                           "routes; see examples/embedded_host)"])
    if database_url is None and not env.get("DATABASE_URL"):
        raise ConfigError(["app.config: COURIER_DATABASE_URL: set it, or pass the host's engine: "
                           "Courier(app, engine=engine)"])
    path = os.path.join(root_path, env["COURIER_CONFIG"])
    # ${VAR} in the file reads the process environment; the check for an encrypted store sees app.config's key.
    routing_env = {**os.environ, "COURIER_ENCRYPTION_KEY": env.get("COURIER_ENCRYPTION_KEY", "")}
    overrides: dict[str, Any] = {"config_path": path, "routing": load_routing(path, routing_env)}
    if database_url is not None:
        overrides["database_url"] = database_url
    return load_settings(env, **overrides)
