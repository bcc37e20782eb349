"""SQL adapter: one row per delivery in a legacy system's staging table.

URL
===

.. code-block::

    sql+<SQLAlchemy URL>?table=NAME[&key=COLUMN][&column.NAME=SOURCE]...

    sql+postgresql://courier:${ERP_DB_PASSWORD}@erp-db/erp?table=staging.charges
    sql+mysql://courier@lab-db/lis?table=inbound_hl7&column.patient_id=hl7:PID-3.1&column.payload=body
    sql+sqlite:////var/lib/courier/out.db?table=events

Everything after ``sql+`` is a SQLAlchemy URL; ``postgresql://`` uses psycopg
and ``mysql://`` / ``mariadb://`` use PyMySQL (the ``[sql]`` extra) unless a
driver is named (``postgresql+psycopg://``). Query parameters that are not
options below are passed on to SQLAlchemy and the driver unchanged.

Options
=======

* ``table`` (required): the table, optionally ``schema.table``. Courier never
  creates or alters it: it belongs to the legacy system.
* ``key``: the column holding the delivery id, default ``delivery_id``. It
  must be the primary key or carry a unique index: that is what makes a
  redelivery insert nothing new. The adapter checks this before its first
  insert and refuses to write (TemporaryError naming the table) otherwise.
* ``column.NAME=SOURCE``: a column and where its value comes from. Without
  any, the columns are ``delivery_id, message_id, correlation_id,
  message_type, content_type, body``. With some, exactly those plus the key.
  SOURCE is one of:

  - ``delivery_id``, ``message_id``, ``correlation_id``, ``message_type``,
    ``content_type``;
  - ``body`` (the transformed body as text: read in the charset its content type names, else
    an HL7 v2 body's MSH-18, else UTF-8), ``body_bytes`` (as bytes);
  - ``sent_at`` (the time of the insert, UTC);
  - ``json:PATH``: a dotted path into a JSON body (``json:data.patient_id``,
    list items by number: ``json:data.items.0.code``); objects and lists are
    stored as JSON text, a missing path as NULL;
  - ``hl7:SEG-N[.C]``: a field (first repetition) or component of the first
    such segment of an HL7 v2 body, as on the wire (``hl7:PID-3.1``,
    ``hl7:MSH-10``); missing as NULL.

``timeout`` is the connect timeout (and, on PostgreSQL, the statement
timeout); ``secret`` is ignored (put credentials in the URL, from the
environment with ``${VAR}`` in the config file).

Outcome
=======

* Row inserted, or a row with this delivery id already there: sent.
* The row can never fit (NOT NULL or other constraint on a mapped value, a
  value the column type refuses) or a ``json:``/``hl7:`` source on a body that
  is not JSON/HL7 v2: PermanentError.
* Database down, unreachable, timed out, missing table or column, missing unique
  key: TemporaryError (an operator can fix each without losing the message).

Threads: an instance owns a small engine (one pooled connection) and is meant
for one thread, like the other adapters.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlencode, urlsplit

from courier.adapters.base import Adapter, Outgoing, PermanentError, Sent, TemporaryError
from courier.adapters.hl7_charsets import body_charset

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_TABLE = re.compile(rf"(?:({_IDENTIFIER.pattern})\.)?({_IDENTIFIER.pattern})")
_HL7_PATH = re.compile(r"([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\.(\d{1,3}))?")
_PLAIN = ("delivery_id", "message_id", "correlation_id", "message_type", "content_type", "body", "body_bytes",
          "sent_at")
DEFAULT_COLUMNS = {name: name for name in ("delivery_id", "message_id", "correlation_id", "message_type",
                                            "content_type", "body")}
_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
            "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
_DETAIL_CHARS = 200


def _check_source(name: str, source: str) -> None:
    if source in _PLAIN:
        return
    kind, _, path = source.partition(":")
    if kind == "json" and path and all(path.split(".")):
        return
    if kind == "hl7" and _HL7_PATH.fullmatch(path):
        return
    raise ValueError(f"sql URL column.{name}={source!r}: use one of {', '.join(_PLAIN)}, json:PATH "
                     f"(e.g. json:data.patient_id) or hl7:SEG-N[.C] (e.g. hl7:PID-3.1)")


def _parse(url: str) -> tuple[str, str | None, str, str, dict[str, str]]:
    """sql+URL -> (SQLAlchemy URL without our options, schema, table, key column, {column: source})."""
    if not url.lower().startswith("sql+"):
        raise ValueError("sql URL must look like sql+postgresql://user@host/db?table=NAME")
    inner = url[4:]
    parts = urlsplit(inner)
    if not parts.scheme:
        raise ValueError("sql URL needs a database URL after sql+, e.g. sql+postgresql://user@host/db?table=NAME")
    passed, table, key, columns = [], None, "delivery_id", {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "table":
            table = value
        elif name == "key":
            key = value
        elif name.startswith("column."):
            column = name[len("column."):]
            if not _IDENTIFIER.fullmatch(column):
                raise ValueError(f"sql URL column name {column!r} must be letters, digits and _ (not first a digit)")
            _check_source(column, value)
            columns[column] = value
        else:
            passed.append((name, value))
    if not table:
        raise ValueError("sql URL needs ?table=NAME (the staging table to insert into)")
    match = _TABLE.fullmatch(table)
    if not match:
        raise ValueError(f"sql URL table {table!r} must be NAME or SCHEMA.NAME (letters, digits, _)")
    if not _IDENTIFIER.fullmatch(key):
        raise ValueError(f"sql URL key {key!r} must be a column name (letters, digits, _)")
    columns = dict(columns or DEFAULT_COLUMNS)
    if columns.get(key, "delivery_id") != "delivery_id":
        raise ValueError(f"sql URL key column {key!r} holds the delivery id; do not map it to {columns[key]!r}")
    columns[key] = "delivery_id"
    driver = parts.scheme.lower()
    scheme = _DRIVERS.get(driver, driver)
    # The URL as written up to its query, only the scheme and our options changed: urlunsplit
    # would drop the empty host of sqlite:////abs.db (-> sqlite://abs.db) and of sqlite:///rel.db.
    base = inner[len(parts.scheme):].partition("#")[0].partition("?")[0]
    database_url = scheme + base + (f"?{urlencode(passed)}" if passed else "") \
        + (f"#{parts.fragment}" if parts.fragment else "")
    try:
        from sqlalchemy.engine import make_url
        make_url(database_url)
    except Exception as exc:  # ArgumentError and friends: say which part is wrong, without the password
        raise ValueError(f"sql URL is not a valid SQLAlchemy URL: {type(exc).__name__}") from None
    return database_url, match.group(1), match.group(2), key, columns


class SqlAdapter(Adapter):
    """Inserts each delivery as one row keyed by delivery id; a redelivery finds the row and stops."""

    scheme = ("sql",)

    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None):
        super().__init__(url, timeout=timeout, secret=secret)
        self.database_url, self.schema, self.table_name, self.key, self.columns = _parse(url)
        self._engine = None
        self._table = None

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        _parse(url)

    def _ready(self):
        """The engine and table, created (and the unique key checked) on first use."""
        if self._table is not None:
            return self._engine, self._table
        import sqlalchemy as sa

        if self._engine is None:
            self._engine = sa.create_engine(self.database_url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                                            connect_args=_connect_args(self.database_url, self.timeout))
        inspector = sa.inspect(self._engine)
        if not inspector.has_table(self.table_name, schema=self.schema):
            raise TemporaryError(f"table {self._shown()} does not exist")
        known = {c["name"] for c in inspector.get_columns(self.table_name, schema=self.schema)}
        missing = sorted(set(self.columns) - known)
        if missing:
            raise TemporaryError(f"table {self._shown()} has no column(s) {', '.join(missing)}")
        if not _is_unique(inspector, self.table_name, self.schema, self.key):
            raise TemporaryError(f"column {self.key} of {self._shown()} is neither the primary key nor unique: "
                                 f"redeliveries would insert duplicates, so nothing is written")
        self._table = sa.table(self.table_name, *(sa.column(c) for c in self.columns), schema=self.schema)
        return self._engine, self._table

    def _shown(self) -> str:
        return f"{self.schema}.{self.table_name}" if self.schema else self.table_name

    def send(self, out: Outgoing) -> Sent:
        import sqlalchemy as sa
        from sqlalchemy import exc as sa_exc

        row = {column: _value(source, out) for column, source in self.columns.items()}
        try:
            engine, table = self._ready()
            try:
                with engine.begin() as conn:
                    conn.execute(sa.insert(table).values(**row))
                return Sent(detail=f"inserted into {self._shown()}")
            except sa_exc.IntegrityError as exc:
                # Portable "ON CONFLICT DO NOTHING": the insert failed; if the key is there, this is a
                # redelivery (the unique index made a concurrent one wait for the first to commit).
                with engine.connect() as conn:
                    found = conn.execute(sa.select(sa.literal(1)).select_from(table)
                                         .where(table.c[self.key] == out.delivery_id)).first()
                if found:
                    return Sent(detail=f"already in {self._shown()} (redelivery)")
                raise PermanentError(f"{self._shown()} refused the row: {_reason(exc)}") from None
        except (PermanentError, TemporaryError):
            raise
        except sa_exc.DataError as exc:
            raise PermanentError(f"{self._shown()} refused a value: {_reason(exc)}") from None
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            # Connection trouble, timeouts, a table or column dropped since: the next attempt checks again.
            self._table = None
            raise TemporaryError(f"{self._shown()}: {_reason(exc)}") from None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine, self._table = None, None


def _connect_args(database_url: str, timeout: float) -> dict:
    from sqlalchemy.engine import make_url

    backend = make_url(database_url).get_backend_name()
    seconds = max(1, int(round(timeout)))
    if backend == "postgresql":
        return {"connect_timeout": seconds, "options": f"-c statement_timeout={int(timeout * 1000)}"}
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
    if backend == "sqlite":
        return {"timeout": timeout}
    return {}


def _is_unique(inspector, table: str, schema: str | None, column: str) -> bool:
    if inspector.get_pk_constraint(table, schema=schema).get("constrained_columns") == [column]:
        return True
    if any(u["column_names"] == [column] for u in inspector.get_unique_constraints(table, schema=schema)):
        return True
    return any(i.get("unique") and i["column_names"] == [column] for i in inspector.get_indexes(table, schema=schema))


def _value(source: str, out: Outgoing):
    if source in ("delivery_id", "message_id", "correlation_id", "message_type", "content_type"):
        return getattr(out, source)
    if source == "body":
        codec = body_charset(out.content_type, out.body) or "utf-8"  # HL7 v2 is stored in the charset it came in
        try:
            return out.body.decode(codec)
        except UnicodeDecodeError as exc:
            raise PermanentError(f"body is not {codec} text (byte {exc.start}); map it as body_bytes") from None
    if source == "body_bytes":
        return out.body
    if source == "sent_at":
        return datetime.now(timezone.utc)
    kind, _, path = source.partition(":")
    if kind == "json":
        return _json_value(out.body, path)
    return _hl7_value(out.body, path, body_charset(out.content_type, out.body) or "utf-8")


def _json_value(body: bytes, path: str):
    try:
        node = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        raise PermanentError(f"json:{path} needs a JSON body; this one is not JSON") from None
    for step in path.split("."):
        if isinstance(node, dict):
            node = node.get(step)
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return None
        if node is None:
            return None
    return json.dumps(node, ensure_ascii=False) if isinstance(node, (dict, list)) else node


def _hl7_value(body: bytes, path: str, codec: str = "utf-8"):
    segment_id, field, component = _HL7_PATH.fullmatch(path).groups()
    text = body.decode(codec, "replace").lstrip("\ufeff \t\r\n")
    if not text.startswith("MSH") or len(text) < 8:
        raise PermanentError(f"hl7:{path} needs an HL7 v2 body; this one does not start with MSH")
    sep, component_sep, repetition_sep = text[3], text[4], text[5]
    for segment in re.split(r"\r\n|\r|\n", text):
        if segment[:3] != segment_id:
            continue
        fields = segment.split(sep)
        index = int(field) - 1 if segment_id == "MSH" else int(field)  # MSH-1 is the separator itself
        if segment_id == "MSH" and int(field) == 1:
            return sep
        if index >= len(fields):
            return None
        value = fields[index] if segment_id == "MSH" and int(field) == 2 else fields[index].split(repetition_sep)[0]
        if component:
            parts = value.split(component_sep)
            value = parts[int(component) - 1] if int(component) <= len(parts) else ""
        return value or None
    return None


def _reason(exc: Exception) -> str:
    """The database's own first line (driver errors name constraints and columns, not our values)."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__
    text = f"{type(original).__name__}: {text}"
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS - 3] + "..."
