"""Config: the environment variables (docs/configuration.md) and the YAML routing file, read and validated.

Everything is validated when a process starts, so a typo in `courier.yml`
stops the process with `file:line: where: what` instead of dead-lettering
messages at three in the morning. `courier config check` runs the same code.

Data governance is checked here too: a destination below clearance phi must have a
transform that minimises (courier.app.domain.transforms: canonical ones), and those need
COURIER_PSEUDONYM_KEY; every route's transforms must be able to format the types routed
to them (see ConfigSchema._governance). Loading has no side effect: the encryption keys are
checked here and given to a store when a process builds one (courier.app.store.db.Store.from_settings).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema
from sqlalchemy.engine import make_url

from courier import adapters
from courier.adapters.base import TlsFiles
from courier.adapters.hl7_charsets import charset_codec as _charset_codec
from courier.app import service_urls
from courier.app.domain import canonical, governance, transforms
from courier.app.settings import (DEFAULT_DATABASE_URL, CircuitPolicy, ConfigError, Destination, RateLimit, RetryPolicy,
                                  Route, RoutingConfig, Settings, Source, env_duration, env_int, parse_duration,
                                  parse_rate)
from courier.app.store import crypto


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
    # How HL7 v2 from this source is read when MSH-18 is empty: an MSH-18 name ("8859/1", "UNICODE UTF-8").
    charset = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=40))

    @validates_schema
    def _burst(self, data, **kwargs):
        if data.get("burst") is not None and data.get("rate_limit") is None:
            raise ValidationError({"burst": ["burst needs rate_limit (e.g. rate_limit: 600/min)"]})

    @validates_schema
    def _charset(self, data, **kwargs):
        if data.get("charset") is not None and _charset_codec(data["charset"]) is None:
            raise ValidationError({"charset": ["not a character set Courier can read: use an MSH-18 name such as "
                                               "ASCII, 8859/1 ... 8859/15 or UNICODE UTF-8"]})

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
                           _rate_limit(s), s["charset"]) for n, s in data["sources"].items()},
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
    _check_service_urls(values["database_url"], values["broker_url"])
    try:
        crypto.parse_keys(values["encryption_key"])  # refused now, with the position of the bad key
    except ValueError as exc:
        raise ConfigError([f"environment: {exc}"]) from None
    return Settings(**values)


def _check_service_urls(database_url: str, broker_url: str) -> None:
    """DATABASE_URL (one host or libpq's list) and BROKER_URL (one URL or several separated by ';'), refused
    here with what is wrong and never the password (courier.app.service_urls, docs/scaling.md)."""
    problems = []
    shown = service_urls.redact(database_url)
    try:
        normalised = service_urls.database_url(database_url)
    except ValueError as exc:
        problems.append(f"environment: DATABASE_URL {shown!r} {exc}")
    else:
        try:
            make_url(normalised)
        except Exception:  # ArgumentError, or ValueError for a port: their messages quote the URL, password and all
            problems.append(f"environment: DATABASE_URL {shown!r} is not a database URL (postgresql://user:password"
                            "@host:5432/db; postgresql://user:password@hostA:5432,hostB:5432/db for several hosts)")
    try:
        service_urls.check_broker_url(broker_url)
    except ValueError as exc:
        problems.append(f"environment: BROKER_URL {exc}")
    if problems:
        raise ConfigError(problems)


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
