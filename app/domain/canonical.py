"""Canonical models: the one place where Courier says what a provider, a charge or a
`patient.admitted` event looks like, as marshmallow schemas.

Versioning
    An event names its version in the envelope (`{"type", "id", "occurred_at", "version",
    "data"}`; no version means 1). `EVENTS[(type, version)]` is the schema of `data`;
    `MODELS[(name, version)]` the schemas of the entities events are made of. A published
    version is frozen: change it and every consumer that trusted it breaks. A change is
    made as a new version, and it is *compatible* only if it adds optional fields and
    nothing else; `compatible(old, new)` lists every other difference (a removed or
    renamed field, a changed type, validation or classification, a field that became or
    was added as required), so that a configuration check can refuse the rest. Schemas
    refuse unknown keys: a typo or a field from a newer version is reported, not lost.

Classification
    Every leaf field carries `metadata={"classification": ...}`, one of
        phi      direct identifiers and free text: names, MRN and other record, account
                 and visit numbers, date of birth, street address, city, full postal
                 code, phone, e-mail, device serial numbers, and anything typed by a
                 person (notes, charge descriptions), which may contain any of those;
        limited  what HIPAA Safe Harbor removes but a limited data set may keep: dates
                 of care (admission, service, appointment), order, transaction and claim
                 numbers, department and bed, clinicians' names, and demographic
                 quasi-identifiers (sex, state, age band, 3-digit zip): Safe Harbor
                 lets some of these through, but Courier cannot check the population
                 thresholds it relies on, so they stay out of de-identified feeds;
        none     everything else: codes and their display text, amounts, quantities,
                 statuses, cost centres, GL accounts, SKUs, suppliers, payers.
    Nested schemas inherit nothing: each leaf is classified where it is declared, so the
    same schema cannot be phi in one place and none in another by accident. A list of
    plain values is one leaf (classified on the list). A destination's clearance decides
    what it may see (`CLEARANCES`: phi sees all, limited sees limited and none,
    deidentified sees none); `walk()` yields every leaf with its classification, failing
    closed on anything it cannot classify.

Pseudonymisation
    Identifiers that other systems join on (the patient's MR number, visit, account,
    transaction, order, appointment, invoice and claim numbers) also carry
    `metadata={"pseudonymise": namespace}`: where the destination's clearance is too low to
    see them, courier.app.domain.governance replaces them by a keyed pseudonym (HMAC of namespace and
    value) instead of removing them, so an ERP can still join two events of one patient.
    Equal namespaces join (a charge's transaction_id and an invoice line's
    charge_transaction_id); different ones never produce equal pseudonyms.
"""
from __future__ import annotations

import re
from datetime import date
from functools import lru_cache
from typing import Any, Iterator

from marshmallow import RAISE, Schema, ValidationError, fields, validate

__all__ = [
    "CLASSIFICATIONS", "CLEARANCES", "Canonical", "ENVELOPE_CLASSIFICATION", "EVENTS", "EVENT_ID", "LIMITED",
    "MODELS", "NONE", "PHI", "PartialDate", "Timestamp", "UnknownSchema", "age_band", "classification",
    "compatible", "latest_version", "leaves", "load_event", "model_for", "schema_for",
    "versions", "visible_to", "walk", "zip3",
]

PHI, LIMITED, NONE = "phi", "limited", "none"
CLASSIFICATIONS = (PHI, LIMITED, NONE)
# Destination clearance -> the classifications it may receive.
CLEARANCES = {"phi": frozenset(CLASSIFICATIONS), "limited": frozenset({LIMITED, NONE}),
              "deidentified": frozenset({NONE})}
# The envelope around `data`: occurred_at is a date of care like any other.
ENVELOPE_CLASSIFICATION = {"type": NONE, "id": NONE, "version": NONE, "occurred_at": LIMITED}
# Event ids as the ingest envelope accepts them (courier.app.ingest._SAFE_ID; a test keeps the two in step).
EVENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,255}\Z")


def visible_to(level: str, clearance: str) -> bool:
    """Whether a field of this classification may go to a destination with this clearance."""
    return level in CLEARANCES[clearance]


# --------------------------------------------------------------------------- field types

_TIMESTAMP = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2})(?::(\d{2})(?::(\d{2})(?:\.\d{1,6})?)?)?"
                        r"(?:Z|[+-](\d{2}):(\d{2}))?)?)?)?\Z")
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?\Z")


def _real(match: re.Match) -> bool:
    """Whether the numbers of a matched timestamp name a real calendar instant."""
    y, mo, d, h, mi, s, oh, om = (list(match.groups()) + [None] * 8)[:8]
    try:
        date(int(y), int(mo or 1), int(d or 1))
    except ValueError:
        return False
    return int(h or 0) < 24 and int(mi or 0) < 60 and int(s or 0) < 60 and int(oh or 0) <= 14 and int(om or 0) < 60


class Timestamp(fields.String):
    """ISO 8601 date-time kept at the precision the source had ('2019', '2019-11-22',
    '2019-11-22T10:30+02:00'): padding a date to midnight would invent a time, and a
    source without an offset gets none invented either."""

    default_error_messages = {"invalid_timestamp": "Not an ISO 8601 date-time (YYYY[-MM[-DD[Thh[:mm[:ss[.f]]]"
                                                   "[Z|+hh:mm]]]])."}
    pattern = _TIMESTAMP

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        match = self.pattern.match(text)
        if match is None or not _real(match):
            raise self.make_error("invalid_timestamp")
        return text


class PartialDate(Timestamp):
    """ISO 8601 calendar date at the source's precision ('1962', '1962-03', '1962-03-20')."""

    default_error_messages = {"invalid_timestamp": "Not an ISO 8601 date (YYYY[-MM[-DD]])."}
    pattern = _DATE


def _meta(level: str, pseudonymise: str | None = None) -> dict:
    if level not in CLASSIFICATIONS:  # a schema definition error; an assert would vanish under python -O
        raise ValueError(f"unknown classification {level!r}")
    return {"classification": level, **({"pseudonymise": pseudonymise} if pseudonymise else {})}


def text(level: str, *, pseudonymise: str | None = None, **kwargs) -> fields.String:
    """A string leaf; `pseudonymise` names the namespace of a join key (see the module docstring)."""
    return fields.String(metadata=_meta(level, pseudonymise), **kwargs)


def coded(**kwargs) -> fields.String:
    """A coded value (table code, status, type): never identifying."""
    return fields.String(metadata=_meta(NONE), validate=validate.Length(min=1), **kwargs)


def when(level: str = LIMITED, **kwargs) -> Timestamp:
    return Timestamp(metadata=_meta(level), **kwargs)


def decimal(level: str = NONE, **kwargs) -> fields.Decimal:
    # As a string in JSON: amounts must not pass through binary floating point.
    return fields.Decimal(as_string=True, allow_nan=False, metadata=_meta(level), **kwargs)


def texts(level: str, **kwargs) -> fields.List:
    return fields.List(fields.String(metadata=_meta(level)), metadata=_meta(level), **kwargs)


def one(schema: type[Schema], **kwargs) -> fields.Nested:
    return fields.Nested(schema, **kwargs)


def many(schema: type[Schema], **kwargs) -> fields.List:
    return fields.List(fields.Nested(schema), **kwargs)


class Canonical(Schema):
    """Base of every canonical schema: unknown keys are errors, never silently dropped."""

    class Meta:
        unknown = RAISE


# --------------------------------------------------------------------------- models, version 1
# Each class is a published, frozen version: a change is a new class (FooV2), registered
# under a new version, never an edit of this one.

class CodingV1(Canonical):
    """A coded concept (HL7 CWE/CNE): the code, its display text and its coding system."""
    code = coded(required=True)
    display = text(NONE)      # the code's name in its system; free text belongs in notes
    system = text(NONE)


class MoneyV1(Canonical):
    amount = decimal(NONE, required=True)
    currency = text(NONE, validate=validate.Length(min=1, max=8))


class IdentifierV1(Canonical):
    """A patient's identifier (MRN, SSN, national id...) with its type and assigning authority."""
    value = text(PHI, required=True, validate=validate.Length(min=1))
    type = text(NONE)         # HL7 table 0203: MR, SS, PI, ...
    authority = text(NONE)


class PersonNameV1(Canonical):
    family = text(PHI)
    given = text(PHI)
    middle = text(PHI)
    prefix = text(PHI)
    suffix = text(PHI)
    type = text(NONE)         # HL7 table 0200: L legal, D display, ...


class AddressV1(Canonical):
    lines = texts(PHI)
    city = text(PHI)
    state = text(LIMITED)
    postal_code = text(PHI)
    country = text(LIMITED)
    type = text(NONE)


class TelecomV1(Canonical):
    value = text(PHI, required=True)
    use = text(NONE)          # HL7 table 0201: PRN home, WPN work, ...
    equipment = text(NONE)    # HL7 table 0202: PH, CP, Internet, ...


class PatientRefV1(Canonical):
    """Who a message is about. `id` is the MR-type identifier when there is one."""
    id = text(PHI, pseudonymise="patient", required=True, validate=validate.Length(min=1))
    id_type = text(NONE)
    identifiers = many(IdentifierV1, required=True, validate=validate.Length(min=1))
    names = many(PersonNameV1)
    birth_date = PartialDate(metadata=_meta(PHI))
    sex = text(LIMITED)
    addresses = many(AddressV1)
    telecoms = many(TelecomV1)
    # Coarsened for limited destinations (see age_band() and zip3()).
    age_band = text(LIMITED)
    zip3 = text(LIMITED)


class ProviderV1(Canonical):
    """A clinician. Not the patient's identity, but a person: names are limited."""
    id = text(NONE)           # NPI or local number
    id_type = text(NONE)
    authority = text(NONE)
    family_name = text(LIMITED)
    given_name = text(LIMITED)


class DepartmentV1(Canonical):
    code = text(LIMITED, required=True, validate=validate.Length(min=1))
    name = text(LIMITED)
    facility = text(NONE)


class CostCentreV1(Canonical):
    code = text(NONE, required=True, validate=validate.Length(min=1))
    name = text(NONE)
    gl_account = text(NONE)


class LocationV1(Canonical):
    """Where a patient is or an appointment takes place (HL7 PL)."""
    point_of_care = text(LIMITED)   # nursing unit, clinic: the department
    room = text(LIMITED)
    bed = text(LIMITED)
    facility = text(NONE)
    description = text(LIMITED)


class VisitV1(Canonical):
    """An encounter (HL7 PV1)."""
    number = text(PHI, pseudonymise="visit")  # visit/account number: LDS-excluded like an MRN
    patient_class = coded()          # HL7 table 0004: I, O, E, P, ...
    admission_type = coded()
    hospital_service = coded()
    admit_source = text(NONE)
    location = one(LocationV1)
    attending = many(ProviderV1)
    referring = many(ProviderV1)
    admitting = many(ProviderV1)
    admitted_at = when()
    discharged_at = when()
    discharge_disposition = text(NONE)


class OrderRefV1(Canonical):
    placer_number = text(LIMITED, pseudonymise="order.placer")
    filler_number = text(LIMITED, pseudonymise="order.filler")
    placer_group_number = text(LIMITED, pseudonymise="order.group")


class ServiceV1(Canonical):
    """A billable or clinical service: what was done, coded."""
    code = one(CodingV1, required=True)
    description = text(PHI)         # free text as typed, unlike code.display
    department = one(DepartmentV1)
    cost_centre = one(CostCentreV1)


class SupplierV1(Canonical):
    id = text(NONE, required=True, validate=validate.Length(min=1))
    name = text(NONE)


class ItemV1(Canonical):
    """A stock item: catalogue data, nothing about a patient."""
    sku = text(NONE, required=True, validate=validate.Length(min=1))
    description = text(NONE)        # catalogue text, not typed at the bedside
    unit = text(NONE)
    supplier = one(SupplierV1)


class ChargeV1(Canonical):
    """One financial transaction on a patient account (HL7 FT1)."""
    line = fields.Integer(required=True, validate=validate.Range(min=1), metadata=_meta(NONE))
    set_id = text(NONE)
    transaction_id = text(LIMITED, pseudonymise="transaction")
    batch_id = text(NONE)
    type = coded(required=True)      # HL7 table 0017: CG charge, CD credit, PY payment, AJ adjustment
    code = one(CodingV1, required=True)
    description = text(PHI)
    service_date = when()
    service_end = when()
    posted_at = when()
    quantity = decimal(NONE)
    amount = one(MoneyV1)           # extended amount (quantity x unit price)
    unit_price = one(MoneyV1)
    department = one(DepartmentV1)
    cost_centre = one(CostCentreV1)
    diagnoses = many(CodingV1)
    performed_by = many(ProviderV1)
    ordered_by = many(ProviderV1)
    procedure = one(CodingV1)
    procedure_modifiers = many(CodingV1)


class InvoiceLineV1(Canonical):
    description = text(PHI)
    item = one(ItemV1)
    charge_transaction_id = text(LIMITED, pseudonymise="transaction")
    quantity = decimal(NONE)
    unit_price = one(MoneyV1)
    amount = one(MoneyV1, required=True)


class InvoiceV1(Canonical):
    """A bill: to a payer or patient (with patient), or from a supplier (with supplier)."""
    number = text(LIMITED, pseudonymise="invoice", required=True, validate=validate.Length(min=1))
    issued_on = when()
    due_on = when()
    supplier = one(SupplierV1)
    patient = one(PatientRefV1)
    account_number = text(PHI, pseudonymise="account")
    total = one(MoneyV1, required=True)
    lines = many(InvoiceLineV1)


class PayerV1(Canonical):
    id = text(NONE, required=True, validate=validate.Length(min=1))
    name = text(NONE)


class ObservationV1(Canonical):
    """One result (HL7 OBX); values are rendered as text, repetitions kept apart. The code
    is optional: text reports send their lines as OBX without one."""
    code = one(CodingV1)
    value_type = coded()
    values = texts(PHI)             # may be free text (TX, FT): treated as such
    units = text(NONE)
    status = coded()
    observed_at = when()


class AppointmentV1(Canonical):
    placer_id = text(LIMITED, pseudonymise="appointment.placer")
    filler_id = text(LIMITED, pseudonymise="appointment.filler")
    start = when()
    end = when()
    event_reason = one(CodingV1)
    reason = one(CodingV1)
    type = one(CodingV1)
    status = text(NONE)


class ScheduledServiceV1(Canonical):
    code = one(CodingV1, required=True)
    start = when()
    status = text(NONE)


class ScheduledProviderV1(Canonical):
    provider = one(ProviderV1, required=True)
    role = one(CodingV1)


# --------------------------------------------------------------------------- events, version 1
# Each is the schema of an event's `data`.

class PatientAdmittedV1(Canonical):
    """ADT A01 (kind 'admission') and A04 (kind 'registration': an outpatient or emergency
    visit begins without an inpatient admission)."""
    kind = fields.String(required=True, validate=validate.OneOf(["admission", "registration"]),
                         metadata=_meta(NONE))
    patient = one(PatientRefV1, required=True)
    visit = one(VisitV1, required=True)


class PatientDischargedV1(Canonical):
    patient = one(PatientRefV1, required=True)
    visit = one(VisitV1, required=True)


class PatientUpdatedV1(Canonical):
    """Demographics or visit data changed (ADT A08): the full current picture, not a diff."""
    patient = one(PatientRefV1, required=True)
    visit = one(VisitV1)


class ChargePostedV1(Canonical):
    charge = one(ChargeV1, required=True)
    patient = one(PatientRefV1, required=True)
    visit = one(VisitV1)


class ChargePostedV2(ChargePostedV1):
    """v1 plus the invoice the charge was billed on, once billing knows it (compatible)."""
    invoice_number = text(LIMITED, pseudonymise="invoice")


class ServiceCompletedV1(Canonical):
    """A service was performed: for HL7, a result (ORU R01 OBR group) was reported."""
    service = one(ServiceV1, required=True)
    status = coded()                 # HL7 table 0123 result status: F final, P preliminary, C corrected
    performed_at = when()
    reported_at = when()
    order = one(OrderRefV1)
    ordered_by = many(ProviderV1)
    performed_by = many(ProviderV1)
    patient = one(PatientRefV1)
    visit = one(VisitV1)
    observations = many(ObservationV1)
    notes = texts(PHI)


class OrderChangedV1(Canonical):
    """An order was placed, changed, cancelled, held or released (HL7 ORM O01, one per ORC).

    Not one of the first event types: ORM carries cancels and changes as well as new
    orders, so 'order.placed' would misname half of them; `action` says which, as
    schedule.changed does for appointments, and `control` keeps ORC-1 as sent.
    """
    action = fields.String(required=True, metadata=_meta(NONE), validate=validate.OneOf(
        ["placed", "modified", "cancelled", "held", "released", "status_changed"]))
    control = coded(required=True)
    order = one(OrderRefV1, required=True)
    status = coded()
    service = one(ServiceV1)
    ordered_at = when()
    ordered_by = many(ProviderV1)
    patient = one(PatientRefV1)
    visit = one(VisitV1)
    notes = texts(PHI)


class SupplyConsumedV1(Canonical):
    item = one(ItemV1, required=True)
    quantity = decimal(NONE, required=True)
    unit = text(NONE)
    consumed_at = when()
    department = one(DepartmentV1)
    cost_centre = one(CostCentreV1)
    lot_number = text(LIMITED)
    serial_number = text(PHI)       # a device serial identifies its (implant) patient
    patient = one(PatientRefV1)
    visit = one(VisitV1)


class ClaimStatusChangedV1(Canonical):
    claim_id = text(LIMITED, pseudonymise="claim", required=True, validate=validate.Length(min=1))
    status = coded(required=True)
    previous_status = coded()
    changed_at = when()
    payer = one(PayerV1)
    invoice_number = text(LIMITED, pseudonymise="invoice")
    billed = one(MoneyV1)
    paid = one(MoneyV1)
    reason = one(CodingV1)          # e.g. a claim adjustment reason code
    patient = one(PatientRefV1)
    notes = texts(PHI)


class ScheduleChangedV1(Canonical):
    """An appointment was booked, changed or cancelled (HL7 SIU)."""
    action = fields.String(required=True, metadata=_meta(NONE), validate=validate.OneOf(
        ["booked", "rescheduled", "modified", "cancelled", "discontinued", "deleted", "no_show"]))
    appointment = one(AppointmentV1, required=True)
    patient = one(PatientRefV1)
    visit = one(VisitV1)
    services = many(ScheduledServiceV1)
    locations = many(LocationV1)
    providers = many(ScheduledProviderV1)
    equipment = many(CodingV1)
    notes = texts(PHI)


# --------------------------------------------------------------------------- registries

MODELS: dict[tuple[str, int], type[Schema]] = {
    ("coding", 1): CodingV1, ("money", 1): MoneyV1, ("identifier", 1): IdentifierV1,
    ("person_name", 1): PersonNameV1, ("address", 1): AddressV1, ("telecom", 1): TelecomV1,
    ("patient", 1): PatientRefV1, ("provider", 1): ProviderV1, ("department", 1): DepartmentV1,
    ("cost_centre", 1): CostCentreV1, ("location", 1): LocationV1, ("visit", 1): VisitV1,
    ("order", 1): OrderRefV1, ("service", 1): ServiceV1, ("supplier", 1): SupplierV1,
    ("item", 1): ItemV1, ("charge", 1): ChargeV1, ("invoice_line", 1): InvoiceLineV1,
    ("invoice", 1): InvoiceV1, ("payer", 1): PayerV1, ("observation", 1): ObservationV1,
    ("appointment", 1): AppointmentV1,
}

EVENTS: dict[tuple[str, int], type[Schema]] = {
    ("patient.admitted", 1): PatientAdmittedV1,
    ("patient.discharged", 1): PatientDischargedV1,
    ("patient.updated", 1): PatientUpdatedV1,
    ("charge.posted", 1): ChargePostedV1,
    ("charge.posted", 2): ChargePostedV2,
    ("service.completed", 1): ServiceCompletedV1,
    ("order.changed", 1): OrderChangedV1,
    ("supply.consumed", 1): SupplyConsumedV1,
    ("claim.status_changed", 1): ClaimStatusChangedV1,
    ("schedule.changed", 1): ScheduleChangedV1,
}


class UnknownSchema(LookupError):
    """No canonical schema of that name (event type or model) and version."""


def versions(event_type: str) -> list[int]:
    return sorted(v for t, v in EVENTS if t == event_type)


def latest_version(event_type: str) -> int:
    known = versions(event_type)
    if not known:
        raise UnknownSchema(f"no canonical event type {event_type!r}")
    return known[-1]


def schema_for(event_type: str, version: int | None = 1) -> type[Schema]:
    """The schema class of `data` for this event type and version (None means 1)."""
    version = 1 if version is None else version
    try:
        return EVENTS[(event_type, version)]
    except KeyError:
        known = versions(event_type)
        if not known:
            raise UnknownSchema(f"no canonical event type {event_type!r}") from None
        raise UnknownSchema(f"no version {version!r} of {event_type!r} (known: "
                           f"{', '.join(map(str, known))})") from None


def model_for(name: str, version: int = 1) -> type[Schema]:
    try:
        return MODELS[(name, version)]
    except KeyError:
        raise UnknownSchema(f"no canonical model {name!r} version {version!r}") from None


@lru_cache(maxsize=None)
def _instance(cls: type[Schema]) -> Schema:
    return cls()  # schemas are stateless once built: one instance each serves every load


def load_event(event_type: str, version: int | None, data: Any) -> dict:
    """Validate and deserialize an event's data; ValidationError whose messages map
    dotted field paths ('charge.amount.amount', 'patient.names[1].family') to errors."""
    try:
        schema = _instance(schema_for(event_type, version))
    except UnknownSchema as exc:
        key = "version" if versions(event_type) else "type"
        raise ValidationError({key: [str(exc)]}) from None
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValidationError(_flatten(exc.messages)) from None


def _flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    if not isinstance(messages, dict):
        return {prefix or "_schema": list(messages) if isinstance(messages, list) else [str(messages)]}
    out: dict[str, list[str]] = {}
    for key, value in messages.items():
        if isinstance(key, int):
            path = f"{prefix}[{key}]"
        elif key == "_schema":
            path = prefix or "_schema"
        else:
            path = f"{prefix}.{key}" if prefix else str(key)
        for sub, errors in _flatten(value, path).items():
            out.setdefault(sub, []).extend(errors)
    return out


# --------------------------------------------------------------------------- classification

def classification(field: fields.Field) -> str | None:
    """A leaf field's classification, or None if it has none (a bug the tests catch)."""
    level = field.metadata.get("classification")
    return level if level in CLASSIFICATIONS else None


def leaves(schema: type[Schema] | Schema, prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """Every leaf of a schema as (path pattern, classification), lists shown as '[]':
    what a configuration check or a test inspects without a document at hand."""
    schema = schema() if isinstance(schema, type) else schema
    for name, field in schema.fields.items():
        yield from _field_leaves(field, f"{prefix}.{name}" if prefix else name)


def _field_leaves(field: fields.Field, path: str) -> Iterator[tuple[str, str | None]]:
    if isinstance(field, fields.Nested):
        yield from leaves(field.schema, f"{path}[]" if field.many else path)
    elif isinstance(field, fields.List) and isinstance(field.inner, (fields.Nested, fields.List)):
        yield from _field_leaves(field.inner, f"{path}[]")
    elif isinstance(field, fields.List):
        inner = classification(field.inner)
        level = classification(field)
        # A list of plain values is one leaf; its inner field may not say otherwise.
        yield f"{path}[]", level if inner in (None, level) else None
    else:
        yield path, classification(field)


def walk(schema: type[Schema] | Schema, document: dict, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every leaf of a (loaded or serialized) document as (path, classification, value),
    e.g. ('patient.names[1].family', 'phi', 'Josh'), list items one by one.

    Fails closed: a key the schema does not know or a leaf without a classification
    raises ValueError instead of letting an unclassified value through.
    """
    schema = schema() if isinstance(schema, type) else schema
    if not isinstance(document, dict):
        raise ValueError(f"{prefix or 'document'}: expected an object, got {type(document).__name__}")
    for key, value in document.items():
        path = f"{prefix}.{key}" if prefix else key
        field = schema.fields.get(key)
        if field is None:
            raise ValueError(f"{path}: not a field of {type(schema).__name__}")
        yield from _walk_field(field, value, path)


def _walk_field(field: fields.Field, value: Any, path: str, level: str | None = None) -> Iterator[tuple[str, str, Any]]:
    if isinstance(field, fields.Nested):
        if value is None:
            return
        if field.many:
            for index, item in enumerate(_as_list(value, path)):
                yield from walk(field.schema, item, f"{path}[{index}]")
        else:
            yield from walk(field.schema, value, path)
    elif isinstance(field, fields.List):
        if value is None:
            return
        inner = field.inner
        plain = not isinstance(inner, (fields.Nested, fields.List))
        for index, item in enumerate(_as_list(value, path)):
            yield from _walk_field(inner, item, f"{path}[{index}]", classification(field) if plain else None)
    else:
        found = level or classification(field)
        if found is None:
            raise ValueError(f"{path}: field has no classification")
        yield path, found, value


def _as_list(value: Any, path: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
    return list(value)


# Safe Harbor: the 3-digit zip areas of 20,000 people or fewer (2010 census, per HHS
# de-identification guidance) must be shown as 000.
_SMALL_ZIP3 = frozenset({"036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830",
                         "831", "878", "879", "884", "890", "893"})
_US_ZIP = re.compile(r"(\d{3})\d{2}(?:-?\d{4})?\Z")


def zip3(postal_code: str | None, country: str | None = None) -> str | None:
    """First three digits of a US zip code ('000' for the small areas Safe Harbor names);
    None for anything else (other countries' codes do not coarsen the same way)."""
    if not postal_code or (country or "US").strip().upper() not in ("US", "USA", "840"):
        return None
    match = _US_ZIP.match(postal_code.strip())
    if match is None:
        return None
    return "000" if match.group(1) in _SMALL_ZIP3 else match.group(1)


def age_band(birth_date: str | None, on: str | None) -> str | None:
    """Age on a date as a ten-year band ('40-49'), '90+' from 90 (Safe Harbor lumps those
    together); None unless both are full ISO dates (or date-times) and the age is >= 0."""
    if not birth_date or not on:
        return None
    try:
        born, then = date.fromisoformat(birth_date[:10]), date.fromisoformat(on[:10])
    except ValueError:
        return None
    age = then.year - born.year - ((then.month, then.day) < (born.month, born.day))
    if age < 0:
        return None
    if age >= 90:
        return "90+"
    low = age // 10 * 10
    return f"{low}-{low + 9}"


# --------------------------------------------------------------------------- compatibility

def registry_problems() -> list[str]:
    """Each registered event version that is not a compatible change of the version before it,
    with why; the config check refuses to start on any (senders of either version must keep working)."""
    problems = []
    for (event_type, version), schema in sorted(EVENTS.items()):
        previous = EVENTS.get((event_type, version - 1))
        if previous is not None:
            problems += [f"canonical event {event_type} version {version} is not a compatible change of version "
                         f"{version - 1}: {problem}" for problem in compatible(previous, schema)]
    return problems


def compatible(old: type[Schema] | Schema, new: type[Schema] | Schema) -> list[str]:
    """Why `new` is not a compatible change of `old` ([] if it is): only added optional
    fields are compatible; each problem names the field path."""
    old = old() if isinstance(old, type) else old
    new = new() if isinstance(new, type) else new
    return list(_schema_problems(old, new, ""))


def _schema_problems(old: Schema, new: Schema, prefix: str) -> Iterator[str]:
    for name, old_field in old.fields.items():
        path = f"{prefix}.{name}" if prefix else name
        new_field = new.fields.get(name)
        if new_field is None:
            yield f"{path}: removed (or renamed): consumers of the old version rely on it"
        else:
            yield from _field_problems(old_field, new_field, path)
    for name, new_field in new.fields.items():
        if name not in old.fields and new_field.required:
            path = f"{prefix}.{name}" if prefix else name
            yield f"{path}: added as required: documents of the old version lack it"


def _field_problems(old: fields.Field, new: fields.Field, path: str) -> Iterator[str]:
    if type(old) is not type(new):
        yield f"{path}: type changed from {type(old).__name__} to {type(new).__name__}"
        return
    if new.required and not old.required:
        yield f"{path}: became required"
    if old.allow_none and not new.allow_none:
        yield f"{path}: no longer accepts null"
    if classification(old) != classification(new):
        yield f"{path}: classification changed from {classification(old)} to {classification(new)}"
    # Widening counts too: an old consumer cannot handle a value it never saw.
    if _validators(old) != _validators(new):
        yield f"{path}: validation changed from {_validators(old)} to {_validators(new)}"
    if isinstance(old, fields.Decimal) and (old.places, old.as_string) != (new.places, new.as_string):
        yield f"{path}: decimal representation changed"
    if isinstance(old, fields.Nested):
        if old.many != new.many:
            yield f"{path}: changed between one object and a list"
        else:
            yield from _schema_problems(old.schema, new.schema, f"{path}[]" if old.many else path)
    elif isinstance(old, fields.List):
        yield from _field_problems(old.inner, new.inner, f"{path}[]")


def _validators(field: fields.Field) -> list[str]:
    return [repr(v) for v in field.validators]
