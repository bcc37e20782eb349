"""courier.app.domain.canonical (versioned, classified models) and courier.app.hl7.to_canonical (HL7 v2 -> canonical events).

The real samples in tests/data/hl7 drive the mapping tests: every `valid` sample of a mapped
type goes through to_canonical, and what comes out is checked against values read from
the file by plain string splitting (not by python-hl7, which the mapping itself uses),
plus exact values picked by hand per message type.
"""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
import re
from datetime import datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import event as observe
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError, fields, validate

from courier.app.domain import canonical
from courier.app.domain.canonical import LIMITED, NONE, PHI, compatible, leaves, load_event, walk
from courier.app.hl7.to_canonical import MAPPINGS, MappingError, to_canonical
from courier.app.hl7.er7 import Hl7Error, parse, parse_all
from tests.unit.test_hl7v2 import BATCH_REFUSED
from tests.support.data import HL7_SAMPLES
from tests.unit.test_hl7v2 import VALID_BUT_REFUSED

SAMPLES = HL7_SAMPLES
ROWS = list(csv.DictReader((SAMPLES / "SOURCES.tsv").open(encoding="utf-8"), delimiter="\t")) \
    if (SAMPLES / "SOURCES.tsv").exists() else []

EXPECTED_EVENT = {
    "ADT^A01": "patient.admitted", "ADT^A04": "patient.admitted", "ADT^A03": "patient.discharged",
    "ADT^A08": "patient.updated", "DFT^P03": "charge.posted", "SIU^S12": "schedule.changed",
    "SIU^S14": "schedule.changed", "SIU^S15": "schedule.changed", "ORM^O01": "order.changed",
    "ORU^R01": "service.completed",
}
# Also mapped, with samples of their own in the corpus.
EXTRA_SIU = {"SIU^S13": "rescheduled", "SIU^S16": "discontinued", "SIU^S17": "deleted", "SIU^S26": "no_show"}
SIU_ACTION = {"SIU^S12": "booked", "SIU^S14": "modified", "SIU^S15": "cancelled", **EXTRA_SIU}
MULTI = {"DFT^P03", "ORM^O01", "ORU^R01"}

# Labelled `valid`, parsed by Courier, refused by the mapping: {file: (where, reason)}.
MAPPING_REFUSED = {
    # PID-7 '196203520' has 9 digits: no date. A present but malformed value is an error.
    "python-hl7/samples.py__sample_hl7.hl7": ("PID[1]-7", "not an HL7 date/time"),
    # python-hl7's repetition fixture: an ORU^R01 with a PID of placeholders and no OBR.
    "python-hl7/samples.py__rep_sample_hl7.hl7": ("OBR", "no OBR segment"),
}
# Batch members refused by the mapping: {file: {message number: where}}.
# (FHIR-Converter's BundleToHl7v2.hl7, whose members have an empty OBR-4, never gets this far:
# its BTS-1 count is wrong, so the whole batch is refused; see BATCH_REFUSED in test_hl7v2.)
BATCH_MAPPING_REFUSED: dict[str, dict[int, str]] = {}


# --- reading the files without python-hl7 -------------------------------------------------

def read(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def raw_segments(text: str) -> list[list[str]]:
    """Segments split into fields by plain string operations; MSH re-indexed so [n] is MSH-n."""
    lines = [l for l in re.split(r"\r\n|\r|\n", text.lstrip("\ufeff")) if l.strip()]
    sep = lines[0][3]
    out = []
    for line in lines:
        fields_ = line.split(sep)
        if fields_[0] == "MSH":
            fields_ = ["MSH", sep] + fields_[1:]
        out.append(fields_)
    return out


def delimiters(text: str) -> tuple[str, str]:
    """(component, repetition) separators from MSH-2."""
    msh = text.lstrip("\ufeff")
    return msh[4], msh[5]


def fld(segment: list[str], n: int) -> str:
    return segment[n] if n < len(segment) else ""


def comp(value: str, n: int, component_sep: str) -> str:
    parts = value.split(component_sep)
    return parts[n - 1] if n <= len(parts) else ""


def wanted_type(row: dict) -> str | None:
    """The mapped message type of a SOURCES.tsv row (its component separator read from the file)."""
    types = [t for t in row["msh9_types"].split(";") if t]
    if not types:
        return None
    component = delimiters(read(row["file"]).decode("utf-8-sig", "replace").lstrip("\r\n"))[0]
    for t in types:
        code = "^".join(t.split(component)[:2])
        if code in EXPECTED_EVENT or code in EXTRA_SIU:
            return code
    return None


def sample_params(kind: str) -> list:
    return [pytest.param(r, wanted_type(r), id=r["file"]) for r in ROWS
            if r["kind"] == kind and wanted_type(r)]


VALID = sample_params("valid")
BATCHES = [p for p in sample_params("batch") if p.values[0]["file"] not in BATCH_REFUSED]


def mapped(name: str) -> list[dict]:
    [message] = parse_all(read(name))
    return to_canonical(message)


def only(name: str) -> dict:
    [event] = mapped(name)
    return event


# --- every valid sample of a mapped type --------------------------------------------------

def test_every_mapped_type_has_real_samples():
    found = {p.values[1] for p in VALID}
    assert found >= set(EXPECTED_EVENT), f"no valid sample for {set(EXPECTED_EVENT) - found}"
    assert len(VALID) >= 40


def test_every_decision_names_a_real_row():
    kinds = {r["file"]: r["kind"] for r in ROWS}
    assert all(kinds[name] == "valid" for name in MAPPING_REFUSED)
    assert all(kinds[name] == "batch" for name in BATCH_MAPPING_REFUSED)


@pytest.mark.parametrize("row, kind", VALID)
def test_valid_sample_maps_to_its_events(row, kind):
    if row["file"] in VALID_BUT_REFUSED:
        pytest.skip(f"refused by courier.app.hl7.er7: {VALID_BUT_REFUSED[row['file']]}")
    [message] = parse_all(read(row["file"]))
    assert message.message_type == f"HL7v2:{kind}"
    if row["file"] in MAPPING_REFUSED:
        where, reason = MAPPING_REFUSED[row["file"]]
        with pytest.raises(MappingError, match=re.escape(reason)) as caught:
            to_canonical(message)
        assert caught.value.where == where
        return
    events = to_canonical(message)
    check_events(message.text, kind, message.control_id, events)


@pytest.mark.parametrize("row, kind", BATCHES)
def test_batch_members_map_too(row, kind):
    refused = BATCH_MAPPING_REFUSED.get(row["file"], {})
    for number, message in enumerate(parse_all(read(row["file"])), 1):
        if number in refused:
            with pytest.raises(MappingError) as caught:
                to_canonical(message)
            assert caught.value.where == refused[number]
        else:
            check_events(message.text, message.message_type.removeprefix("HL7v2:"), message.control_id,
                         to_canonical(message))


def check_events(text: str, kind: str, control_id: str, events: list[dict]) -> None:
    """What every mapped message must satisfy, checked against the raw text."""
    segments = raw_segments(text)
    ids = [s[0] for s in segments]
    component, repetition = delimiters(text)
    expected_type = EXPECTED_EVENT.get(kind) or "schedule.changed"
    # Nothing dropped: one event per FT1 / ORC / OBR, exactly one otherwise.
    count = {"DFT^P03": ids.count("FT1"), "ORM^O01": ids.count("ORC"), "ORU^R01": ids.count("OBR")}.get(kind, 1)
    assert len(events) == count
    for number, event in enumerate(events, 1):
        assert set(event) <= {"type", "version", "id", "occurred_at", "data"}
        assert event["type"] == expected_type and event["version"] == 1
        assert event["id"] == (f"{control_id}-{number}" if kind in MULTI else control_id)
        load_event(event["type"], event["version"], event["data"])  # raises if it does not load
        json.dumps(event)  # plain JSON: what travels on
    pid = next((s for s in segments if s[0] == "PID"), None)
    for event in events:
        patient = event["data"].get("patient")
        if pid is None:
            assert patient is None
            continue
        # The identifier chosen: the first MR-type PID-3 repetition, else the first one.
        reps = [r for r in fld(pid, 3).split(repetition) if comp(r, 1, component).strip()]
        mr = [r for r in reps if comp(r, 5, component).strip().upper() == "MR"]
        if reps:
            assert patient["id"] == comp((mr or reps)[0], 1, component).strip()
            assert [i["value"] for i in patient["identifiers"]] == [comp(r, 1, component).strip() for r in reps]
    if kind == "DFT^P03":
        ft1s = [s for s in segments if s[0] == "FT1"]
        for event, ft1 in zip(events, ft1s):
            assert event["data"]["charge"]["code"]["code"] == comp(fld(ft1, 7), 1, component)
            assert event["data"]["charge"]["type"] == fld(ft1, 6)
    elif kind == "ORU^R01":
        obrs = [s for s in segments if s[0] == "OBR"]
        for event, obr in zip(events, obrs):
            assert event["data"]["service"]["code"]["code"] == comp(fld(obr, 4), 1, component)
            if comp(fld(obr, 2), 1, component):
                assert event["data"]["order"]["placer_number"] == comp(fld(obr, 2), 1, component)
        observations = sum(len(e["data"].get("observations", [])) for e in events)
        assert observations == ids[ids.index("OBR"):].count("OBX")
    elif kind == "ORM^O01":
        orcs = [s for s in segments if s[0] == "ORC"]
        for event, orc in zip(events, orcs):
            assert event["data"]["control"] == fld(orc, 1)
            assert event["data"]["order"].get("placer_number", "") == comp(fld(orc, 2), 1, component)
    elif kind.startswith("SIU"):
        sch = segments[ids.index("SCH")]
        data = events[0]["data"]
        assert data["action"] == SIU_ACTION[kind]
        assert data["appointment"].get("placer_id", "") == comp(fld(sch, 1), 1, component)
        assert data["appointment"].get("filler_id", "") == comp(fld(sch, 2), 1, component)
        assert len(data.get("services", [])) == ids.count("AIS")
    elif kind.startswith("ADT"):
        pv1 = next((s for s in segments if s[0] == "PV1"), None)
        visit = events[0]["data"].get("visit")
        if pv1 is not None and fld(pv1, 2):
            assert visit["patient_class"] == fld(pv1, 2).strip()


def test_mapped_envelopes_pass_the_ingest_envelope_schema():
    from courier.app.ingest import _SAFE_ID, EventSchema  # imported here: only this test depends on courier.app.ingest

    assert canonical.EVENT_ID.pattern == _SAFE_ID.pattern  # the event id rule is the ingest one

    checked = 0
    for param in VALID:
        row = param.values[0]
        if row["file"] in MAPPING_REFUSED or row["file"] in VALID_BUT_REFUSED:
            continue
        for event in mapped(row["file"]):
            EventSchema().load(json.loads(json.dumps(event)))
            checked += 1
    assert checked >= 50


# --- exact values, read from the files by hand ---------------------------------------------

def test_adt_a01_patient_and_visit():
    event = only("microsoft-FHIR-Converter/ADT-A01-01.hl7")
    data = event["data"]
    assert data["kind"] == "admission"
    assert event["occurred_at"] == "2021-08-17T15:19:43.400000+02:00"  # EVN-6
    patient = data["patient"]
    # PID-3 'PATID1234^5^M11^test1&2.16.1&HCD^MR^...~123456789^^^USSSA^SS'
    assert patient["id"] == "PATID1234" and patient["id_type"] == "MR"
    assert patient["identifiers"] == [{"value": "PATID1234", "type": "MR", "authority": "test1"},
                                      {"value": "123456789", "type": "SS", "authority": "USSSA"}]
    # PID-5 'EVERYMAN&&&&Aniston^ADAM^A^III^Dr.^MD^D^...~Josh&&&&Bing^^stanley^^^^L'
    assert [(n.get("family"), n.get("given"), n.get("type")) for n in patient["names"]] == \
        [("EVERYMAN", "ADAM", "D"), ("Josh", None, "L")]
    assert patient["birth_date"] == "1988-08-18" and patient["sex"] == "M"
    # PID-11 '1000&Hospital Lane^Ste. 123^Ann Arbor ^MI^99999^USA^M'
    assert patient["addresses"][0] == {"lines": ["1000 Hospital Lane", "Ste. 123"], "city": "Ann Arbor",
                                       "state": "MI", "postal_code": "99999", "country": "USA", "type": "M"}
    assert patient["zip3"] == "999"
    visit = data["visit"]
    assert visit["location"] == {"point_of_care": "HUH AE OMU", "room": "OMU B", "bed": "Bed 03",
                                 "facility": "HOMERTON UNIVER"}
    assert visit["attending"][0]["id"] == "1122334" and visit["attending"][0]["family_name"] == "Alaz"
    assert visit["admitted_at"] == "2015-02-08T11:34:19+01:10"  # PV1-44 '20150208113419+0110'
    assert visit["number"] == "40007716"
    # PV1-14 'NHS Provider-General (inc.A\T\E-this Hosp)': \T\ is the subcomponent separator
    assert visit["admit_source"] == "NHS Provider-General (inc.A&E-this Hosp)"


def test_adt_a04_is_an_outpatient_registration():
    data = only("microsoft-FHIR-Converter/ADT04-251.hl7")["data"]
    assert data["kind"] == "registration"
    assert data["patient"]["id"] == "MRN12345"
    assert data["patient"]["names"] == [{"family": "Doe", "given": "Jane"}]
    assert data["visit"]["patient_class"] == "E"
    assert data["visit"]["attending"] == [{"id": "12345", "family_name": "Johnson", "given_name": "Peter"}]


def test_adt_age_band_from_birth_date_and_event_date():
    patient = only("microsoft-FHIR-Converter/ADT01-23.hl7")["data"]["patient"]
    # born 19241010, EVN-2 20050110: 80 years old
    assert patient["birth_date"] == "1924-10-10" and patient["age_band"] == "80-89"
    assert patient["zip3"] == "999"  # '999990000'


def test_adt_a03_without_mr_identifier_and_explicit_nulls():
    data = only("nHapi/adt_a03.txt")["data"]
    assert data["patient"]["id"] == "5520255" and data["patient"]["id_type"] == "PK"
    # the fourth PID-3 repetition '^^^^TEAM' has no id: not an identifier
    assert len(data["patient"]["identifiers"]) == 3
    assert data["visit"]["discharged_at"] == "2008-03-03T15:08"
    # PV1-45 '""' is HL7's explicit null: no discharge time
    assert "discharged_at" not in only("python-hl7/samples.py__sample_msh.hl7")["data"]["visit"]


def test_alternative_delimiters_map_to_the_same_event():
    plain = only("elixir-hl7/examples.ex__wikipedia_sample_hl7.hl7")
    other = only("elixir-hl7/examples.ex__wikipedia_sample_hl7_alt_delimiters.hl7")
    assert other == plain
    assert plain["data"]["patient"]["addresses"][1]["lines"] == ["NICKELL\u2019S PICKLES", "10000 W 100TH AVE"]


def test_dft_one_charge_per_ft1_with_its_values():
    first, second = mapped("microsoft-FHIR-Converter/DFT-P03-01.hl7")
    charge = first["data"]["charge"]
    assert charge["line"] == 1 and charge["transaction_id"] == "12345" and charge["type"] == "CG"
    assert charge["code"] == {"code": "71045", "display": "Xray exam chest 1 view", "system": "C4"}
    assert charge["service_date"] == charge["posted_at"] == "2019-11-22"
    assert charge["quantity"] == "2"
    assert charge["amount"] == {"amount": "100", "currency": "USD"}        # FT1-11 '100&USD'
    assert charge["unit_price"] == {"amount": "50", "currency": "USD"}     # FT1-12 '50&USD'
    assert charge["department"] == {"code": "RAD-1", "name": "Radiology Deptt"}
    assert [d["code"] for d in charge["diagnoses"]] == ["29857009", "68235000"]
    assert charge["performed_by"][0]["id"] == "9941339108" and charge["performed_by"][0]["id_type"] == "NPI"
    assert "ordered_by" not in charge  # FT1-21 empty
    assert charge["procedure"]["code"] == "71045" and charge["procedure_modifiers"] == [{"code": "26"}]
    charge = second["data"]["charge"]
    assert charge["code"] == {"code": "626.2"} and charge["amount"] == {"amount": "120", "currency": "USD"}
    assert "ordered_by" not in charge and "performed_by" not in charge  # FT1-20/21 '^^^'
    assert charge["procedure"] == {"code": "99011", "display": "first op visit"}
    assert first["data"]["patient"] == second["data"]["patient"]
    assert first["data"]["patient"]["id"] == "PATID1234"
    assert first["occurred_at"] == "2005-01-12T22:00:00+00:00"  # EVN-2: FT1-5 is only a date


def test_siu_actions_and_resources():
    booked = only("microsoft-FHIR-Converter/SIU-S12-01.hl7")["data"]
    assert booked["action"] == "booked"
    assert booked["appointment"]["placer_id"] == "12345" and booked["appointment"]["filler_id"] == "36996"
    assert booked["appointment"]["start"] == "2021-09-24T09:30:00+02:15"   # TQ1-7
    assert booked["appointment"]["end"] == "2021-09-24T10:20:00+02:15"     # TQ1-8
    assert booked["services"][0]["code"]["code"] == "76164006"
    assert booked["locations"] == [{"point_of_care": "055", "room": "Room01", "facility": "GH Clinic"}]
    assert booked["providers"][0]["provider"]["id"] == "1210"
    assert booked["providers"][0]["role"]["display"] == "Gastroenterologist"
    assert booked["notes"][0] == "Appointment booked for emergency procedure"
    assert only("microsoft-FHIR-Converter/SIU-S14-01.hl7")["data"]["action"] == "modified"
    cancelled = only("microsoft-FHIR-Converter/SIU-S15-01.hl7")["data"]
    assert cancelled["action"] == "cancelled" and cancelled["services"][0]["status"] == "Cancelled"
    groups = only("microsoft-FHIR-Converter/SIU-S12_1.hl7")["data"]
    assert [s["code"]["code"] for s in groups["services"]] == ["111", "220", "215"]
    assert [p["provider"]["id"] for p in groups["providers"]] == ["400", "500", "600"]
    assert [l["point_of_care"] for l in groups["locations"]] == ["4E", "11", "22", "55"]


def test_orm_one_order_per_orc():
    first, second = mapped("microsoft-FHIR-Converter/ORM-O01-03.hl7")
    assert first["data"]["action"] == "placed" and first["data"]["control"] == "NW"
    assert first["data"]["order"] == {"placer_number": "1101", "filler_number": "1201"}
    assert second["data"]["order"] == {"placer_number": "2203", "filler_number": "2301"}
    assert first["data"]["service"]["code"]["code"] == "24725-4"
    assert second["data"]["service"]["code"]["code"] == "24590-2"
    # a pharmacy order: the service is RXO-1
    pharmacy = only("microsoft-FHIR-Converter/ORM-O01-06.hl7")["data"]
    assert pharmacy["service"]["code"] == {"code": "00047040230", "display": "Ampicillin 250 mg caps",
                                           "system": "NDC"}


def test_orm_notes_unescape_formatting():
    data = only("HL7-dotnetcore/Sample-ORM.txt")["data"]
    assert data["order"] == {"placer_number": "11777-60"}
    assert data["service"]["code"]["code"] == "4241"
    # '\.br\' and '\X0D\\X0A\' are line breaks, '\H\' and '\N\' highlighting (dropped)
    assert data["notes"] == ["some text\nsome text after new line\nissue Efferent-Health#82",
                             "some text\nsome text after new line\nissue Efferent-Health#81"]


def test_oru_one_service_completed_per_obr():
    first, second = mapped("microsoft-FHIR-Converter/LAB-ORU-1.hl7")
    assert first["data"]["service"]["code"]["code"] == "24317-0"
    assert first["data"]["order"] == {"placer_number": "88502218", "filler_number": "82503246"}
    assert second["data"]["order"] == {"placer_number": "855238581", "filler_number": "890775544"}
    assert len(first["data"]["observations"]) == len(second["data"]["observations"]) == 5
    erythrocytes = first["data"]["observations"][1]
    assert erythrocytes["code"]["code"] == "11273-0" and erythrocytes["values"] == ["4.06"]
    assert erythrocytes["units"] == "tera.l-1"
    cbc = only("microsoft-FHIR-Converter/LRI_2.0-NG_CBC_Typ_Message.hl7")["data"]
    assert cbc["service"]["code"]["code"] == "57021-8"
    assert cbc["order"] == {"placer_number": "ORD666555", "filler_number": "R-991133",
                            "placer_group_number": "GORD874233"}
    glucose = only("microsoft-FHIR-Converter/ORU-R01-RMGEAD.hl7")["data"]
    assert glucose["service"]["code"] == {"code": "15545", "display": "GLUCOSE"}
    assert glucose["patient"]["id"] == "555-44-4444"


def test_oru_results_belong_to_the_patient_before_them():
    text = "\r".join(["MSH|^~\\&|LAB|F|EHR|F|20240101||ORU^R01|R1|P|2.5",
                      "PID|1||111^^^H^MR", "ORC|RE|P1|F1", "OBR|1|||GLU^Glucose^L", "OBX|1|NM|GLU||5.5",
                      "PID|1||222^^^H^MR", "NTE|1||about patient 222", "OBX|1|ST|X||patient-level",
                      "OBR|1|P2|F2|NA^Sodium^L", "NTE|1||hemolysed"])
    first, second = to_canonical(parse(text))
    assert (first["data"]["patient"]["id"], second["data"]["patient"]["id"]) == ("111", "222")
    assert first["data"]["order"] == {"placer_number": "P1", "filler_number": "F1"}  # from ORC: OBR-2/3 empty
    assert first["data"]["observations"] == [{"code": {"code": "GLU"}, "value_type": "NM", "values": ["5.5"]}]
    assert second["data"]["notes"] == ["hemolysed"] and "observations" not in second["data"]


def test_orm_detail_without_its_orc_is_refused():
    text = "MSH|^~\\&|A|B|C|D|20240101||ORM^O01|X|P|2.5\rORC|NW|P1\rOBR|1|P1||CT^Head\rOBR|2|P2||MR^Brain"
    with pytest.raises(MappingError, match=re.escape("OBR[2] has no ORC of its own")):
        to_canonical(parse(text))


def test_siu_timing_from_sch_11_without_tq1():
    text = "MSH|^~\\&|A|B|C|D|20240101||SIU^S12|X|P|2.3\rSCH|1|2|||||||||^^^202401011000+0100^202401011100+0100"
    appointment = to_canonical(parse(text))[0]["data"]["appointment"]
    assert (appointment["start"], appointment["end"]) == ("2024-01-01T10:00+01:00", "2024-01-01T11:00+01:00")


def test_unmapped_type_is_refused_clearly():
    [message] = parse_all(read("microsoft-FHIR-Converter/ADT-A02-01.hl7"))
    with pytest.raises(MappingError, match="no canonical mapping for ADT\\^A02") as caught:
        to_canonical(message)
    assert caught.value.where == "MSH-9"


def test_ids_are_stable_and_escaped():
    [message] = parse_all(read("microsoft-FHIR-Converter/DFT-P03-02.hl7"))
    assert [e["id"] for e in to_canonical(message)] == [e["id"] for e in to_canonical(message)] \
        == ["MSG00001-1", "MSG00001-2"]
    odd = parse(adt_text(control_id="A B=\u00e9"))
    [event] = to_canonical(odd)
    assert event["id"] == "A=20B=3D=C3=A9"


# --- synthesized messages: required values and errors ------------------------------------

def adt_text(trigger="A01", pid3="12345^^^HOSP^MR", pid5="DOE^JANE", pid7="19800101", pid8="F",
             pid11="1 MAIN ST^^SPRINGFIELD^IL^62701", pv1_2="I", pv1_3="W1^101^A", pv1_7="9^WHO^DOC",
             pv1_44="20240101101500+0100", pv1_45="", control_id="CTRL1", pv1=True) -> str:
    segments = [
        f"MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000+0100||ADT^{trigger}|{control_id}|P|2.5",
        "EVN||20240101120000+0100",
        f"PID|1||{pid3}||{pid5}||{pid7}|{pid8}|||{pid11}",
    ]
    if pv1:
        segments.append(f"PV1|1|{pv1_2}|{pv1_3}||||{pv1_7}" + "|" * 37 + f"{pv1_44}|{pv1_45}")
    return "\r".join(segments)


def dft_text(*ft1s: str) -> str:
    return "\r".join([
        "MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000+0100||DFT^P03|CTRL2|P|2.5",
        "EVN|P03|20240101120000+0100",
        "PID|1||777^^^HOSP^MR||ROE^RICHARD",
        "PV1|1|O|CLINIC",
        *ft1s,
    ])


def ft1(n=1, date="20240101", kind="CG", code="99213^Visit^CPT", description="", quantity="1",
        amount="75.00&USD", department="CARD^Cardiology", performed="11^HART^ANNA", ordered="") -> str:
    fields_ = ["FT1", str(n), f"T{n}", "", date, date, kind, code, description, "", quantity, amount, "",
               department, "", "", "", "", "", "", performed, ordered, "", "", "", "99213^Visit^CPT"]
    return "|".join(fields_)


def test_long_values_are_not_refused_by_arbitrary_limits():
    [event] = to_canonical(parse(dft_text(ft1(kind="X" * 300, code="C" * 300))))
    assert event["data"]["charge"]["type"] == "X" * 300 and event["data"]["charge"]["code"]["code"] == "C" * 300


def test_synthesized_adt_maps_every_field_it_reads():
    data = to_canonical(parse(adt_text()))[0]["data"]
    assert data["visit"]["admitted_at"] == "2024-01-01T10:15:00+01:00"  # PV1-44: the field count is right
    assert data["visit"]["location"] == {"point_of_care": "W1", "room": "101", "bed": "A"}
    assert data["patient"]["age_band"] == "40-49" and data["patient"]["zip3"] == "627"


def test_mr_identifier_is_chosen_wherever_it_repeats():
    patient = to_canonical(parse(adt_text(pid3="999-99^^^SSA^SS~~12345^^^HOSP^MR~777^^^X^PI")))[0]["data"]["patient"]
    assert (patient["id"], patient["id_type"]) == ("12345", "MR")
    assert [i["value"] for i in patient["identifiers"]] == ["999-99", "12345", "777"]  # the empty one is none
    # no MR at all: the first, as sent; PID-2 when PID-3 is empty (before v2.3.1)
    assert to_canonical(parse(adt_text(pid3="5^^^X^PI~6^^^Y^SS")))[0]["data"]["patient"]["id"] == "5"
    text = adt_text(pid3="").replace("PID|1||", "PID|1|4711^^^OLD|")
    assert to_canonical(parse(text))[0]["data"]["patient"]["id"] == "4711"


@pytest.mark.parametrize("text, where, reason", [
    (adt_text(pv1=False), "PV1", "no PV1 segment"),
    (adt_text(trigger="A03", pv1=False), "PV1", "no PV1 segment"),
    (adt_text(pid3="", ), "PID[1]-3", "no patient identifier"),
    (adt_text(pid7="19801340"), "PID[1]-7", "out of range"),
    (adt_text(pid7="1980-01-01"), "PID[1]-7", "not an HL7 date/time"),
    (adt_text(pv1_44="202401011015+2500"), "PV1[1]-44", "offset out of range"),
    (dft_text(ft1(1), ft1(2, code="")), "FT1[2]-7", "no code"),
    (dft_text(ft1(1, quantity="two")), "FT1[1]-10", "not a number"),
    (dft_text(ft1(1, amount="NaN&USD")), "FT1[1]-11", "not a number"),
    (dft_text(ft1(1, kind="")), "FT1[1]-6", "no transaction type"),
    (dft_text(), "FT1", "no FT1 segment"),
    ("MSH|^~\\&|A|B|C|D|20240101||ORM^O01|X|P|2.5\rORC|ZZ|P1", "ORC[1]-1", "no canonical action"),
    ("MSH|^~\\&|A|B|C|D|20240101||ORM^O01|X|P|2.5\rORC|NW||", "ORC[1]-2", "no order number"),
    ("MSH|^~\\&|A|B|C|D|20240101||SIU^S12|X|P|2.5\rSCH|||", "SCH[1]-1", "no appointment id"),
    ("MSH|^~\\&|A|B|C|D|20240101||SIU^S12|X|P|2.5\rSCH|1|2\rAIS|1||^Only text", "AIS[1]-3", "no code"),
])
def test_missing_or_malformed_values_are_refused_with_where(text, where, reason):
    with pytest.raises(MappingError, match=re.escape(reason)) as caught:
        to_canonical(parse(text))
    assert caught.value.where == where
    assert str(caught.value) == f"{where}: {caught.value.reason}"


def test_mapping_error_survives_pickling():
    error = pickle.loads(pickle.dumps(MappingError("no code", "FT1[2]-7")))
    assert (error.reason, error.where, str(error)) == ("no code", "FT1[2]-7", "FT1[2]-7: no code")


def hl7_escape(text: str) -> str:
    """Text -> an HL7 field value in the default delimiters (the escape character first)."""
    for char, code in (("\\", "E"), ("|", "F"), ("^", "S"), ("&", "T"), ("~", "R")):
        text = text.replace(char, f"\\{code}\\")
    return text


@pytest.mark.parametrize("raw, expected", [
    ("A\\T\\E", "A&E"), ("x\\H\\bold\\N\\y", "xboldy"), ("a\\.br\\b", "a\nb"), ("a\\X0D0A\\b", "a\nb"),
    ("caf\\XC3A9\\", "caf\u00e9"), ("a\\.sp2\\b", "a\n\nb"), ("left \\", "left \\"),
    ("C:\\temp", "C:\\temp"), ("\\Zlocal\\x", "\\Zlocal\\x"), ("\\E\\S\\E\\", "\\S\\"),
    ("a\\.sp999999999\\b", "a" + "\n" * 100 + "b"),                 # capped
    ("5 mg^day & night", "5 mg^day & night"), ("x~y", "x\ny"),           # free text: unescaped delimiters kept
])
def test_escape_sequences(raw, expected):
    charge = to_canonical(parse(dft_text(ft1(description=raw))))[0]["data"]["charge"]
    assert charge["description"] == expected


# --- property tests: any field content maps or is refused with MappingError ---------------

SAFE_CHARS = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="|^~&\\\r\n")
ESCAPES = st.sampled_from(["\\F\\", "\\S\\", "\\T\\", "\\R\\", "\\E\\", "\\H\\", "\\N\\", "\\.br\\", "\\.sp3\\",
                           "\\X0D0A\\", "\\XC3A9\\", "\\XFF\\", "\\X4\\", "\\Zabc\\", "\\C2842\\", "\\", "\\\\",
                           '""', " "])
ATOM = st.one_of(st.text(SAFE_CHARS, max_size=8), ESCAPES,
                 st.dates().map(lambda d: d.strftime("%Y%m%d")), st.integers(0, 10 ** 14).map(str),
                 st.sampled_from(["MR", "SS", "CG", "USD", "+0100", "-0530", "2024", "1.5", "-3"]))
# Kept small: drawing deep structures costs more than mapping them.
SUBCOMPONENT = st.lists(ATOM, max_size=2).map("".join)
COMPONENT = st.lists(SUBCOMPONENT, min_size=1, max_size=2).map("&".join)
REPETITION = st.lists(COMPONENT, min_size=1, max_size=4).map("^".join)
FIELD = st.lists(REPETITION, min_size=1, max_size=2).map("~".join)
MODERN = {"min_value": datetime(1900, 1, 1), "max_value": datetime(2100, 1, 1)}  # %Y pads 4 digits only from 1000
GOOD_DTM = st.one_of(st.just(""), st.datetimes(**MODERN).map(lambda d: d.strftime("%Y%m%d%H%M%S")),
                     st.datetimes(**MODERN).map(lambda d: d.strftime("%Y%m%d%H%M") + "+0200"),
                     st.datetimes(**MODERN).map(lambda d: d.strftime("%Y%m%d")))
GOOD_CODE = st.from_regex(r"[A-Z0-9.-]{1,8}(\^[A-Za-z ]{0,12}(\^[A-Z0-9]{1,4})?)?", fullmatch=True)
GOOD_CX = st.lists(st.from_regex(r"[A-Z0-9]{1,10}\^\^\^[A-Z]{0,5}\^(MR|SS|PI|)", fullmatch=True),
                   min_size=1, max_size=3).map("~".join)


def mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a well-formed value (so that mapping succeeds often), sometimes anything."""
    return st.one_of(good, good, good, good, FIELD)


DTM = mostly(GOOD_DTM)


def check_maps_or_refuses(text: str) -> list[dict] | None:
    """The events of a message, or None if it was refused with a MappingError; anything else fails."""
    try:
        message = parse(text)
    except Hl7Error:
        assume(False)  # courier.app.hl7.er7 already refuses it: not the mapping's concern
    try:
        events = to_canonical(message)
    except MappingError as exc:
        # refused for something in the message, never because our own output was invalid
        assert re.fullmatch(r"[A-Z][A-Z0-9]{2}(\[\d+\]-\d+(\.\d+)?)?|MSH-9|MSH-10", exc.where), exc
        observe("refused at " + re.sub(r"\[\d+\]", "", exc.where))
        return None
    observe("mapped")
    from courier.app.ingest import EventSchema
    for event in events:
        load_event(event["type"], event["version"], event["data"])
        EventSchema().load(json.loads(json.dumps(event)))
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trigger=st.sampled_from(["A01", "A03", "A04", "A08"]), pid3=mostly(GOOD_CX), pid5=FIELD,
       pid7=mostly(GOOD_DTM.map(lambda v: v[:8])), pid8=FIELD,
       pid11=FIELD, pv1_2=FIELD, pv1_3=FIELD, pv1_7=FIELD, pv1_44=DTM, pv1_45=DTM,
       control_id=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="|^~&\\"),
                          min_size=1, max_size=30))
def test_random_adt_maps_or_raises_mapping_error(**values):
    check_maps_or_refuses(adt_text(**values))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.fixed_dictionaries({
    "date": DTM, "kind": mostly(st.sampled_from(["CG", "CD", "PY", "AJ"])), "code": mostly(GOOD_CODE),
    "description": FIELD,
    "quantity": mostly(st.decimals(allow_nan=False, allow_infinity=False).map(str)),
    "amount": mostly(st.decimals(allow_nan=False, allow_infinity=False, places=2).map(lambda d: f"{d}&USD")),
    "department": FIELD, "performed": FIELD, "ordered": FIELD}), min_size=1, max_size=3))
def test_random_dft_maps_or_raises_mapping_error(lines):
    events = check_maps_or_refuses(dft_text(*(ft1(n, **line) for n, line in enumerate(lines, 1))))
    if events is not None:
        assert len(events) == len(lines)  # nothing dropped


ORDER_TEMPLATES = {
    "ORM^O01": ["PID|1||{0}", "ORC|{1}|{2}|{3}||||||{4}", "OBR|1|{2}||{5}", "NTE|1||{6}", "ORC|NW|{7}", "RXO|{5}"],
    "ORU^R01": ["PID|1||{0}", "ORC|RE|{2}", "OBR|1|{2}|{3}|{5}|||{4}", "OBX|1|ST|{5}||{6}|{7}", "NTE|1||{6}",
                "OBR|2|||{1}"],
    "SIU^S12": ["SCH|{2}|{3}||||{1}", "TQ1|||||||{4}", "PID|1||{0}", "AIS|1||{5}|{4}", "AIL|1||{6}",
                "AIP|1||{7}|{1}", "NTE|1||{6}"],
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(ORDER_TEMPLATES)), values=st.tuples(
    mostly(GOOD_CX), mostly(st.sampled_from(["NW", "CA", "XO", "SC"])), FIELD, FIELD, DTM, mostly(GOOD_CODE),
    FIELD, FIELD), drop=st.sets(st.integers(0, 6)))
def test_random_orders_results_and_appointments_map_or_raise_mapping_error(kind, values, drop):
    segments = [line.format(*values) for n, line in enumerate(ORDER_TEMPLATES[kind]) if n not in drop]
    check_maps_or_refuses("\r".join([f"MSH|^~\\&|A|B|C|D|20240101||{kind}|X1|P|2.5", *segments]))


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40))
def test_escaped_text_comes_back_unchanged(value):
    value = value.strip()
    assume(value and value != '""')
    charge = to_canonical(parse(dft_text(ft1(description=hl7_escape(value)))))[0]["data"]["charge"]
    assert charge["description"] == value


# --- canonical: registry, loading, versions ----------------------------------------------

def test_registry_has_every_event_type_of_issue_7():
    types = {t for t, _ in canonical.EVENTS}
    assert types >= {"service.completed", "charge.posted", "supply.consumed", "claim.status_changed",
                     "schedule.changed", "patient.admitted", "patient.discharged", "patient.updated"}
    models = {m for m, _ in canonical.MODELS}
    assert models >= {"provider", "department", "cost_centre", "patient", "service", "supplier", "item",
                      "charge", "invoice"}
    # every mapping's output type is registered
    assert {EXPECTED_EVENT.get(k, "schedule.changed") for k in MAPPINGS} <= types
    assert canonical.versions("charge.posted") == [1, 2] and canonical.latest_version("charge.posted") == 2


def test_load_event_reports_field_paths():
    data = mapped("microsoft-FHIR-Converter/DFT-P03-01.hl7")[0]["data"]
    data["charge"]["amount"]["amount"] = "lots"
    data["patient"]["names"][1]["family"] = 5
    data["charge"]["colour"] = "red"
    with pytest.raises(ValidationError) as caught:
        load_event("charge.posted", 1, data)
    assert set(caught.value.messages) == {"charge.amount.amount", "patient.names[1].family", "charge.colour"}


def test_load_event_unknown_type_or_version():
    with pytest.raises(ValidationError) as caught:
        load_event("charge.reversed", 1, {})
    assert list(caught.value.messages) == ["type"]
    with pytest.raises(ValidationError) as caught:
        load_event("charge.posted", 3, {})
    assert caught.value.messages == {"version": ["no version 3 of 'charge.posted' (known: 1, 2)"]}
    with pytest.raises(canonical.UnknownSchema):
        canonical.schema_for("nothing.happened", 1)


def test_version_one_and_its_compatible_version_two_both_load():
    data = mapped("microsoft-FHIR-Converter/DFT-P03-01.hl7")[0]["data"]
    loaded = load_event("charge.posted", None, data)   # no version: 1
    assert loaded["charge"]["amount"]["amount"] == Decimal("100")
    load_event("charge.posted", 2, data)                # a v1 document is a valid v2 one
    with_invoice = {**data, "invoice_number": "INV-1"}
    assert load_event("charge.posted", 2, with_invoice)["invoice_number"] == "INV-1"
    with pytest.raises(ValidationError, match="invoice_number"):
        load_event("charge.posted", 1, with_invoice)    # v1 does not know it: refused, not dropped


def test_registered_versions_are_compatible_with_their_predecessors():
    for event_type in {t for t, _ in canonical.EVENTS}:
        known = canonical.versions(event_type)
        for old, new in zip(known, known[1:]):
            assert compatible(canonical.EVENTS[(event_type, old)], canonical.EVENTS[(event_type, new)]) == [], \
                (event_type, old, new)


def test_config_check_refuses_an_incompatible_registered_version(tmp_path, monkeypatch):
    """A version 2 that drops a field of version 1 (say, registered by an operator's transform
    module) stops the configuration from loading, naming the event and the field."""
    from courier.app.settings import ConfigError
    from courier.app.config import load_routing
    from tests.support.config import write_config

    config = write_config(tmp_path / "courier.yml", {"billing": "http://127.0.0.1:9/x"})
    assert load_routing(config, env={}).destinations  # loads as long as the registry is sound

    class Narrower(canonical.Canonical):
        charge = fields.Raw()  # v1's other fields are gone

    monkeypatch.setitem(canonical.EVENTS, ("charge.posted", 3), Narrower)
    with pytest.raises(ConfigError) as refused:
        load_routing(config, env={})
    assert any("charge.posted version 3 is not a compatible change of version 2" in p
               for p in refused.value.problems), refused.value.problems


class Base(canonical.Canonical):
    code = fields.String(required=True, metadata={"classification": NONE})
    amount = fields.Decimal(as_string=True, metadata={"classification": NONE})
    names = fields.List(fields.Nested(canonical.PersonNameV1))
    status = fields.String(validate=validate.OneOf(["a", "b"]), metadata={"classification": NONE})


def variant(**changes) -> type[Schema]:
    """Base with fields added (value a Field), replaced, or removed (value None)."""
    attrs = {k: v for k, v in Base._declared_fields.items() if k not in changes}
    attrs.update({k: v for k, v in changes.items() if v is not None})
    return type("Variant", (canonical.Canonical,), dict(attrs))


class NamesWithoutFamily(canonical.Canonical):
    given = fields.String(metadata={"classification": PHI})


@pytest.mark.parametrize("new, problem", [
    (variant(note=fields.String(metadata={"classification": PHI})), None),
    (variant(code=None), "code: removed"),
    (variant(code=None, code_value=fields.String(required=True, metadata={"classification": NONE})),
     "code: removed"),                                                                           # a rename
    (variant(amount=fields.Float(metadata={"classification": NONE})), "amount: type changed from Decimal to Float"),
    (variant(extra=fields.String(required=True, metadata={"classification": NONE})), "extra: added as required"),
    (variant(amount=fields.Decimal(as_string=True, required=True, metadata={"classification": NONE})),
     "amount: became required"),
    (variant(amount=fields.Decimal(as_string=True, metadata={"classification": LIMITED})),
     "amount: classification changed from none to limited"),
    (variant(status=fields.String(validate=validate.OneOf(["a", "b", "c"]), metadata={"classification": NONE})),
     "status: validation changed"),
    (variant(names=fields.List(fields.Nested(NamesWithoutFamily))), "names[].family: removed"),
    (variant(names=fields.Nested(canonical.PersonNameV1)), "names: type changed from List to Nested"),
])
def test_compatible_names_each_problem(new, problem):
    problems = compatible(Base, new)
    if problem is None:
        assert problems == []
    else:
        assert any(p.startswith(problem) for p in problems), problems


def fingerprint(schema) -> str:
    """What a consumer of a published version depends on, as a stable string."""
    def describe(field):
        parts = [type(field).__name__, field.required, field.allow_none, canonical.classification(field),
                 [repr(v) for v in field.validators]]
        if isinstance(field, fields.Nested):
            parts.append({n: describe(f) for n, f in field.schema.fields.items()})
        elif isinstance(field, fields.List):
            parts.append(describe(field.inner))
        return parts
    return hashlib.sha256(json.dumps({n: describe(f) for n, f in schema().fields.items()},
                                     sort_keys=True).encode()).hexdigest()[:16]


# Published versions are frozen: a change to one of these is a new version, not an edit.
# (Adding a new version adds a line here.)
PUBLISHED = {
    ("patient.admitted", 1): "16b5e8d5de085460",
    ("patient.discharged", 1): "352416744077dacd",
    ("patient.updated", 1): "bcb54646b9b62efd",
    ("charge.posted", 1): "1d61744559057ed5",
    ("charge.posted", 2): "320e6ac87b6dd6c0",
    ("service.completed", 1): "dc79cd36ebe353e9",
    ("order.changed", 1): "f4cb352d120406c8",
    ("supply.consumed", 1): "15fa5b3468bf3209",
    ("claim.status_changed", 1): "a34e7e078976c7d0",
    ("schedule.changed", 1): "9a9e1a5549fcdb86",
}


def test_published_versions_are_frozen():
    current = {key: fingerprint(schema) for key, schema in canonical.EVENTS.items()}
    assert current == PUBLISHED


# --- classification ------------------------------------------------------------------------

def every_schema():
    return [*canonical.EVENTS.items(), *canonical.MODELS.items()]


@pytest.mark.parametrize("schema", [pytest.param(s, id=f"{name}@{version}") for (name, version), s in every_schema()])
def test_every_leaf_field_is_classified(schema):
    found = list(leaves(schema))
    assert found
    unclassified = [path for path, level in found if level not in (PHI, LIMITED, NONE)]
    assert unclassified == []


def test_leaves_and_walk_catch_an_unclassified_field():
    class Careless(canonical.Canonical):
        fine = fields.String(metadata={"classification": NONE})
        names = fields.List(fields.Nested(canonical.PersonNameV1))
        forgotten = fields.String()
        tags = fields.List(fields.String())

    assert [p for p, level in leaves(Careless) if level is None] == ["forgotten", "tags[]"]
    with pytest.raises(ValueError, match="forgotten: field has no classification"):
        list(walk(Careless, {"fine": "x", "forgotten": "y"}))
    with pytest.raises(ValueError, match="stray: not a field"):
        list(walk(Careless, {"stray": "x"}))


@pytest.mark.parametrize("event_type, path, level", [
    ("charge.posted", "patient.id", PHI),
    ("charge.posted", "patient.identifiers[].value", PHI),
    ("charge.posted", "patient.names[].family", PHI),
    ("charge.posted", "patient.birth_date", PHI),
    ("charge.posted", "patient.addresses[].lines[]", PHI),
    ("charge.posted", "patient.addresses[].postal_code", PHI),
    ("charge.posted", "patient.telecoms[].value", PHI),
    ("charge.posted", "charge.description", PHI),
    ("charge.posted", "visit.number", PHI),
    ("service.completed", "notes[]", PHI),
    ("service.completed", "observations[].values[]", PHI),
    ("supply.consumed", "serial_number", PHI),
    ("charge.posted", "patient.age_band", LIMITED),
    ("charge.posted", "patient.zip3", LIMITED),
    ("charge.posted", "patient.sex", LIMITED),
    ("charge.posted", "charge.department.code", LIMITED),
    ("charge.posted", "charge.service_date", LIMITED),
    ("charge.posted", "visit.admitted_at", LIMITED),
    ("charge.posted", "charge.performed_by[].family_name", LIMITED),
    ("order.changed", "order.placer_number", LIMITED),
    ("charge.posted", "charge.code.code", NONE),
    ("charge.posted", "charge.amount.amount", NONE),
    ("charge.posted", "charge.quantity", NONE),
    ("supply.consumed", "item.sku", NONE),
    ("supply.consumed", "cost_centre.code", NONE),
    ("supply.consumed", "cost_centre.gl_account", NONE),
    ("claim.status_changed", "payer.name", NONE),
])
def test_classification_policy(event_type, path, level):
    assert dict(leaves(canonical.schema_for(event_type, 1)))[path] == level


def json_leaves(value, path=""):
    """Every scalar of a JSON document with its path, by a generic walk (no schema)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_leaves(item, f"{path}[{index}]")
    else:
        yield path, value


@pytest.mark.parametrize("name", ["microsoft-FHIR-Converter/DFT-P03-01.hl7", "microsoft-FHIR-Converter/SIU-S12_1.hl7",
                                  "microsoft-FHIR-Converter/LAB-ORU-1.hl7", "nHapi/adt_a03.txt"])
def test_walk_yields_every_leaf_with_its_classification(name):
    for event in mapped(name):
        schema = canonical.schema_for(event["type"], event["version"])
        walked = list(walk(schema, event["data"]))
        assert [(p, v) for p, _, v in walked] == list(json_leaves(event["data"]))
        pattern = dict(leaves(schema))
        for path, level, _ in walked:
            assert pattern[re.sub(r"\[\d+\]", "[]", path)] == level


def test_walk_a_loaded_document():
    data = load_event("charge.posted", 1, mapped("microsoft-FHIR-Converter/DFT-P03-01.hl7")[0]["data"])
    walked = {path: (level, value) for path, level, value in walk(canonical.ChargePostedV1, data)}
    assert walked["patient.names[1].family"] == (PHI, "Josh")
    assert walked["patient.addresses[0].lines[1]"] == (PHI, "Ste. 123")
    assert walked["charge.diagnoses[1].code"] == (NONE, "68235000")
    assert walked["charge.amount.amount"] == (NONE, Decimal("100"))
    assert walked["charge.department.code"] == (LIMITED, "RAD-1")


def test_clearances():
    assert canonical.visible_to(PHI, "phi") and canonical.visible_to(NONE, "deidentified")
    assert canonical.visible_to(LIMITED, "limited") and not canonical.visible_to(PHI, "limited")
    assert not canonical.visible_to(LIMITED, "deidentified")
    assert set(canonical.ENVELOPE_CLASSIFICATION) == {"type", "id", "version", "occurred_at"}


# --- canonical field types and derived values ---------------------------------------------

@pytest.mark.parametrize("value, ok", [
    ("2019", True), ("2019-11", True), ("2019-11-22", True), ("2019-11-22T10:30+02:00", True),
    ("2019-11-22T10:30:15.25Z", True), ("2019-02-30", False), ("2019-11-22T24:00", False),
    ("20191122", False), ("2019-11-22 10:30", False), ("2019-11-22T10:30+15:00", False),
])
def test_timestamp_field(value, ok):
    data = {"service": {"code": {"code": "X"}}, "performed_at": value}
    if ok:
        assert load_event("service.completed", 1, data)["performed_at"] == value
    else:
        with pytest.raises(ValidationError) as caught:
            load_event("service.completed", 1, data)
        assert list(caught.value.messages) == ["performed_at"]


def test_birth_date_is_a_date_only():
    patient = {"id": "1", "identifiers": [{"value": "1"}], "birth_date": "1980-01-01T10:00"}
    with pytest.raises(ValidationError, match="patient.birth_date"):
        load_event("patient.updated", 1, {"patient": patient})


@pytest.mark.parametrize("born, on, band", [
    ("1980-06-15", "2020-06-14", "30-39"), ("1980-06-15", "2020-06-15", "40-49"),
    ("1930-01-01", "2020-01-01", "90+"), ("1931-01-02", "2020-01-01", "80-89"),
    ("2020-01-02", "2020-01-01", None), ("1980", "2020-01-01", None), (None, "2020-01-01", None),
])
def test_age_band(born, on, band):
    assert canonical.age_band(born, on) == band


@pytest.mark.parametrize("postal, country, expected", [
    ("62701", None, "627"), ("62701-1234", "USA", "627"), ("036011234", "US", "000"),
    ("L6G 1C7", "CA", None), ("62701", "DE", None), ("6270", None, None),
])
def test_zip3(postal, country, expected):
    assert canonical.zip3(postal, country) == expected


def test_an_unknown_classification_level_is_refused_even_under_python_O():
    """Schema definitions name their level; a typo must fail loudly (an assert would vanish under -O)."""
    with pytest.raises(ValueError, match="unknown classification"):
        canonical._meta("secretish")
