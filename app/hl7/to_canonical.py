"""HL7 v2 -> canonical events (courier.app.domain.canonical), version 1.

    ADT^A01          patient.admitted   kind 'admission'
    ADT^A04          patient.admitted   kind 'registration': an outpatient or emergency
                                        visit starts; nobody is admitted to a bed
    ADT^A03          patient.discharged
    ADT^A08          patient.updated
    DFT^P03          charge.posted      one per FT1, ids '<MSH-10>-<n>'
    SIU^S12..S26     schedule.changed   action booked (S12), rescheduled (S13), modified
                                        (S14), cancelled (S15), discontinued (S16),
                                        deleted (S17), no_show (S26)
    ORM^O01          order.changed      one per ORC (action from ORC-1), '<MSH-10>-<n>'
    ORU^R01          service.completed  one per OBR (a reported result), '<MSH-10>-<n>'

Field splitting is python-hl7's; unescaping is ours (`_unescape`): python-hl7's turns
\\H\\ into '_', drops the rest of a value after an unterminated escape and logs values.
Rules: leading/trailing blanks and the explicit null '""' count as empty (so an A08
cannot clear a field in v1); absent optional values are left out of the event; a value
that is present but malformed (a date that is no date, a quantity that is no number) or
a required one that is missing raises MappingError naming the place, e.g. 'FT1[2]-10':
nothing is silently dropped or guessed. HL7 repetitions become lists. Times keep their
precision and offset; occurred_at is the first full, offset-aware candidate (ADT: EVN-6,
EVN-2, MSH-7; DFT: FT1-5, EVN-2, MSH-7; SIU: MSH-7; ORM: ORC-9, MSH-7; ORU: OBR-22,
OBR-7, MSH-7) and is left out when there is none. MSH-7 and EVN-2/6 feed nothing else,
so an unreadable one only means "unknown" there. Left out on purpose: OBX and NTE
outside an OBR group (patient-level), and ORC/OBR/NTE inside DFT (their grouping with
FT1 is ambiguous across versions).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Callable

import hl7
from marshmallow import ValidationError

from courier.app.domain import canonical
from courier.app.hl7.er7 import Hl7Message

__all__ = ["MappingError", "MAPPINGS", "to_canonical"]

VERSION = 1  # every event is emitted as version 1: the version every consumer knows


class MappingError(ValueError):
    """A message that cannot become canonical events. .reason says what, .where where
    ('FT1[2]-10': the second FT1 segment, field 10; 'MSH-9'; 'PID'). Like Hl7Error it
    names structure, never values, so it can be logged without leaking PHI."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(reason, where)  # args carry both: survives pickling (Celery)
        self.reason = reason
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


# --------------------------------------------------------------------------- reading values

@dataclass(frozen=True)
class _Delimiters:
    component: str
    repetition: str
    escape: str
    subcomponent: str
    field: str
    truncation: str
    charset: str = "utf-8"  # the message's: \\Xhh..\\ bytes are in it

    @classmethod
    def of(cls, message: Hl7Message) -> "_Delimiters":
        enc = message.encoding_characters
        return cls(enc[0], enc[1], enc[2], enc[3], message.field_separator, enc[4] if len(enc) > 4 else "",
                   message.charset)


_FORMATTING = re.compile(r"\.(sp|br|fi|nf|in|ti|sk|ce)([+-]?\d*)\Z")
_MAX_REPEAT = 100


def _unescape(raw: str, d: _Delimiters) -> str:
    """HL7 escape sequences -> text. Highlighting (\\H\\, \\N\\) and layout commands go;
    line breaks become '\\n'; hex (\\Xhh..\\) is read in the message's charset, else Latin-1. Sequences
    we cannot read (charset switches, \\Zxx\\, an unterminated escape) stay as sent:
    kept text is better than lost text."""
    esc = d.escape
    if not esc or esc not in raw:
        return raw
    out, i = [], 0
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": esc,
              "P": d.truncation, "H": "", "N": ""}
    while i < len(raw):
        if raw[i] != esc:
            out.append(raw[i])
            i += 1
            continue
        end = raw.find(esc, i + 1)
        if end == -1:
            out.append(raw[i:])
            break
        body = raw[i + 1:end]
        formatting = _FORMATTING.match(body)
        if body in simple and (body != "P" or d.truncation):
            out.append(simple[body])
        elif formatting:
            command, count = formatting.groups()
            # Counts are capped: '\.sp999999999\' must not turn a few bytes into a gigabyte.
            times = min(max(int(count or 1), 1), _MAX_REPEAT)
            if command in ("br", "sp", "ce"):
                out.append("\n" * times if command == "sp" else "\n")
            elif command == "sk":
                out.append(" " * times)
        elif body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1 and re.fullmatch(r"[0-9A-Fa-f]+", body[1:]):
            data = bytes.fromhex(body[1:])
            try:
                out.append(data.decode(d.charset))
            except (UnicodeDecodeError, LookupError):
                out.append(data.decode("latin-1"))
        else:
            out.append(raw[i:end + 1])
        i = end + 1
    return "".join(out).replace("\r\n", "\n").replace("\r", "\n")


class _Rep:
    """One repetition of a field: components of subcomponents, raw until read."""

    __slots__ = ("_components", "_d")

    def __init__(self, components: list[list[str]], d: _Delimiters):
        self._components, self._d = components, d

    def value(self, component: int = 1, sub: int = 1) -> str:
        """The unescaped, trimmed text of one subcomponent ('' if absent or '""')."""
        if component > len(self._components) or sub > len(self._components[component - 1]):
            return ""
        return _clean(self._components[component - 1][sub - 1], self._d)

    def subs(self, component: int = 1) -> list[str]:
        if component > len(self._components):
            return []
        return [t for t in (_clean(s, self._d) for s in self._components[component - 1]) if t]

    def texts(self) -> list[str]:
        """Every non-empty subcomponent of every component, in order."""
        return [t for c in range(1, len(self._components) + 1) for t in self.subs(c)]

    def whole(self) -> str:
        """The repetition as one text, delimiters put back: free text from a sender that
        forgot to escape a '^' or '&' keeps it rather than losing what follows."""
        if _clean("".join(s for c in self._components for s in c), self._d) == "":
            return ""
        d = self._d
        return d.component.join(d.subcomponent.join(_unescape(s, d) for s in c) for c in self._components).strip()


def _clean(raw: str, d: _Delimiters) -> str:
    if raw.strip() == '""':  # HL7's explicit null
        return ""
    return _unescape(raw, d).strip()


class _Segment:
    """One segment; `number` counts segments of its id (FT1[2] is the second FT1)."""

    def __init__(self, segment: hl7.Segment, number: int, d: _Delimiters):
        self.id = str(segment[0])
        self.number = number
        self._segment, self._d = segment, d

    def where(self, field: int, component: int | None = None) -> str:
        return f"{self.id}[{self.number}]-{field}" + (f".{component}" if component else "")

    def reps(self, field: int) -> list[_Rep]:
        """The field's repetitions (python-hl7 nodes are str or lists at every level)."""
        if field >= len(self._segment):
            return []
        node = self._segment[field]
        reps = [node] if isinstance(node, str) else list(node)
        out = []
        for rep in reps:
            comps = [rep] if isinstance(rep, str) else list(rep)
            out.append(_Rep([[c] if isinstance(c, str) else [str(s) for s in c] for c in comps], self._d))
        return out

    def first(self, field: int) -> _Rep:
        reps = self.reps(field)
        return reps[0] if reps else _Rep([], self._d)

    def value(self, field: int, component: int = 1, sub: int = 1) -> str:
        return self.first(field).value(component, sub)

    def text(self, field: int) -> str:
        """A free-text field, whole (see _Rep.whole), repetitions as lines."""
        return "\n".join(t for t in (r.whole() for r in self.reps(field)) if t)


class _Message:
    def __init__(self, message: Hl7Message):
        d = _Delimiters.of(message)
        try:
            parsed = hl7.parse(message.text)
        except Exception as exc:  # python-hl7 raises assorted types on odd input
            raise MappingError(f"HL7 parser failed ({type(exc).__name__})", "message") from None
        counts: dict[str, int] = {}
        self.segments: list[_Segment] = []
        for segment in parsed:
            sid = str(segment[0])
            counts[sid] = counts.get(sid, 0) + 1
            self.segments.append(_Segment(segment, counts[sid], d))
        self.source = message
        self.msh = self.segments[0]

    def all(self, sid: str) -> list[_Segment]:
        return [s for s in self.segments if s.id == sid]

    def first(self, sid: str) -> _Segment | None:
        return next((s for s in self.segments if s.id == sid), None)

    def one(self, sid: str, why: str) -> _Segment:
        segment = self.first(sid)
        if segment is None:
            raise MappingError(f"no {sid} segment: {why}", sid)
        return segment


# --------------------------------------------------------------------------- values

_DTM = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
                  r"(?:([+-])(\d{2})(\d{2}))?\Z")


def _timestamp(seg: _Segment, field: int, component: int = 1, *, date_only: bool = False) -> str | None:
    """An HL7 DTM/TS value as ISO 8601 at its own precision ('20191122' -> '2019-11-22',
    '198908181126+0215' -> '1989-08-18T11:26+02:15'); an offset is kept only with a time."""
    raw = seg.value(field, component)
    if not raw:
        return None
    match = _DTM.match(raw)
    where = seg.where(field, component if component > 1 else None)
    if match is None:
        raise MappingError("not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])", where)
    y, mo, d, h, mi, s, frac, sign, oh, om = match.groups()
    try:
        datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0))
    except ValueError:
        raise MappingError("date/time out of range", where) from None
    if sign and (int(oh) > 14 or int(om) > 59):
        raise MappingError("time zone offset out of range", where)
    out = y + "".join(f"-{p}" for p in (mo, d) if p)
    if date_only or h is None:
        return out
    out += f"T{h}" + "".join(f":{p}" for p in (mi, s) if p) + (f".{frac}" if frac else "")
    return out + (f"{sign}{oh}:{om}" if sign else "")


def _when(seg: _Segment | None, field: int) -> str | None:
    """A time used only to pick occurred_at (MSH-7, EVN-2, EVN-6): unreadable means unknown,
    since no data field depends on it and a header quirk should not block a message."""
    if seg is None:
        return None
    try:
        return _timestamp(seg, field)
    except MappingError:
        return None


def _aware(iso: str | None) -> str | None:
    """A timestamp as the envelope's occurred_at wants it (a full, offset-aware date-time), or None."""
    if not iso or not re.search(r"[+-]\d{2}:\d{2}\Z", iso) or len(iso) - 6 < 16:
        return None  # no offset, or coarser than minutes
    stamp, sign, oh, om = iso[:-6], iso[-6], int(iso[-5:-3]), int(iso[-2:])
    offset = timedelta(hours=oh, minutes=om) * (1 if sign == "+" else -1)
    fraction = stamp[20:] if len(stamp) > 20 else ""
    base = datetime.strptime(stamp[:19] if len(stamp) >= 19 else stamp + ":00", "%Y-%m-%dT%H:%M:%S")
    base = base.replace(microsecond=int(fraction.ljust(6, "0")) if fraction else 0)
    return base.replace(tzinfo=timezone(offset)).isoformat()


def _decimal(seg: _Segment, field: int, component: int = 1, sub: int = 1) -> str | None:
    raw = seg.value(field, component, sub)
    if not raw:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        where = seg.where(field, component if component > 1 or sub > 1 else None)
        raise MappingError("not a number", where)
    return str(value)


def _money(seg: _Segment, field: int) -> dict | None:
    """CP (FT1-11/12): component 1 is MO, the amount and its currency as subcomponents."""
    if not seg.value(field):
        return None
    currency = seg.value(field, 1, 2)
    if len(currency) > 8:  # ISO 4217 codes have 3 letters; this is something else
        raise MappingError("not a currency code", seg.where(field))
    return _compact({"amount": _decimal(seg, field), "currency": currency})


def _compact(data: dict) -> dict:
    """Leave out absent values: None, '', [] and {} mean 'not sent'."""
    return {k: v for k, v in data.items() if v not in (None, "", [], {})}


def _coding(rep: _Rep, *, required: str | None = None) -> dict | None:
    """CWE/CNE/CE -> Coding. required=where: MappingError if there is no code."""
    data = _compact({"code": rep.value(1), "display": rep.value(2), "system": rep.value(3)})
    if "code" not in data:
        if required:
            raise MappingError("no code (component 1 is empty)", required)
        return None
    return data


def _codings(seg: _Segment, field: int) -> list[dict]:
    return [c for c in (_coding(r) for r in seg.reps(field)) if c]


def _provider(rep: _Rep) -> dict | None:
    """XCN -> Provider (None if the repetition names nobody, e.g. '^^^')."""
    data = _compact({
        "id": rep.value(1), "family_name": rep.value(2, 1), "given_name": rep.value(3),
        "authority": rep.value(9, 1) or rep.value(9, 2), "id_type": rep.value(13),
    })
    return data if {"id", "family_name", "given_name"} & data.keys() else None


def _providers(seg: _Segment, field: int) -> list[dict]:
    return [p for p in (_provider(r) for r in seg.reps(field)) if p]


def _location(rep: _Rep) -> dict | None:
    """PL -> Location (None if empty)."""
    return _compact({
        "point_of_care": rep.value(1, 1), "room": rep.value(2), "bed": rep.value(3),
        "facility": rep.value(4, 1) or rep.value(4, 2), "description": rep.value(9),
    }) or None


# --------------------------------------------------------------------------- patient, visit

def _identifier(rep: _Rep) -> dict | None:
    """CX -> Identifier (None without an id value)."""
    value = rep.value(1)
    if not value:
        return None
    return _compact({"value": value, "type": rep.value(5), "authority": rep.value(4, 1) or rep.value(4, 2)})


def _patient(pid: _Segment, reference: str | None) -> dict:
    """PID -> PatientRef. `reference` (an ISO date) is the day the age band is taken on."""
    identifiers = []
    # PID-3 is the identifier list; PID-2 and PID-4 are what versions before 2.3.1 used.
    for number in (3, 2, 4):
        identifiers = [i for i in (_identifier(r) for r in pid.reps(number)) if i]
        if identifiers:
            break
    if not identifiers:
        raise MappingError("no patient identifier (PID-3, nor PID-2 or PID-4)", pid.where(3))
    chosen = next((i for i in identifiers if i.get("type", "").upper() == "MR"), identifiers[0])
    names = [n for n in (_compact({
        "family": r.value(1, 1), "given": r.value(2), "middle": r.value(3), "suffix": r.value(4),
        "prefix": r.value(5), "type": r.value(7),
    }) for r in pid.reps(5)) if n.keys() & {"family", "given", "middle"}]
    addresses = [a for a in (_compact({
        "lines": [line for line in (" ".join(r.subs(1)), r.value(2)) if line],
        "city": r.value(3), "state": r.value(4), "postal_code": r.value(5), "country": r.value(6),
        "type": r.value(7),
    }) for r in pid.reps(11)) if a.keys() - {"type"}]
    telecoms = []
    for number, default_use in ((13, "PRN"), (14, "WPN")):  # PID-13 home, PID-14 business
        for r in pid.reps(number):
            value = r.value(1) or r.value(4) or " ".join(t for t in (r.value(c) for c in (5, 6, 7, 8)) if t)
            if value:
                telecoms.append(_compact({"value": value, "use": r.value(2) or default_use, "equipment": r.value(3)}))
    birth_date = _timestamp(pid, 7, date_only=True)
    postal = next((a for a in addresses if a.get("postal_code")), {})
    return _compact({
        "id": chosen["value"], "id_type": chosen.get("type"), "identifiers": identifiers,
        "names": names, "birth_date": birth_date, "sex": pid.value(8),
        "addresses": addresses, "telecoms": telecoms,
        "age_band": canonical.age_band(birth_date, reference),
        "zip3": canonical.zip3(postal.get("postal_code"), postal.get("country")),
    })


def _visit(pv1: _Segment) -> dict:
    return _compact({
        "number": pv1.value(19), "patient_class": pv1.value(2), "admission_type": pv1.value(4),
        "hospital_service": pv1.value(10), "admit_source": pv1.value(14),
        "location": _location(pv1.first(3)),
        "attending": _providers(pv1, 7), "referring": _providers(pv1, 8), "admitting": _providers(pv1, 17),
        "admitted_at": _timestamp(pv1, 44), "discharged_at": _timestamp(pv1, 45),
        "discharge_disposition": pv1.value(36),
    })


def _context(pid: _Segment | None, pv1: _Segment | None, reference: str | None) -> dict:
    return _compact({"patient": _patient(pid, reference) if pid else None,
                     "visit": _visit(pv1) if pv1 else None})


# --------------------------------------------------------------------------- events

@dataclass
class _Event:
    type: str
    data: dict
    times: list = field(default_factory=list)  # occurred_at candidates, best first


def _first_time(*candidates: str | None) -> str | None:
    return next((c for c in candidates if c), None)


def _adt(msg: _Message, trigger: str) -> list[_Event]:
    pid = msg.one("PID", "an ADT message is about a patient")
    pv1, evn = msg.first("PV1"), msg.first("EVN")
    times = [_when(evn, 6), _when(evn, 2), _when(msg.msh, 7)]
    data = _context(pid, pv1, _first_time(*times))
    if trigger in ("A01", "A03", "A04") and "visit" not in data:
        what = "a discharge" if trigger == "A03" else "an admission or registration"
        reason = "no PV1 segment" if pv1 is None else "the PV1 segment is empty"
        raise MappingError(f"{reason}: {what} needs the visit", "PV1")
    if trigger in ("A01", "A04"):
        return [_Event("patient.admitted", {"kind": "admission" if trigger == "A01" else "registration", **data}, times)]
    if trigger == "A03":
        return [_Event("patient.discharged", data, times)]
    return [_Event("patient.updated", data, times)]


def _charge(ft1: _Segment, line: int) -> dict:
    if not ft1.value(6):
        raise MappingError("no transaction type", ft1.where(6))
    department = ft1.first(13)
    return _compact({
        "line": line, "set_id": ft1.value(1), "transaction_id": ft1.value(2), "batch_id": ft1.value(3),
        "type": ft1.value(6), "code": _coding(ft1.first(7), required=ft1.where(7)),
        "description": ft1.text(8),
        "service_date": _timestamp(ft1, 4, 1), "service_end": _timestamp(ft1, 4, 2),
        "posted_at": _timestamp(ft1, 5),
        "quantity": _decimal(ft1, 10),
        "amount": _money(ft1, 11), "unit_price": _money(ft1, 12),
        "department": _compact({"code": department.value(1), "name": department.value(2)})
        if department.value(1) else None,
        "diagnoses": _codings(ft1, 19),
        "performed_by": _providers(ft1, 20), "ordered_by": _providers(ft1, 21),
        "procedure": _coding(ft1.first(25)), "procedure_modifiers": _codings(ft1, 26),
    })


def _dft(msg: _Message, trigger: str) -> list[_Event]:
    ft1s = msg.all("FT1")
    if not ft1s:
        raise MappingError("no FT1 segment: no charge to post", "FT1")
    pid = msg.one("PID", "a charge is posted to a patient")
    evn = msg.first("EVN")
    common = [_when(evn, 2), _when(msg.msh, 7)]
    context = _context(pid, msg.first("PV1"), _first_time(*common))
    events = []
    for line, ft1 in enumerate(ft1s, 1):
        charge = _charge(ft1, line)
        events.append(_Event("charge.posted", {"charge": charge, **context}, [charge.get("posted_at"), *common]))
    return events


_SIU_ACTIONS = {"S12": "booked", "S13": "rescheduled", "S14": "modified", "S15": "cancelled",
                "S16": "discontinued", "S17": "deleted", "S26": "no_show"}


def _siu(msg: _Message, trigger: str) -> list[_Event]:
    sch = msg.one("SCH", "a scheduling message describes an appointment")
    tq1 = msg.first("TQ1")
    appointment = _compact({
        "placer_id": sch.value(1), "filler_id": sch.value(2),
        # TQ1 (v2.5+) replaces SCH-11 (TQ: component 4 start, 5 end).
        "start": (_timestamp(tq1, 7) if tq1 else None) or _timestamp(sch, 11, 4),
        "end": (_timestamp(tq1, 8) if tq1 else None) or _timestamp(sch, 11, 5),
        "event_reason": _coding(sch.first(6)), "reason": _coding(sch.first(7)), "type": _coding(sch.first(8)),
        "status": sch.value(25),
    })
    if not appointment.keys() & {"placer_id", "filler_id"}:
        raise MappingError("no appointment id (SCH-1 placer, SCH-2 filler)", sch.where(1))
    times = [_when(msg.msh, 7)]
    data = {
        "action": _SIU_ACTIONS[trigger], "appointment": appointment,
        **_context(msg.first("PID"), msg.first("PV1"), _first_time(appointment.get("start"), *times)),
        "services": [_compact({"code": _coding(ais.first(3), required=ais.where(3)),
                               "start": _timestamp(ais, 4), "status": ais.value(10)}) for ais in msg.all("AIS")],
        "locations": [loc for loc in (_location(ail.first(3)) for ail in msg.all("AIL")) if loc],
        "providers": [_compact({"provider": p, "role": _coding(aip.first(4))})
                      for aip in msg.all("AIP") for p in [_provider(aip.first(3))] if p],
        "equipment": [c for c in (_coding(aig.first(3)) for aig in msg.all("AIG")) if c],
        "notes": _notes(msg.all("NTE")),
    }
    return [_Event("schedule.changed", _compact(data), times)]


def _notes(ntes: list[_Segment]) -> list[str]:
    return [t for t in (nte.text(3) for nte in ntes) if t]


@dataclass
class _Group:
    """An order (ORC + detail) or a result (OBR) with what follows it, and its patient."""
    pid: _Segment | None
    pv1: _Segment | None
    orc: _Segment | None = None
    detail: _Segment | None = None
    obx: list = field(default_factory=list)
    nte: list = field(default_factory=list)


def _order_ref(orc: _Segment | None, obr: _Segment | None) -> dict:
    """ORC-2/3/4, falling back on OBR-2/3 (the same numbers, and sometimes the only copy)."""
    def pick(orc_field: int, obr_field: int | None) -> str:
        value = orc.value(orc_field) if orc else ""
        return value or (obr.value(obr_field) if obr and obr_field else "")
    return _compact({"placer_number": pick(2, 2), "filler_number": pick(3, 3), "placer_group_number": pick(4, None)})


# ORC-1 (HL7 table 0119) -> order.changed action; `control` keeps the code itself, so
# 'UA' (unable to accept) stays distinguishable from a plain status change.
_ORDER_CONTROL = {
    "NW": "placed", "SN": "placed",
    "XO": "modified", "XX": "modified", "XR": "modified", "RP": "modified", "RU": "modified",
    "CA": "cancelled", "OC": "cancelled", "CR": "cancelled", "DC": "cancelled", "OD": "cancelled",
    "DR": "cancelled",
    "HD": "held", "OH": "held", "HR": "held",
    "RL": "released", "OE": "released", "OR": "released",
    "SC": "status_changed", "SR": "status_changed", "OK": "status_changed", "NA": "status_changed",
    "UA": "status_changed",
}
# ORM order detail segment -> its fields that may hold the ordered service's code, best first.
_ORDER_DETAIL = {"OBR": (4,), "RXO": (1,), "RQD": (2, 3, 4), "ODS": (3,)}


def _orm(msg: _Message, trigger: str) -> list[_Event]:
    groups: list[_Group] = []
    pid = pv1 = current = None
    for seg in msg.segments[1:]:
        if seg.id == "PID":
            pid, pv1, current = seg, None, None
        elif seg.id == "PV1":
            pv1, current = seg, None
        elif seg.id == "ORC":
            current = _Group(pid, pv1, orc=seg)
            groups.append(current)
        elif seg.id in _ORDER_DETAIL:
            if current is None or current.detail is not None:
                # ORC is required per order: without it the order control (new? cancel?) is unknown.
                raise MappingError(f"{seg.id}[{seg.number}] has no ORC of its own: the order control is unknown", "ORC")
            current.detail = seg
        elif seg.id == "NTE" and current:
            current.nte.append(seg)
    if not groups:
        raise MappingError("no ORC segment: no order", "ORC")
    events = []
    for group in groups:
        orc, detail = group.orc, group.detail
        control = orc.value(1)
        if control.upper() not in _ORDER_CONTROL:
            raise MappingError("order control code has no canonical action", orc.where(1))
        obr = detail if detail is not None and detail.id == "OBR" else None
        order = _order_ref(orc, obr)
        if not order.keys() & {"placer_number", "filler_number"}:
            raise MappingError("no order number (ORC-2/3 or OBR-2/3)", orc.where(2))
        service = None
        if detail is not None:
            code = next((c for c in (_coding(detail.first(f)) for f in _ORDER_DETAIL[detail.id]) if c), None)
            service = {"code": code} if code else None
        times = [_timestamp(orc, 9), _when(msg.msh, 7)]
        data = _compact({
            "action": _ORDER_CONTROL[control.upper()], "control": control, "order": order,
            "status": orc.value(5), "service": service, "ordered_at": times[0],
            "ordered_by": _providers(orc, 12) or (_providers(obr, 16) if obr else []),
            **_context(group.pid, group.pv1, _first_time(*times)),
            "notes": _notes(group.nte),
        })
        events.append(_Event("order.changed", data, times))
    return events


def _oru(msg: _Message, trigger: str) -> list[_Event]:
    groups: list[_Group] = []
    pid = pv1 = orc = current = None
    for seg in msg.segments[1:]:
        if seg.id == "PID":
            pid, pv1, orc, current = seg, None, None, None
        elif seg.id == "PV1":
            pv1, current = seg, None
        elif seg.id == "ORC":
            orc, current = seg, None
        elif seg.id == "OBR":
            current = _Group(pid, pv1, orc=orc, detail=seg)
            groups.append(current)
            orc = None
        # OBX and NTE outside an OBR group describe the patient or visit, not a result.
        elif seg.id == "OBX" and current:
            current.obx.append(seg)
        elif seg.id == "NTE" and current:
            current.nte.append(seg)
    if not groups:
        raise MappingError("no OBR segment: no result to report", "OBR")
    events = []
    for group in groups:
        obr = group.detail
        times = [_timestamp(obr, 22), _timestamp(obr, 7), _when(msg.msh, 7)]
        data = _compact({
            "service": {"code": _coding(obr.first(4), required=obr.where(4))},
            "status": obr.value(25), "performed_at": times[1], "reported_at": times[0],
            "order": _order_ref(group.orc, obr) or None,
            "ordered_by": _providers(obr, 16) or (_providers(group.orc, 12) if group.orc else []),
            **_context(group.pid, group.pv1, _first_time(*times)),
            "observations": [_observation(obx) for obx in group.obx],
            "notes": _notes(group.nte),
        })
        events.append(_Event("service.completed", data, times))
    return events


def _observation(obx: _Segment) -> dict:
    return _compact({
        # OBX-3 is required by the standard, but text reports leave it empty line by line.
        "code": _coding(obx.first(3)), "value_type": obx.value(2),
        # Each repetition rendered as text ('^182' -> '182', '<^10' -> '< 10').
        "values": [t for t in (" ".join(r.texts()) for r in obx.reps(5)) if t],
        "units": obx.value(6), "status": obx.value(11), "observed_at": _timestamp(obx, 14),
    })


Mapper = Callable[[_Message, str], list[_Event]]
MAPPINGS: dict[str, Mapper] = {
    "ADT^A01": _adt, "ADT^A03": _adt, "ADT^A04": _adt, "ADT^A08": _adt,
    "DFT^P03": _dft,
    **{f"SIU^{trigger}": _siu for trigger in _SIU_ACTIONS},
    "ORM^O01": _orm,
    "ORU^R01": _oru,
}
# Types whose messages may hold several events: their ids always carry '-<n>'.
_MULTI = {"DFT^P03", "ORM^O01", "ORU^R01"}


def _event_id(control_id: str) -> str:
    """MSH-10 as an event id: characters the envelope does not allow become '=XX' (UTF-8
    hex, '=' itself too), so the id stays stable, readable and unambiguous."""
    out = "".join(c if re.fullmatch(r"[A-Za-z0-9._:@/+-]", c) else "".join(f"={b:02X}" for b in c.encode())
                  for c in control_id)
    return out


def to_canonical(message: Hl7Message) -> list[dict]:
    """An HL7 v2 message -> canonical event envelopes {type, version, id, occurred_at, data}
    (occurred_at only when the message has a full date-time with an offset); MappingError
    when its type has no mapping or a required value is missing or malformed."""
    kind = message.message_type.removeprefix("HL7v2:")
    mapper = MAPPINGS.get(kind)
    if mapper is None:
        raise MappingError(f"no canonical mapping for {kind} (mapped: {', '.join(sorted(MAPPINGS))})", "MSH-9")
    msg = _Message(message)
    events = mapper(msg, kind.partition("^")[2])
    base = _event_id(message.control_id)
    envelopes = []
    for number, event in enumerate(events, 1):
        event_id = f"{base}-{number}" if kind in _MULTI else base
        if not canonical.EVENT_ID.match(event_id):
            raise MappingError("MSH-10 is too long to make an event id", "MSH-10")
        try:
            canonical.load_event(event.type, VERSION, event.data)
        except ValidationError as exc:  # a mapping bug or a value the schema refuses: never pass it on
            raise MappingError(f"{event.type} does not match its canonical schema: {exc.messages}",
                               "canonical") from None
        envelope = {"type": event.type, "version": VERSION, "id": event_id}
        occurred = next((a for a in map(_aware, event.times) if a), None)
        if occurred:
            envelope["occurred_at"] = occurred
        envelope["data"] = event.data
        envelopes.append(envelope)
    return envelopes
