"""Transforms and data governance (issue 7, points 3 and 4, and the config check of point 5).

The governance proof: every mapped corpus message (tests/data/hl7, selected as in
test_canonical.py) and every example event (examples/events/) goes through every
canonical transform at every clearance, and no value of a field classified above the
clearance (canonical.walk) may occur in the output: as written, JSON-escaped, HL7-escaped,
CSV-quoted or as an HL7 date, case-insensitively, line by line for free text, for values of
at least 3 characters. A hypothesis test does the same for random charges. Then each
transform's output is parsed back (courier.app.hl7.er7, csv; the SQL adapter into PostgreSQL in
tests/integration/test_transforms.py), and each refusal of the configuration check is shown
with its message.
"""
from __future__ import annotations

import csv
import io
import json
import re
import textwrap
from datetime import date
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from courier.app.domain import canonical, governance, transforms
from courier.app.hl7 import to_canonical
from courier.app.domain.canonical import walk
from courier.app.hl7.er7 import parse, parse_all
from courier.app.settings import ConfigError
from courier.app.config import load_routing, load_settings, settings_from_config
from courier.app.domain.transforms import Envelope, TransformError
from tests.unit.test_canonical import (BATCH_MAPPING_REFUSED, BATCHES, EXPECTED_EVENT, EXTRA_SIU, MAPPING_REFUSED, VALID,
                                  dft_text, ft1, hl7_escape, read)
from tests.unit.test_hl7v2 import VALID_BUT_REFUSED

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "events").glob("*.json"))
KEY = "test-pseudonym-key-0123456789abcdefghij"
OTHER_KEY = "another-pseudonym-key-9876543210zyxwvuts"
CLEARANCES = ("phi", "limited", "deidentified")
CANONICAL = sorted(n for n, t in transforms.REGISTRY.items() if transforms.spec_of(t).canonical)
HL7_CONTENT = "application/hl7-v2; charset=utf-8"


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv(governance.KEY_VARIABLE, KEY)


def envelope(body: bytes, content_type: str, message_type: str, clearance: str = "phi",
             destination: str = "billing", message_id: str = "0f6c1d2e-msg") -> Envelope:
    return Envelope(message_id, "lab", message_type, content_type, body, destination, clearance)


def json_envelope(event: dict, clearance: str = "phi", **kwargs) -> Envelope:
    return envelope(json.dumps(event).encode(), "application/json", event["type"], clearance, **kwargs)


def hl7_envelope(text: str, clearance: str = "phi", **kwargs) -> Envelope:
    [message] = parse_all(text.encode("utf-8"))
    return envelope(message.text.encode("utf-8"), HL7_CONTENT, message.message_type, clearance, **kwargs)


def example(name: str) -> dict:
    return json.loads((REPO / "examples" / "events" / f"{name}.json").read_text(encoding="utf-8"))


# --- the messages of the proof -----------------------------------------------------------

def corpus_messages() -> list:
    """Every corpus message that from_hl7 maps (valid files and batch members)."""
    out = []
    for param in [*VALID, *BATCHES]:
        row = param.values[0]
        if row["file"] in VALID_BUT_REFUSED or row["file"] in MAPPING_REFUSED:
            continue
        refused = BATCH_MAPPING_REFUSED.get(row["file"], {})
        for number, message in enumerate(parse_all(read(row["file"])), 1):
            if number not in refused and message.message_type.removeprefix("HL7v2:") in to_canonical.MAPPINGS:
                out.append(pytest.param(message, id=f"{row['file']}#{number}"))
    return out


CORPUS = corpus_messages()
STORED = [*[pytest.param(envelope(p.values[0].text.encode("utf-8"), HL7_CONTENT, p.values[0].message_type),
                         id=p.id) for p in CORPUS],
          *[pytest.param(json_envelope(json.loads(path.read_text(encoding="utf-8"))), id=path.name)
            for path in EXAMPLES]]


# --- the leak check ----------------------------------------------------------------------

MIN_NEEDLE = 3  # shorter values ('M', 'CG', '1') occur everywhere by chance
# Text that output formats contain whatever the data: keys, column names, HL7 constants.
VOCABULARY = ({name for _, schema in [*canonical.EVENTS.items(), *canonical.MODELS.items()]
               for name in schema().fields} | set(transforms.LEDGER_COLUMNS) | set(canonical.ENVELOPE_CLASSIFICATION)
              | {"events", "data", "COURIER", "DFT^P03^DFT_P03", "UNICODE UTF-8", "ANON", "billing", "MSH", "EVN",
                 "PID", "PV1", "FT1", "P03", "2.5", "charset"})


def leaves_of(event: dict) -> list[tuple[str, str, str]]:
    """(path, classification, text) of every leaf of a canonical envelope, envelope fields included."""
    out = [(k, canonical.ENVELOPE_CLASSIFICATION[k], str(v)) for k, v in event.items() if k != "data"]
    schema = canonical.schema_for(event["type"], event["version"])
    return out + [(path, level, str(value)) for path, level, value in walk(schema, event["data"])]


def written_forms(value: str) -> set[str]:
    """The ways an output format may write a value, and each line of it: as is, JSON (UTF-8 or
    \\u escapes), HL7-escaped, CSV-quoted; dates also as HL7 dates."""
    forms = set()
    for piece in {value, *value.split("\n")}:
        forms |= {piece, json.dumps(piece, ensure_ascii=False)[1:-1], json.dumps(piece)[1:-1], hl7_escape(piece),
                  transforms._hl7_text(piece), piece.replace('"', '""')}
    if re.fullmatch(r"\d{4}(-\d{2}(-\d{2}(T[\d:.]+([+-]\d{2}:\d{2}|Z)?)?)?)?", value):
        forms.add(transforms._dtm(value))
    return {f.strip().lower() for f in forms if len(f.strip()) >= MIN_NEEDLE}


def leaks(events: list[dict], clearance: str, body: bytes, extra_visible: tuple[str, ...] = ()) -> tuple[list, int]:
    """(leaked (path, form) pairs, number of forms checked) of `events`' fields above `clearance` in `body`.

    Pseudonyms are blanked first (they are HMACs, proven apart), and so is every written form
    of every value the destination may see: a birth date equal to the visible date of service,
    or a note 'RAD|' next to a visible department 'RAD' and a field separator, is no leak,
    while a name inside free text stays findable beside a visible 'Smithfield Clinic'. Forms
    that are part of the format's own words (keys, column names) are not checked."""
    text = governance.PSEUDONYM.sub("psn:*", body.decode("utf-8")).lower()
    hidden, visible = [], {v.lower() for v in extra_visible}
    for event in events:
        for path, level, value in leaves_of(event):
            if canonical.visible_to(level, clearance):
                visible |= written_forms(value)
            else:
                hidden.append((f"{event.get('id')}:{path}", value))
    for form in sorted(visible, key=len, reverse=True):
        if len(form) > MIN_NEEDLE:  # 'MED' (a service code) must not hide 'premedicated' in a note
            text = text.replace(form, "\x00")
    vocabulary = [v.lower() for v in VOCABULARY]
    found, checked = [], 0
    for where, value in hidden:
        for form in written_forms(value):
            if any(form in v for v in vocabulary):
                continue
            checked += 1
            if form in text:
                found.append((where, form))
    return found, checked


def run_everywhere(stored: Envelope) -> dict:
    """Every canonical transform at every clearance on one stored message: what leaked and
    what was refused. The canonical events are the truth the output is checked against."""
    events = transforms.canonical_events(stored)
    report = {"leaks": [], "checked": 0, "formatted": 0, "refused": []}
    for name in CANONICAL:
        transform = transforms.REGISTRY[name]
        accepts = transforms.spec_of(transform).accepts
        for clearance in CLEARANCES:
            target = Envelope(**{**stored.__dict__, "clearance": clearance})
            if accepts and {e["type"] for e in events} - accepts or (name == "sql_row" and len(events) > 1):
                with pytest.raises(TransformError):
                    transform(target)
                report["refused"].append((name, clearance))
                continue
            body, _ = transform(target)
            report["formatted"] += 1
            found, checked = leaks(events, clearance, body, (stored.destination, transforms.control_id(target)))
            report["leaks"] += [(name, clearance, *leak) for leak in found]
            report["checked"] += checked
    return report


@pytest.mark.parametrize("stored", STORED)
def test_no_field_above_clearance_reaches_any_destination(stored):
    report = run_everywhere(stored)
    assert report["leaks"] == []
    assert report["formatted"] >= 3  # canonical_json at least, at each clearance
    assert report["checked"] > 0, "nothing was hidden: the proof proved nothing here"


def test_the_proof_covers_every_mapped_type_and_every_event_type():
    assert len(CORPUS) >= 40
    assert {p.values[0].message_type.removeprefix("HL7v2:") for p in CORPUS} >= set(EXPECTED_EVENT) | set(EXTRA_SIU)
    types = {json.loads(p.read_text())["type"] for p in EXAMPLES}
    assert types == {t for t, _ in canonical.EVENTS}
    assert all(len([p for p in EXAMPLES if json.loads(p.read_text())["type"] == t]) >= 2 for t in types)
    assert {(json.loads(p.read_text())["type"], json.loads(p.read_text())["version"]) for p in EXAMPLES} \
        >= set(canonical.EVENTS)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_events_are_canonical_and_full_of_phi(path):
    event = json.loads(path.read_text(encoding="utf-8"))
    canonical.load_event(event["type"], event["version"], event["data"])
    levels = {level for _, level, _ in leaves_of(event)}
    assert levels == set(canonical.CLASSIFICATIONS) or event["id"] == "stock-issue-5512"  # stock: no patient


def test_the_leak_check_catches_a_transform_that_leaks():
    """passthrough sends the raw message: at deidentified the check must find the patient in it."""
    stored = json_envelope(example("charge.posted-ct-scan"), "deidentified")
    events = transforms.canonical_events(stored)
    body, _ = transforms.passthrough(stored)
    found, _ = leaks(events, "deidentified", body)
    leaked = {where.split(":", 1)[1] for where, _ in found}
    assert {"patient.id", "patient.names[0].family", "charge.description", "occurred_at",
            "charge.service_date"} <= leaked
    # In HL7 form too: a DFT of the raw event (as if minimisation were skipped) leaks names and dates.
    raw_dft, _ = transforms.hl7_dft_p03.__wrapped__(events, stored)
    leaked = {where.split(":", 1)[1] for where, _ in leaks(events, "deidentified", raw_dft)[0]}
    assert {"patient.names[0].family", "patient.birth_date", "charge.description", "visit.admitted_at"} <= leaked


def test_phi_destinations_get_every_value():
    """The other side of minimisation: at clearance phi canonical_json carries every leaf."""
    for path in EXAMPLES:
        event = json.loads(path.read_text(encoding="utf-8"))
        body, _ = transforms.canonical_json(json_envelope(event, "phi"))
        text = body.decode("utf-8")
        missing = [p for p, _, v in leaves_of(event) if json.dumps(v, ensure_ascii=False)[1:-1] not in text]
        assert missing == [], path.name


# --- random charges -----------------------------------------------------------------------

# Words of at least 5 letters (so a value cannot be part of the format itself), with the HL7
# delimiters, quotes, line breaks and non-ASCII letters that escaping must handle.
# Each word holds a non-ASCII letter, so it never occurs by chance in a format's own ASCII text (a
# family name "rsion" is inside the key "version": a leak report about nothing).
WORD = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzÅÉßøŁ"), min_size=5, max_size=9).filter(
    lambda w: any(c in "ÅÉßøŁ" for c in w))
PHI_TEXT = st.builds(lambda w, sep, rest: w + sep + rest, WORD, st.sampled_from(["", " ", "|", "^", "~", "&", "\\",
                                                                                   '"', "\n", ", "]),
                     st.one_of(st.just(""), WORD))
# Dates before today: an HL7 output's MSH-7 is the time it was made, and a random birth date
# equal to today would look like a leak there.
ISO_DAY = st.dates(min_value=date(1920, 1, 1), max_value=date(2019, 12, 31)).map(lambda d: d.isoformat())
CODE = st.from_regex(r"[A-Z0-9]{2,6}", fullmatch=True)


@st.composite
def charge_events(draw) -> dict:
    mrn = draw(WORD)
    patient = {"id": mrn, "id_type": "MR",
               "identifiers": [{"value": mrn, "type": "MR"},
                               *draw(st.lists(st.builds(lambda v: {"value": v, "type": "SS"}, WORD), max_size=2))],
               "names": draw(st.lists(st.fixed_dictionaries({"family": PHI_TEXT, "given": PHI_TEXT}), max_size=3)),
               "birth_date": draw(ISO_DAY),
               "addresses": draw(st.lists(st.fixed_dictionaries({"lines": st.lists(PHI_TEXT, min_size=1, max_size=2),
                                                                 "city": PHI_TEXT, "postal_code": WORD}), max_size=2)),
               "telecoms": draw(st.lists(st.fixed_dictionaries({"value": PHI_TEXT}), max_size=2))}
    charge = {"line": 1, "type": draw(st.sampled_from(["CG", "CD"])),
              "code": {"code": draw(CODE), "display": "Office visit"},
              "description": draw(PHI_TEXT), "transaction_id": draw(WORD), "service_date": draw(ISO_DAY),
              "amount": {"amount": str(draw(st.decimals(-9999, 9999, places=2))), "currency": "USD"},
              "department": {"code": draw(WORD), "name": draw(PHI_TEXT)},
              "cost_centre": {"code": draw(CODE), "gl_account": draw(CODE)},
              "performed_by": draw(st.lists(st.fixed_dictionaries({"family_name": PHI_TEXT}), max_size=2))}
    data = {"charge": charge, "patient": patient}
    if draw(st.booleans()):
        data["visit"] = {"number": draw(WORD), "admitted_at": draw(ISO_DAY) + "T10:30:00+01:00"}
    return {"type": "charge.posted", "version": 1, "id": "chg-" + draw(CODE), "occurred_at": "2024-02-01T10:00:00Z",
            "data": data}


@given(event=charge_events())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_random_charges_never_leak(event):
    canonical.load_event("charge.posted", 1, event["data"])
    report = run_everywhere(json_envelope(event))
    assert report["leaks"] == []
    assert report["checked"] > 0 and not report["refused"]


# --- pseudonyms ---------------------------------------------------------------------------

def pseudonymised_leaves(event: dict) -> list[tuple[str, str, str, str]]:
    """(path, classification, namespace, value) of every join key in an event."""
    schema = canonical.schema_for(event["type"], event["version"])
    out = []
    for path, level, value in walk(schema, event["data"]):
        field, node = None, schema()
        for part in re.sub(r"\[\d+\]", "", path).split("."):
            field = node.fields[part]
            inner = getattr(field, "inner", field)
            node = getattr(inner, "schema", None)
        if field.metadata.get("pseudonymise"):
            out.append((path, level, field.metadata["pseudonymise"], value))
    return out


def at(document, path: str):
    for part in re.findall(r"[^.\[\]]+", path):
        document = document[int(part)] if part.isdigit() else document[part]
    return document


def test_join_keys_are_marked_in_the_canonical_models():
    marked = {(re.sub(r"\[\d+\]", "[]", path), namespace) for p in EXAMPLES
              for path, _, namespace, _ in pseudonymised_leaves(json.loads(p.read_text(encoding="utf-8")))}
    assert marked == {
        ("patient.id", "patient"), ("visit.number", "visit"), ("charge.transaction_id", "transaction"),
        ("invoice_number", "invoice"), ("claim_id", "claim"), ("order.placer_number", "order.placer"),
        ("order.filler_number", "order.filler"), ("order.placer_group_number", "order.group"),
        ("appointment.placer_id", "appointment.placer"), ("appointment.filler_id", "appointment.filler")}


@pytest.mark.parametrize("clearance", ["limited", "deidentified"])
def test_pseudonyms_are_stable_keyed_and_the_same_for_every_destination(clearance, monkeypatch):
    for path in EXAMPLES:
        event = json.loads(path.read_text(encoding="utf-8"))
        first = json.loads(transforms.canonical_json(json_envelope(event, clearance))[0])["events"][0]
        again = json.loads(transforms.canonical_json(json_envelope(event, clearance, destination="erp"))[0])
        assert again["events"][0] == first
        for key_path, level, namespace, value in pseudonymised_leaves(event):
            expected = value if canonical.visible_to(level, clearance) else \
                governance.pseudonym(value, namespace, KEY.encode())
            assert at(first["data"], key_path) == expected, (path.name, key_path)
    event = example("charge.posted-v2-invoiced")
    patient_ref = governance.pseudonym("MRN-0091177", "patient", KEY.encode())
    # The CSV and SQL rows carry the same pseudonyms, so the ERP can join them with the JSON feed.
    row = json.loads(transforms.sql_row(json_envelope(event, clearance))[0])
    assert (row["patient_ref"], row["visit_ref"]) == (patient_ref, governance.pseudonym("ENC-77120934", "visit",
                                                                                         KEY.encode()))
    monkeypatch.setenv(governance.KEY_VARIABLE, OTHER_KEY)
    other = json.loads(transforms.sql_row(json_envelope(event, clearance))[0])["patient_ref"]
    assert other != patient_ref and governance.is_pseudonym(other)


def test_pseudonym_properties():
    key = KEY.encode()
    p = governance.pseudonym("12345", "patient", key)
    assert p == governance.pseudonym("12345", "patient", key) and re.fullmatch(r"psn:[a-z2-7]{24}", p)
    assert p != governance.pseudonym("12345", "visit", key)          # namespaces never join by accident
    assert p != governance.pseudonym("12346", "patient", key)
    assert p != governance.pseudonym("12345", "patient", OTHER_KEY.encode())
    assert "12345" not in p


def test_minimise_fails_closed():
    key = KEY.encode()
    event = {"type": "charge.posted", "id": "x", "occurred_at": "2024-01-01T00:00:00Z", "extra": "secret",
             "data": {"charge": {"line": 1, "type": "CG", "code": {"code": "A"}, "surprise": "Jane Roe",
                                 "quantity": {"nested": "Jane Roe"}},
                      "patient": {"id": "P1", "identifiers": [{"value": "P1", "type": "MR"}]},
                      "unknown": {"name": "Jane Roe"}}}
    out = governance.minimise(event, "limited", key)
    assert out == {"type": "charge.posted", "id": "x", "occurred_at": "2024-01-01T00:00:00Z",
                   "data": {"charge": {"line": 1, "type": "CG", "code": {"code": "A"}},
                            "patient": {"id": governance.pseudonym("P1", "patient", key)}}}
    # an unknown type or version: nothing of data is classified, so none of it goes below phi
    assert governance.minimise({**event, "type": "lab.result"}, "deidentified", key)["data"] == {}
    assert governance.minimise({**event, "version": 9}, "deidentified", key)["data"] == {}
    assert governance.minimise(event, "phi", None) == event and governance.minimise(event, "phi", None) is not event
    with pytest.raises(governance.MissingKey, match="COURIER_PSEUDONYM_KEY"):
        governance.minimise(event, "deidentified", None)
    with pytest.raises(ValueError):
        governance.minimise(event, "secret", key)


def test_a_missing_key_is_a_transform_error_not_a_leak(monkeypatch):
    monkeypatch.delenv(governance.KEY_VARIABLE)
    stored = json_envelope(example("charge.posted-credit"), "limited")
    with pytest.raises(TransformError, match="COURIER_PSEUDONYM_KEY is not set"):
        transforms.canonical_json(stored)
    assert transforms.canonical_json(json_envelope(example("charge.posted-credit"), "phi"))  # phi needs no key


# --- each transform's output -------------------------------------------------------------

def test_canonical_json_is_always_a_list_of_versioned_events():
    event = example("charge.posted-v2-invoiced")
    doc = json.loads(transforms.canonical_json(json_envelope(event))[0])
    assert doc == {"events": [event]}  # phi, already in canonical form: unchanged
    two = hl7_envelope(dft_text(ft1(1), ft1(2, description="Night call for Richard Roe")))
    doc = json.loads(transforms.canonical_json(two)[0])
    assert [(e["type"], e["version"], e["id"]) for e in doc["events"]] == [("charge.posted", 1, "CTRL2-1"),
                                                                          ("charge.posted", 1, "CTRL2-2")]
    # Amounts given as JSON numbers come out as canonical strings.
    numeric = {**example("supply.consumed-gauze"), "version": None}
    numeric["data"]["quantity"] = 12
    assert json.loads(transforms.canonical_json(json_envelope(numeric))[0])["events"][0]["data"]["quantity"] == "12"


def test_hl7_dft_p03_parses_back_to_the_same_charges():
    stored = json_envelope(example("charge.posted-ct-scan"))
    body, content_type = transforms.hl7_dft_p03(stored)
    assert content_type == HL7_CONTENT
    message = parse(body.decode("utf-8"))
    assert (message.message_type, message.version, message.control_id) == ("HL7v2:DFT^P03", "2.5",
                                                                         transforms.control_id(stored))
    [back] = to_canonical.to_canonical(message)
    original = example("charge.posted-ct-scan")["data"]
    # FT1 has no place for the cost centre, and FT1-13 (a code) none for the department's facility.
    expected = {k: v for k, v in original["charge"].items() if k != "cost_centre"}
    expected["department"] = {k: v for k, v in expected["department"].items() if k != "facility"}
    assert back["data"]["charge"] == expected
    assert back["data"]["visit"] == original["visit"]
    assert {k: v for k, v in back["data"]["patient"].items() if k != "age_band"} == \
        {k: v for k, v in original["patient"].items() if k != "age_band"}
    # The free text with every delimiter and a line break survived escaping.
    assert "|" in original["charge"]["description"] and "\n" in original["charge"]["description"]


def test_hl7_dft_p03_of_a_corpus_dft_keeps_one_ft1_per_charge():
    source = read("microsoft-FHIR-Converter/DFT-P03-01.hl7").decode("utf-8")
    stored = hl7_envelope(source)
    body, _ = transforms.hl7_dft_p03(stored)
    assert [c["data"]["charge"] for c in to_canonical.to_canonical(parse(body.decode()))] == \
        [c["data"]["charge"] for c in to_canonical.to_canonical(parse_all(source.encode())[0])]


def test_hl7_dft_p03_below_phi_names_the_patient_by_pseudonym_only():
    stored = json_envelope(example("charge.posted-ct-scan"), "deidentified")
    segments = {s.split("|")[0]: s for s in transforms.hl7_dft_p03(stored)[0].decode().split("\r") if s}
    pid = segments["PID"].split("|")
    pseudonym = governance.pseudonym("MRN-0048213", "patient", KEY.encode())
    assert pid[3] == f"{pseudonym}^^^^ANON" and pid[4:] == []  # no name, birth date, sex, address, phone
    assert segments["PV1"].split("|")[19] == governance.pseudonym("V20240311-0042", "visit", KEY.encode())
    ft1_ = segments["FT1"].split("|")
    assert ft1_[4:6] == ["", ""] and ft1_[8] == ""  # dates of service and the free-text description: gone
    assert ft1_[11] == "1250.00&USD" and ft1_[7] == "74177^CT abdomen and pelvis with contrast^CPT"


def test_hl7_control_id_is_stable_per_delivery_and_differs_per_destination():
    stored = json_envelope(example("charge.posted-credit"))
    first = parse(transforms.hl7_dft_p03(stored)[0].decode()).control_id
    assert first == parse(transforms.hl7_dft_p03(stored)[0].decode()).control_id and len(first) == 20
    other = json_envelope(example("charge.posted-credit"), destination="legacy-billing")
    assert parse(transforms.hl7_dft_p03(other)[0].decode()).control_id != first


@pytest.mark.parametrize("clearance", CLEARANCES)
def test_erp_csv_has_a_header_and_a_line_per_charge_and_no_names(clearance):
    source = read("microsoft-FHIR-Converter/DFT-P03-01.hl7").decode("utf-8")
    body, content_type = transforms.erp_csv(hl7_envelope(source, clearance))
    assert content_type == "text/csv; charset=utf-8; header=present" and body.endswith(b"\r\n")
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8"))))
    assert list(rows[0]) == list(transforms.LEDGER_COLUMNS)
    assert [(r["line"], r["code"], r["amount"], r["currency"], r["quantity"]) for r in rows] == [
        ("1", "71045", "100", "USD", "2"), ("2", "626.2", "120", "USD", "1")]
    assert not any(re.search(r"name|address|phone|birth", c) for c in transforms.LEDGER_COLUMNS)
    for name in ("EVERYMAN", "ADAM", "Josh"):
        assert name.lower() not in body.decode().lower()
    patient = rows[0]["patient_ref"]
    assert patient == "PATID1234" if clearance == "phi" else governance.is_pseudonym(patient)
    assert (rows[0]["service_date"] == "2019-11-22") == (clearance != "deidentified")


def test_erp_csv_takes_the_cost_centre_and_gl_account_of_each_event_type():
    expected = {"charge.posted-ct-scan": ("CC-4100", "4100-310", "74177", "1250.00", "2024-03-12"),
                "service.completed-lab-result": ("CC-4200", "4200-120", "80053", "", "2024-03-14T07:15:00-05:00"),
                "supply.consumed-implant": ("CC-6120", "6120-400", "MDT-PM-ADAPTA-01", "", "2024-06-11T10:40:00-05:00")}
    for name, values in expected.items():
        [row] = csv.DictReader(io.StringIO(transforms.erp_csv(json_envelope(example(name), "limited"))[0].decode()))
        assert (row["cost_centre"], row["gl_account"], row["code"], row["amount"], row["service_date"]) == values


def test_what_a_transform_cannot_format_is_refused_with_the_reason():
    cases = [
        (transforms.hl7_dft_p03, json_envelope(example("service.completed-ecg")),
         "hl7_dft_p03 does not format service.completed (it formats charge.posted)"),
        (transforms.erp_csv, json_envelope(example("patient.admitted-inpatient")),
         "erp_csv does not format patient.admitted"),
        (transforms.sql_row, hl7_envelope(dft_text(ft1(1), ft1(2))), "this message holds 2 events"),
        (transforms.canonical_json, json_envelope({"type": "supply.consumed", "data": {"sku": "gauze-10"}}),
         "not a canonical supply.consumed version 1 event: "),
        (transforms.canonical_json, json_envelope({"type": "lab.result", "data": {}}),
         "no canonical event type 'lab.result'"),
        (transforms.canonical_json, json_envelope({"type": "charge.posted", "version": 7, "data": {}}),
         "no version 7 of 'charge.posted'"),
        (transforms.canonical_json, hl7_envelope("MSH|^~\\&|A|B|C|D|20240101||ADT^A02|X1|P|2.5\rPID|1||1^^^H^MR"),
         "cannot map HL7v2:ADT^A02 to canonical events: MSH-9: no canonical mapping for ADT^A02"),
        (transforms.canonical_json, hl7_envelope(dft_text(ft1(1, date="2024-01-01"))),
         "cannot map HL7v2:DFT^P03 to canonical events: FT1[1]-4: not an HL7 date/time"),
        (transforms.canonical_json, envelope(b"<xml/>", "application/xml", "x"), "cannot read a application/xml"),
        (transforms.canonical_json, envelope(b"{", "application/json", "x"), "not a JSON event"),
        (transforms.canonical_json, envelope(b"MSH|nonsense", HL7_CONTENT, "x"), "not a valid HL7 v2 message"),
    ]
    for transform, stored, reason in cases:
        with pytest.raises(TransformError) as caught:
            transform(stored)
        assert reason in str(caught.value), (reason, str(caught.value))


def test_an_operators_own_canonical_transform_is_minimised_too():
    body, _ = my_format(json_envelope(example("charge.posted-credit"), "deidentified"))
    assert json.loads(body) == {"codes": ["80053"], "patients": [governance.pseudonym("MRN-0048213", "patient",
                                                                                      KEY.encode())]}
    assert transforms.spec_of(transforms.resolve("tests.unit.test_transforms:my_format")) == \
        transforms.Spec(canonical=True, accepts=frozenset({"charge.posted"}))
    with pytest.raises(ValueError, match="not canonical event types: charge.pasted"):
        transforms.canonical_transform("charge.pasted")


@transforms.canonical_transform("charge.posted")
def my_format(events, envelope):
    return json.dumps({"codes": [e["data"]["charge"]["code"]["code"] for e in events],
                       "patients": [e["data"]["patient"]["id"] for e in events]}).encode(), "application/json"


def unminimised(envelope):
    return envelope.body, "application/json"


# --- the HL7 mapping table the config check uses --------------------------------------------

def test_hl7_event_types_follow_from_hl7():
    assert set(transforms.HL7_EVENT_TYPES) == set(to_canonical.MAPPINGS)
    for param in CORPUS:
        message = param.values[0]
        kind = message.message_type.removeprefix("HL7v2:")
        assert {e["type"] for e in to_canonical.to_canonical(message)} == {transforms.HL7_EVENT_TYPES[kind]}, param.id


# --- the configuration check ----------------------------------------------------------------

CONFIG = textwrap.dedent("""\
    sources:
      lab:
        allowed_types: ["HL7v2:ADT^*", "HL7v2:DFT^P03", "charge.posted", "service.completed", "supply.consumed"]
    destinations:
      billing:
        url: "http://127.0.0.1:9/billing"
        clearance: limited
        transform: hl7_dft_p03
      erp:
        url: "file:///tmp/courier-test-erp"
        transform: erp_csv
      archive:
        url: "file:///tmp/courier-test-archive"
        clearance: phi
      warehouse:
        url: "file:///tmp/courier-test-warehouse"
        clearance: deidentified
        transform: canonical_json
    routes:
      - match: {source: lab, type: "*.posted"}
        to: [billing, erp]
      - match: {source: lab, type: "HL7v2:DFT^P03"}
        to: [billing, erp, warehouse]
      - match: {source: lab, type: "service.completed"}
        to: [erp]
      - match: {source: lab}
        to: [archive, warehouse]
    """)
WITH_KEY = {governance.KEY_VARIABLE: KEY}


def check(tmp_path, text: str, env: dict | None = None) -> list[str]:
    """The problems `load_routing` reports for this file ([] when it loads)."""
    path = tmp_path / "courier.yml"
    path.write_text(text)
    try:
        load_routing(path, WITH_KEY if env is None else env)
    except ConfigError as exc:
        return [p.replace(f"{path}:", "courier.yml:") for p in exc.problems]
    return []


def line(text: str, fragment: str) -> int:
    [number] = [i for i, l in enumerate(text.splitlines(), 1) if fragment in l]
    return number


def test_a_governed_config_loads(tmp_path):
    assert check(tmp_path, CONFIG) == []
    routing = load_routing(tmp_path / "courier.yml", WITH_KEY)
    assert routing.destinations["erp"].clearance == "deidentified"  # the default: not cleared for anything


@pytest.mark.parametrize("old, new, at, where, message", [
    pytest.param("    transform: hl7_dft_p03\n", "    transform: passthrough\n", "transform: passthrough",
                 "destinations.billing.transform",
                 "clearance limited, but transform passthrough sends messages as they came, PHI and all: give it a "
                 "transform that minimises (canonical_json, erp_csv, hl7_dft_p03, sql_row, or your own made with "
                 "courier.app.domain.transforms.canonical_transform), or, if billing may see PHI, clearance: phi", id="passthrough"),
    pytest.param("    clearance: phi\n", "", "archive:", "destinations.archive",
                 "clearance deidentified (the default), but transform passthrough (the default) sends messages as "
                 "they came, PHI and all", id="defaults"),
    pytest.param("    transform: erp_csv\n", "    transform: tests.unit.test_transforms:unminimised\n", "unminimised",
                 "destinations.erp.transform", "clearance deidentified (the default), but transform "
                 "tests.unit.test_transforms:unminimised sends messages as they came", id="own-function-undeclared"),
    pytest.param("    to: [erp]\n", "    to: [billing]\n", "to: [billing]", "routes.2.to.0",
                 "destination billing (transform hl7_dft_p03) cannot format service.completed: it formats "
                 "charge.posted; narrow this route's match.type or send those types elsewhere", id="json-type"),
    pytest.param('type: "HL7v2:DFT^P03"}\n    to: [billing, erp, warehouse]',
                 'type: "HL7v2:*"}\n    to: [billing, warehouse]', "to: [billing, warehouse]", "routes.1.to.0",
                 "destination billing (transform hl7_dft_p03) cannot format HL7v2:ADT^A01 (patient.admitted), "
                 "HL7v2:ADT^A03 (patient.discharged), HL7v2:ADT^A04 (patient.admitted), HL7v2:ADT^A08 "
                 "(patient.updated): it formats charge.posted", id="hl7-pattern-expanded"),
    pytest.param('"supply.consumed"]', '"supply.consumed", "lab.result", "HL7v2:ADT^A02"]', "to: [archive, warehouse]",
                 "routes.3.to.1", "destination warehouse (transform canonical_json) cannot format HL7v2:ADT^A02 "
                 "(no canonical mapping), lab.result (not a canonical event type): it formats canonical event "
                 "types", id="not-canonical"),
    pytest.param('type: "service.completed"}', 'type: "lab.*"}', "to: [erp]", "routes.2.to.0",
                 "destination erp (transform erp_csv) formats canonical events, but match.type 'lab.*' matches no "
                 "canonical event type or mapped HL7 v2 type that this route's sources may send",
                 id="pattern-matches-nothing"),
])
def test_each_refusal_names_file_line_destination_and_why(tmp_path, old, new, at, where, message):
    assert CONFIG.count(old) == 1
    text = CONFIG.replace(old, new)
    problems = check(tmp_path, text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"courier.yml:{line(text, at)}: {where}: {message}"), problems[0]


def test_a_missing_or_short_pseudonym_key_is_refused(tmp_path):
    problems = check(tmp_path, CONFIG, env={})
    assert problems == [
        f"courier.yml:{line(CONFIG, 'clearance: limited')}: destinations.billing.clearance: clearance limited: "
        "patient, visit and other identifiers reach billing as keyed pseudonyms, but COURIER_PSEUDONYM_KEY is not "
        "set; set it to a secret of at least 32 characters (openssl rand -base64 32) and keep it: another key gives "
        "other pseudonyms, and joins on the old ones break",
        f"courier.yml:{line(CONFIG, 'transform: erp_csv')}: destinations.erp.transform: clearance deidentified "
        "(the default): patient, visit and other identifiers reach erp as keyed pseudonyms, but "
        "COURIER_PSEUDONYM_KEY is not set; set it to a secret of at least 32 characters (openssl rand -base64 32) "
        "and keep it: another key gives other pseudonyms, and joins on the old ones break",
        f"courier.yml:{line(CONFIG, 'clearance: deidentified')}: destinations.warehouse.clearance: clearance "
        "deidentified: patient, visit and other identifiers reach warehouse as keyed pseudonyms, but "
        "COURIER_PSEUDONYM_KEY is not set; set it to a secret of at least 32 characters (openssl rand -base64 32) "
        "and keep it: another key gives other pseudonyms, and joins on the old ones break"]
    assert check(tmp_path, CONFIG, env={governance.KEY_VARIABLE: "short"}) == [
        "environment: COURIER_PSEUDONYM_KEY must be at least 32 characters (it has 5); make one with: "
        "openssl rand -base64 32"]
    # phi destinations and passthrough need no key
    phi_only = "sources: {lab: {}}\ndestinations:\n  a: {url: 'file:///tmp/a', clearance: phi}\n" \
               "routes:\n  - to: [a]\n"
    assert check(tmp_path, phi_only, env={}) == []


def test_source_allowed_types_narrow_what_a_route_carries(tmp_path):
    text = textwrap.dedent("""\
        sources:
          billing-feed: {allowed_types: ["HL7v2:DFT^P03", "charge.posted"]}
        destinations:
          legacy: {url: "mllp://127.0.0.1:2576", clearance: limited, transform: hl7_dft_p03}
        routes:
          - to: [legacy]
        """)
    assert check(tmp_path, text) == []  # "*" from a source that only sends charges: fine
    assert check(tmp_path, text.replace('"charge.posted"]', '"charge.posted", "service.*"]')) == [
        "courier.yml:6: routes.0.to.0: destination legacy (transform hl7_dft_p03) cannot format service.completed: "
        "it formats charge.posted; narrow this route's match.type or send those types elsewhere"]


def test_own_canonical_transforms_are_checked_like_built_ins(tmp_path):
    text = CONFIG.replace("    transform: erp_csv\n", "    transform: tests.unit.test_transforms:my_format\n")
    [problem] = check(tmp_path, text)
    assert "routes.2.to.0: destination erp (transform tests.unit.test_transforms:my_format) cannot format " \
           "service.completed: it formats charge.posted" in problem


def test_governance_problems_come_with_the_others_sorted_by_line(tmp_path):
    text = CONFIG.replace("    transform: hl7_dft_p03\n", "    transform: passthrough\n    timeout: soon\n")
    text = text.replace("to: [erp]", "to: [nowhere]")
    problems = check(tmp_path, text, env={})
    assert [p.split(": ")[1] for p in problems] == [
        "destinations.billing.transform", "destinations.billing.timeout", "destinations.erp.transform",
        "destinations.warehouse.clearance", "routes.2.to.0"]
    assert [int(p.split(":")[1]) for p in problems] == sorted(int(p.split(":")[1]) for p in problems)


def test_settings_carry_the_key_and_embedding_takes_it_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "courier.yml"
    path.write_text(CONFIG)
    settings = load_settings(env={"COURIER_CONFIG": str(path), **WITH_KEY})
    assert settings.pseudonym_key == KEY.encode() and KEY not in repr(settings)
    with pytest.raises(ConfigError, match="COURIER_PSEUDONYM_KEY is not set"):
        load_settings(env={"COURIER_CONFIG": str(path)})
    host = {"COURIER_CONFIG": str(path), "COURIER_DATABASE_URL": "sqlite://"}
    assert settings_from_config(host).pseudonym_key == KEY.encode()  # from os.environ (the autouse fixture)
    with pytest.raises(ConfigError, match="COURIER_PSEUDONYM_KEY: set it in the process environment instead"):
        settings_from_config({**host, governance.KEY_VARIABLE: KEY})
