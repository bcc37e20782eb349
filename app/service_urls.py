"""DATABASE_URL and BROKER_URL with several hosts (docs/scaling.md): parsed, checked and described, never logged
with a password.

- DATABASE_URL may name several PostgreSQL hosts, tried in turn by libpq (with `target_session_attrs=read-write`
  only a primary is taken). Two spellings are accepted: libpq's own URI,
  `postgresql://user@hostA:5432,hostB:5432/db?target_session_attrs=read-write`, which SQLAlchemy cannot parse,
  and SQLAlchemy's, `postgresql+psycopg://user@/db?host=hostA:5432&host=hostB:5432&...` (or
  `?host=hostA,hostB&port=5432,5432`). `database_url` rewrites the first into SQLAlchemy's comma-list form, so
  every process, Alembic and the relay's LISTEN connection see one URL.
- BROKER_URL may list several RabbitMQ nodes separated by `;` (kombu's failover: each is tried in turn).

Plain functions of strings: the settings check, the store, the relay and the Celery side all use them.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

from sqlalchemy.engine import URL, make_url

DEFAULT_PG_PORT = 5432
DEFAULT_AMQP_PORT = 5672
_HOST_PORT = re.compile(r"\A(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]/@,]+))(?::(?P<port>[^:]*))?\Z")


def redact(url: str) -> str:
    """`url` with the password in its user part replaced by ***, for messages (each `;` part)."""
    return ";".join(re.sub(r"(://[^:/@;]*:)[^@/;]*@", r"\1***@", part) for part in url.split(";"))


# --- DATABASE_URL --------------------------------------------------------------------------------------

def database_url(url: str) -> str:
    """DATABASE_URL as SQLAlchemy can use it: a libpq multi-host URI becomes `?host=a,b&port=p,q`; any other
    URL is returned as given. ValueError (never quoting the password) when a multi-host URL is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.lower().startswith("postgres"):
        _check_query_hosts(url)
        return url
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    hosts_part = netloc.rpartition("@")[2]
    if "," not in hosts_part:
        _check_query_hosts(url)
        return url
    userinfo = netloc.rpartition("@")[0] if "@" in netloc else ""
    tail = rest[len(netloc):]
    path, _, query = tail.partition("?")
    query = query.partition("#")[0]
    params = parse_qsl(query, keep_blank_values=True)
    if any(name in ("host", "hostaddr", "port") for name, _ in params):
        raise ValueError("names its hosts both before the database name and in ?host= or ?port=: give them in one "
                         "place")
    hosts, ports = [], []
    for i, item in enumerate(hosts_part.split(","), 1):
        host, port = _host_port(item, i)
        hosts.append(host)
        ports.append("" if port is None else str(port))
    user, _, password = userinfo.partition(":")
    given: dict[str, list[str]] = {}
    for name, value in params:
        given.setdefault(name, []).append(value)
    query_out: dict[str, str | tuple[str, ...]] = {k: v[0] if len(v) == 1 else tuple(v) for k, v in given.items()}
    query_out["host"] = ",".join(hosts)
    if any(ports):
        query_out["port"] = ",".join(ports)
    driver = "postgresql" if scheme.lower() in ("postgres", "postgresql") else scheme
    return URL.create(driver, username=unquote(user) or None, password=unquote(password) if password else None,
                      database=unquote(path.lstrip("/")) or None, query=query_out).render_as_string(
                          hide_password=False)


def _host_port(item: str, position: int) -> tuple[str, int | None]:
    match = _HOST_PORT.match(unquote(item))
    if not match:
        raise ValueError(f"host {position} of its host list, {item!r}, is not host or host:port")
    port = match.group("port")
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"host {position} of its host list has port {port!r}, not a number from 1 to 65535")
    return match.group("v6") or match.group("name"), int(port) if port else None


def _check_query_hosts(url: str) -> None:
    """SQLAlchemy's multi-host form: the ports must be numbers and as many as the hosts, and no host before the
    database name as well (SQLAlchemy would drop it without a word)."""
    if "?" not in url or "host=" not in url:
        return
    try:
        parsed = make_url(url)
    except Exception:  # ArgumentError, ValueError: their messages quote the password
        raise ValueError("is not a database URL (postgresql://user:password@host:5432/db)") from None
    hosts = parsed.query.get("host")
    if hosts is None:
        return
    if parsed.host:
        raise ValueError(f"names host {parsed.host} before the database name and others in ?host=: SQLAlchemy "
                         "would ignore the first; give all of them in ?host=")
    tokens = list(hosts) if isinstance(hosts, tuple) else str(hosts).split(",")
    if isinstance(hosts, tuple):
        for i, token in enumerate(tokens, 1):
            _host_port(token, i)
        if "port" in parsed.query:
            raise ValueError("gives ports both as ?host=HOST:PORT and ?port=: use one form")
        return
    ports = parsed.query.get("port")
    ports = list(ports) if isinstance(ports, tuple) else str(ports).split(",") if ports is not None else []
    for port in ports:
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"?port= has {port!r}, not a number from 1 to 65535")
    if len(ports) > 1 and len(ports) != len(tokens):
        raise ValueError(f"names {len(tokens)} hosts but {len(ports)} ports: give one port, or one per host")


def database_hosts(url: str | URL) -> list[str]:
    """["hostA:5432", "hostB:5432"]: every host of a PostgreSQL URL, in order; [] for a local socket."""
    parsed = make_url(url) if isinstance(url, str) else url
    hosts = parsed.query.get("host")
    if hosts is None:
        return [f"{parsed.host}:{parsed.port or DEFAULT_PG_PORT}"] if parsed.host else []
    if isinstance(hosts, tuple):
        out = []
        for token in hosts:
            host, _, port = token.partition(":")
            out.append(f"{host}:{port or DEFAULT_PG_PORT}")
        return out
    names = str(hosts).split(",")
    ports = parsed.query.get("port")
    ports = (list(ports) if isinstance(ports, tuple) else str(ports).split(",")) if ports is not None else [""]
    if len(ports) == 1:
        ports = ports * len(names)
    out = []
    for name, port in zip(names, ports):
        if name.startswith("/"):
            out.append(name)  # a socket directory
        else:
            out.append(f"[{name}]:{port or DEFAULT_PG_PORT}" if ":" in name else f"{name}:{port or DEFAULT_PG_PORT}")
    return out


# --- BROKER_URL ----------------------------------------------------------------------------------------

def broker_urls(url: str) -> list[str]:
    """BROKER_URL's brokers, in order: `amqp://a//;amqp://b//` -> two URLs (kombu's failover list)."""
    return [part.strip() for part in str(url).split(";") if part.strip()]


def check_broker_url(url: str) -> None:
    """ValueError (without the password) unless every `;` part of BROKER_URL is a URL with a host and a
    numeric port."""
    parts = str(url).split(";")
    if not url or not any(p.strip() for p in parts):
        raise ValueError("is empty")
    for i, part in enumerate(parts, 1):
        part = part.strip()
        where = f"broker {i} of {len(parts)} ({redact(part)!r})" if len(parts) > 1 else repr(redact(part))
        if not part:
            raise ValueError(f"broker {i} of {len(parts)} is empty (two ';' in a row, or one at the end)")
        split = urlsplit(part)
        if "://" not in part or not split.scheme:
            raise ValueError(f"{where} is not a URL: give each broker in full, "
                             "amqp://user:password@host:5672//;amqp://user:password@host2:5672//")
        try:
            split.port
        except ValueError:
            raise ValueError(f"{where} has a port that is not a number from 0 to 65535") from None
        if split.scheme.startswith("amqp") and not split.hostname:
            raise ValueError(f"{where} names no host")


def broker_hosts(url: str) -> list[str]:
    """["a:5672", "b:5672"]: host:port of each broker of BROKER_URL; never a user or password."""
    out = []
    for part in broker_urls(url) or ["amqp://localhost"]:
        split = urlsplit(part)
        try:
            port = split.port
        except ValueError:
            port = None
        if port is None:
            port = 5671 if split.scheme in ("amqps", "pyamqps") else DEFAULT_AMQP_PORT
        host = split.hostname or "localhost"
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out
