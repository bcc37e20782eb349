"""Transforms: turn a stored message into the body one destination receives.

A destination's `transform` names an entry of `REGISTRY` or a
`package.module:function` of the operator's own. A transform that raises is a
permanent error for that delivery (it goes dead with the reason); retrying
the same input through the same code cannot succeed.

Built in (all but passthrough read the message as canonical events: a JSON event as
posted, or an HL7 v2 message through courier.app.hl7.to_canonical; then courier.app.domain.governance minimises each
event by the destination's clearance, and only then is anything formatted):

    passthrough   any type        the message as received; only for clearance phi
    canonical_json every canonical event type
                                  {"events": [<envelope>, ...]}, application/json: always
                                  a list, since one message may hold several events (a
                                  DFT^P03 has one charge.posted per FT1); each envelope is
                                  {"type", "version", "id", "occurred_at"?, "data"}
    hl7_dft_p03   charge.posted   one HL7 v2.5 DFT^P03 (MSH, EVN, PID, PV1, one FT1 per
                                  charge), UTF-8, values escaped, line breaks as \\.br\\
    erp_csv       charge.posted, service.completed, supply.consumed
                                  CSV (RFC 4180, CRLF) with a header line, then one line per
                                  event: LEDGER_COLUMNS; never a name, an address or free text
    sql_row       the same types  one JSON object of LEDGER_COLUMNS (missing: null) for the
                                  SQL adapter (column.amount=json:amount); one event only

Each declares what it accepts (`spec_of`), so the configuration check can refuse a route
that sends it types it cannot format. An operator's own function gets the same reading,
minimising and checks from the `canonical_transform(*types)` decorator; one without it
is treated like passthrough (any type, so never below clearance phi).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable

from marshmallow import ValidationError

from courier.app.domain import canonical, governance


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
Formatter = Callable[[list, Envelope], "tuple[bytes, str]"]


class TransformError(ValueError):
    """A message this transform cannot format; the reason names structure, never values (it is logged)."""


@dataclass(frozen=True)
class Spec:
    """What a transform takes: `canonical` ones read canonical events and minimise them;
    `accepts` is their event types (None: every canonical type)."""

    canonical: bool = False
    accepts: frozenset[str] | None = None


_RAW = Spec()  # passthrough, and any function without a declaration


def spec_of(transform: Transform) -> Spec:
    return getattr(transform, "courier_spec", _RAW)


# HL7 v2 message codes -> the canonical event type courier.app.hl7.to_canonical maps them to. Kept here, not
# read from hl7.to_canonical, so a configuration check works without python-hl7 (the [mllp] extra);
# tests/test_transforms.py keeps the two in step.
HL7_EVENT_TYPES = {
    "ADT^A01": "patient.admitted", "ADT^A04": "patient.admitted", "ADT^A03": "patient.discharged",
    "ADT^A08": "patient.updated", "DFT^P03": "charge.posted",
    **{f"SIU^{trigger}": "schedule.changed" for trigger in ("S12", "S13", "S14", "S15", "S16", "S17", "S26")},
    "ORM^O01": "order.changed", "ORU^R01": "service.completed",
}
HL7_PREFIX = "HL7v2:"


def known_types() -> list[str]:
    """Every message type a canonical transform can read: event types and mapped HL7 v2 types."""
    return sorted({t for t, _ in canonical.EVENTS} | {HL7_PREFIX + k for k in HL7_EVENT_TYPES})


def event_type_of(message_type: str) -> str | None:
    """The canonical event type a message of this type becomes, or None if it becomes none."""
    if message_type.startswith(HL7_PREFIX):
        return HL7_EVENT_TYPES.get(message_type[len(HL7_PREFIX):])
    return message_type if canonical.versions(message_type) else None


def refusal(transform: Transform, message_type: str) -> str | None:
    """Why this transform cannot format messages of this type (None if it can), e.g.
    'HL7v2:ADT^A01 (patient.admitted)' or 'lab.result (not a canonical event type)'."""
    spec = spec_of(transform)
    if not spec.canonical:
        return None
    event = event_type_of(message_type)
    if event is None:
        why = "no canonical mapping" if message_type.startswith(HL7_PREFIX) else "not a canonical event type"
        return f"{message_type} ({why})"
    if spec.accepts is not None and event not in spec.accepts:
        return message_type if event == message_type else f"{message_type} ({event})"
    return None


# --------------------------------------------------------------------------- reading

_JSON_TYPES = ("application/json",)
_HL7_TYPES = ("application/hl7-v2", "x-application/hl7-v2+er7")


def canonical_events(envelope: Envelope) -> list[dict]:
    """The stored message as validated canonical envelopes, `data` in its JSON form
    (amounts as strings); TransformError if it is not one, or does not map to any."""
    media = envelope.content_type.split(";")[0].strip().lower()
    if media in _JSON_TYPES:
        events = [_json_event(envelope.body)]
    elif media in _HL7_TYPES:
        events = _hl7_events(envelope.body, envelope.content_type)
    else:
        raise TransformError(f"cannot read a {media or 'untyped'} message as canonical events "
                             "(JSON events and HL7 v2 only)")
    return [_validated(event) for event in events]


def _json_event(body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError; both name a position, not content
        raise TransformError(f"not a JSON event: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str) or not isinstance(doc.get("data"), dict):
        raise TransformError("not a JSON event: an object with a string 'type' and an object 'data' is needed")
    return doc


def _hl7_events(body: bytes, content_type: str) -> list[dict]:
    try:
        from courier.app.hl7 import er7, to_canonical
    except ImportError:  # python-hl7 is the [mllp] extra, imported only when an HL7 message comes
        raise TransformError("HL7 v2 support is not installed here (pip install 'courier[mllp]')") from None
    try:
        message = er7.parse_stored(body, content_type)  # stored as received, in the charset it names
    except (UnicodeDecodeError, er7.Hl7Error) as exc:
        raise TransformError(f"not a valid HL7 v2 message: {exc}") from None
    try:
        return to_canonical.to_canonical(message)
    except to_canonical.MappingError as exc:
        raise TransformError(f"cannot map {message.message_type} to canonical events: {exc}") from None


def _validated(event: dict) -> dict:
    kind, version = event["type"], event.get("version") or 1
    if isinstance(version, str) and version.isdigit():  # the ingest envelope accepts "2" for 2
        version = int(version)
    try:
        loaded = canonical.load_event(kind, version, event["data"])
    except ValidationError as exc:
        problems = "; ".join(f"{path}: {' '.join(map(str, errors))}" for path, errors in exc.messages.items())
        raise TransformError(f"not a canonical {kind} version {version} event: {problems}") from None
    out = {"type": kind, "version": version}
    out.update({k: event[k] for k in ("id", "occurred_at") if event.get(k) is not None})
    out["data"] = _as_json(loaded)
    return out


def _as_json(value: Any) -> Any:
    """Loaded canonical data back in its JSON form: only amounts differ (Decimal -> str). Not
    Schema.dump: it reads a missing key such as 'values' as the dict's own method."""
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    return str(value) if isinstance(value, Decimal) else value


def canonical_transform(*accepts: str) -> Callable[[Formatter], Transform]:
    """Make `fmt(events, envelope) -> (body, content type)` a transform of canonical events
    of these types (none named: every type), each minimised by the destination's clearance
    before `fmt` sees it. For the operator's own formats too (`package.module:function`)."""
    unknown = [t for t in accepts if not canonical.versions(t)]
    if unknown:
        raise ValueError(f"not canonical event types: {', '.join(unknown)}")
    spec = Spec(canonical=True, accepts=frozenset(accepts) or None)

    def wrap(fmt: Formatter) -> Transform:
        @functools.wraps(fmt)
        def transform(envelope: Envelope) -> tuple[bytes, str]:
            events = canonical_events(envelope)
            refused = sorted({e["type"] for e in events} - spec.accepts) if spec.accepts else []
            if refused:
                raise TransformError(f"{fmt.__name__} does not format {', '.join(refused)} "
                                     f"(it formats {', '.join(sorted(spec.accepts))})")
            try:
                key = governance.process_key()
                minimised = [governance.minimise(e, envelope.clearance, key) for e in events]
            except (ValueError, governance.MissingKey) as exc:
                raise TransformError(str(exc)) from None
            return fmt(minimised, envelope)

        transform.courier_spec = spec
        return transform
    return wrap


# --------------------------------------------------------------------------- built-ins

def passthrough(envelope: Envelope) -> tuple[bytes, str]:
    """Send the message exactly as received."""
    return envelope.body, envelope.content_type


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@canonical_transform()
def canonical_json(events: list[dict], envelope: Envelope) -> tuple[bytes, str]:
    """{"events": [...]}: the minimised canonical envelopes, versioned."""
    return _json_bytes({"events": events}), "application/json"


# --- ledger rows: erp_csv and sql_row

LEDGER_COLUMNS = ("event_type", "event_id", "line", "service_date", "posted_at", "cost_centre", "gl_account",
                  "department", "code", "code_system", "code_display", "charge_type", "quantity", "unit",
                  "unit_price", "amount", "currency", "reference", "patient_ref", "visit_ref")
LEDGER_TYPES = ("charge.posted", "service.completed", "supply.consumed")


def _get(data: Any, *path: str) -> Any:
    for name in path:
        data = data.get(name) if isinstance(data, dict) else None
    return data


def ledger_row(event: dict) -> dict[str, Any]:
    """One (minimised) charge, service or supply event as LEDGER_COLUMNS (None where absent).
    `reference` is the event's own document number: charge transaction id, order number, lot."""
    data, kind = event["data"], event["type"]
    if kind == "charge.posted":
        item, code = data.get("charge") or {}, _get(data, "charge", "code")
        money = item.get("amount") or item.get("unit_price") or {}
        row = {"line": item.get("line"), "service_date": item.get("service_date"), "posted_at": item.get("posted_at"),
               "charge_type": item.get("type"), "quantity": item.get("quantity"),
               "unit_price": _get(item, "unit_price", "amount"), "amount": _get(item, "amount", "amount"),
               "currency": money.get("currency"), "reference": item.get("transaction_id")}
    elif kind == "service.completed":
        item, code = data.get("service") or {}, _get(data, "service", "code")
        row = {"service_date": data.get("performed_at"), "posted_at": data.get("reported_at"),
               "reference": _get(data, "order", "placer_number") or _get(data, "order", "filler_number")}
    else:  # supply.consumed
        item = data
        code = {"code": _get(data, "item", "sku"), "display": _get(data, "item", "description")}
        row = {"service_date": data.get("consumed_at"), "quantity": data.get("quantity"),
               "unit": data.get("unit") or _get(data, "item", "unit"), "reference": data.get("lot_number")}
    row.update({
        "event_type": kind, "event_id": event.get("id"),
        "cost_centre": _get(item, "cost_centre", "code"), "gl_account": _get(item, "cost_centre", "gl_account"),
        "department": _get(item, "department", "code"),
        "code": _get(code, "code"), "code_system": _get(code, "system"), "code_display": _get(code, "display"),
        "patient_ref": _get(data, "patient", "id"), "visit_ref": _get(data, "visit", "number"),
    })
    return {column: row.get(column) for column in LEDGER_COLUMNS}


@canonical_transform(*LEDGER_TYPES)
def erp_csv(events: list[dict], envelope: Envelope) -> tuple[bytes, str]:
    """A header line, then one line per charge, service or supply event (LEDGER_COLUMNS)."""
    out = io.StringIO()
    writer = csv.writer(out)  # RFC 4180: CRLF, quotes where needed
    writer.writerow(LEDGER_COLUMNS)
    for event in events:
        writer.writerow(["" if v is None else v for v in ledger_row(event).values()])
    return out.getvalue().encode("utf-8"), "text/csv; charset=utf-8; header=present"


@canonical_transform(*LEDGER_TYPES)
def sql_row(events: list[dict], envelope: Envelope) -> tuple[bytes, str]:
    """One JSON object of LEDGER_COLUMNS: the SQL adapter inserts one row per delivery."""
    if len(events) != 1:
        raise TransformError(f"sql_row makes one row per delivery, and this message holds {len(events)} events "
                             "(route it to erp_csv or canonical_json, which take several)")
    return _json_bytes(ledger_row(events[0])), "application/json"


# --- HL7 v2 DFT^P03

_FIELD, _ENCODING = "|", "^~\\&"


def _hl7_text(value: Any) -> str:
    """A value escaped for our delimiters; line breaks as \\.br\\ (courier.app.hl7.er7 escapes the rest)."""
    from courier.app.hl7.er7 import _escape
    if value is None:
        return ""
    lines = str(value).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\\.br\\".join(_escape(line, _FIELD, _ENCODING) for line in lines)


def _trimmed(separator: str, parts: list[str]) -> str:
    while parts and not parts[-1]:
        parts = parts[:-1]
    return separator.join(parts)


def _rep(*components: Any) -> str:
    """One repetition: components escaped (a tuple is a component's subcomponents)."""
    return _trimmed("^", [_trimmed("&", [_hl7_text(s) for s in c]) if isinstance(c, tuple) else _hl7_text(c)
                          for c in components])


def _reps(reps: list[str]) -> str:
    return "~".join(r for r in reps if r)


def _segment(name: str, values: dict[int, str]) -> str:
    return _trimmed(_FIELD, [name] + [values.get(n, "") for n in range(1, max(values, default=0) + 1)])


def _dtm(iso: str | None) -> str:
    """ISO 8601 at any precision -> HL7 DTM ('2019-11-22T10:30+02:00' -> '201911221030+0200')."""
    if not iso:
        return ""
    stamp, zone = iso, ""
    offset = re.search(r"(Z|[+-]\d{2}:\d{2})\Z", iso) if "T" in iso else None
    if offset:
        stamp, zone = iso[:offset.start()], "+0000" if offset.group(1) == "Z" else offset.group(1).replace(":", "")
    day, _, time = stamp.partition("T")
    time, _, fraction = time.partition(".")
    return day.replace("-", "") + time.replace(":", "") + (f".{fraction[:4]}" if fraction else "") + zone


def _coding(c: dict | None) -> str:
    return _rep(c.get("code"), c.get("display"), c.get("system")) if c else ""


def _provider(p: dict) -> str:
    return _rep(p.get("id"), p.get("family_name"), p.get("given_name"), "", "", "", "", "", p.get("authority"),
                "", "", "", p.get("id_type"))


def _money(m: dict | None) -> str:
    return _rep((m.get("amount"), m.get("currency"))) if m else ""


def _pid(patient: dict) -> str:
    identifiers = [i for i in patient.get("identifiers", []) if i.get("value")]
    if identifiers:
        pid3 = _reps([_rep(i["value"], "", "", i.get("authority"), i.get("type")) for i in identifiers])
    else:  # below phi: only the pseudonym is left, and it is no MR number (table 0203 ANON)
        kind = "ANON" if governance.is_pseudonym(patient.get("id")) else patient.get("id_type")
        pid3 = _rep(patient.get("id"), "", "", "", kind)
    telecoms = patient.get("telecoms", [])
    phones = {n: _reps([_rep(t.get("value"), t.get("use"), t.get("equipment")) for t in telecoms
                        if (t.get("use") == "WPN") == (n == 14)]) for n in (13, 14)}
    return _segment("PID", {
        1: "1", 3: pid3,
        # A name or address minimised down to its type code is left out, not sent as '^^^^^^D'.
        5: _reps([_rep(n.get("family"), n.get("given"), n.get("middle"), n.get("suffix"), n.get("prefix"), "",
                       n.get("type")) for n in patient.get("names", []) if n.keys() - {"type"}]),
        7: _dtm(patient.get("birth_date")), 8: _hl7_text(patient.get("sex")),
        11: _reps([_rep(*(a.get("lines", []) + ["", ""])[:2], a.get("city"), a.get("state"), a.get("postal_code"),
                        a.get("country"), a.get("type")) for a in patient.get("addresses", []) if a.keys() - {"type"}]),
        **phones,
    })


def _pv1(visit: dict) -> str:
    where = visit.get("location") or {}
    return _segment("PV1", {
        1: "1", 2: _hl7_text(visit.get("patient_class")),
        3: _rep(where.get("point_of_care"), where.get("room"), where.get("bed"), where.get("facility"),
                "", "", "", "", where.get("description")),
        4: _hl7_text(visit.get("admission_type")),
        7: _reps([_provider(p) for p in visit.get("attending", [])]),
        8: _reps([_provider(p) for p in visit.get("referring", [])]),
        10: _hl7_text(visit.get("hospital_service")), 14: _hl7_text(visit.get("admit_source")),
        17: _reps([_provider(p) for p in visit.get("admitting", [])]),
        19: _hl7_text(visit.get("number")), 36: _hl7_text(visit.get("discharge_disposition")),
        44: _dtm(visit.get("admitted_at")), 45: _dtm(visit.get("discharged_at")),
    })


def _ft1(charge: dict, number: int) -> str:
    department = charge.get("department") or {}
    return _segment("FT1", {
        1: _hl7_text(charge.get("set_id") or number), 2: _hl7_text(charge.get("transaction_id")),
        3: _hl7_text(charge.get("batch_id")),
        4: _rep(_dtm(charge.get("service_date")), _dtm(charge.get("service_end"))),
        5: _dtm(charge.get("posted_at")), 6: _hl7_text(charge.get("type")), 7: _coding(charge.get("code")),
        8: _hl7_text(charge.get("description")), 10: _hl7_text(charge.get("quantity")),
        11: _money(charge.get("amount")), 12: _money(charge.get("unit_price")),
        13: _rep(department.get("code"), department.get("name")),
        19: _reps([_coding(c) for c in charge.get("diagnoses", [])]),
        20: _reps([_provider(p) for p in charge.get("performed_by", [])]),
        21: _reps([_provider(p) for p in charge.get("ordered_by", [])]),
        25: _coding(charge.get("procedure")), 26: _reps([_coding(c) for c in charge.get("procedure_modifiers", [])]),
    })


def control_id(envelope: Envelope) -> str:
    """MSH-10: 20 characters, the same on every attempt of a delivery (a legacy engine's
    duplicate check and the MLLP ACK match on it), different per destination."""
    return hashlib.sha256(f"{envelope.message_id}\x00{envelope.destination}".encode()).hexdigest()[:20].upper()


@canonical_transform("charge.posted")
def hl7_dft_p03(events: list[dict], envelope: Envelope) -> tuple[bytes, str]:
    """One DFT^P03 for the message's charges: one patient and visit, one FT1 per charge.posted."""
    contexts = {json.dumps([e["data"].get("patient"), e["data"].get("visit")], sort_keys=True) for e in events}
    if len(contexts) > 1:
        raise TransformError("a DFT^P03 is about one patient and visit; these charges name several")
    first = events[0]["data"]
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")  # not the time of care: no clearance needed
    msh = "MSH" + _FIELD + _FIELD.join([_ENCODING, "COURIER", "", _hl7_text(envelope.destination), "", now, "",
                                        "DFT^P03^DFT_P03", control_id(envelope), "P", "2.5", "", "", "", "", "",
                                        "UNICODE UTF-8"])
    segments = [msh, _segment("EVN", {1: "P03", 2: now})]
    if first.get("patient"):
        segments.append(_pid(first["patient"]))
    if first.get("visit"):
        segments.append(_pv1(first["visit"]))
    segments += [_ft1(e["data"]["charge"], n) for n, e in enumerate(events, 1)]
    return "".join(s + "\r" for s in segments).encode("utf-8"), "application/hl7-v2; charset=utf-8"


REGISTRY: dict[str, Transform] = {"passthrough": passthrough, "canonical_json": canonical_json,
                                  "hl7_dft_p03": hl7_dft_p03, "erp_csv": erp_csv, "sql_row": sql_row}


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


class TransformFailed(Exception):
    """A transform could not be loaded or raised: the message's delivery is dead with this reason."""


def apply(name: str | None, envelope: Envelope) -> tuple[bytes, str]:
    """Run the destination's transform on `envelope`, as the worker does and `courier routes test` shows.

    Any failure (a transform is operator code) becomes TransformFailed, worded
    "transform NAME failed: Type: message", the reason a dead delivery carries.
    """
    try:
        return resolve(name)(envelope)
    except Exception as exc:
        raise TransformFailed(f"transform {name or 'passthrough'} failed: {type(exc).__name__}: {exc}") from exc
