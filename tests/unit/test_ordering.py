"""Ordered delivery (`ordered_by`): the key of a JSON event or an HL7 v2 message. The relay's per-key
line and ids in commit order, on the store, are in tests/integration/test_ordering.py."""
from __future__ import annotations

import hashlib

import pytest

from courier.app.hl7 import er7
from courier.app.store import ordering
from tests.support.data import HL7_SAMPLES

EVENT = {"type": "patient.updated", "id": "e1", "data": {"patient_id": "P1", "mrn": 12345,
                                                          "ids": {"primary": "X9"}, "empty": "", "none": None}}


def sample(name: str) -> er7.Hl7Message:
    [message] = er7.parse_all((HL7_SAMPLES / name).read_bytes())
    return message


A01 = sample("microsoft-FHIR-Converter/ADT-A01-01.hl7")  # PID-3 has components and a repetition
A24 = sample("nHapi/segmentfinder_a24.hl7")  # '^' separates fields, '~' components, '|' repetitions


@pytest.mark.parametrize("spec, document, key", [
    ("data.patient_id", EVENT, "P1"),
    ("data.mrn", EVENT, "12345"),  # a number is the same key as its digits
    ("data.ids.primary", EVENT, "X9"),
    ("data.ids", EVENT, '{"primary":"X9"}'),
    ("type", EVENT, "patient.updated"),  # the envelope is the root
    ("data.missing", EVENT, None),
    ("data.patient_id.deeper", EVENT, None),
    ("data.empty", EVENT, None),
    ("data.none", EVENT, None),
    ("PID-3", EVENT, None),  # an HL7 field asked of a JSON event
    ("PID-3", A01, "PATID1234^5^M11^test1&2.16.1&HCD^MR^GOOD HEALTH HOSPITAL~123456789^^^USSSA^SS"),
    ("PID-3.1", A01, "PATID1234"),
    ("PID-3.4", A01, "test1&2.16.1&HCD"),  # a component keeps its subcomponents
    ("MSH-9.1", A01, "ADT"),  # MSH-1 is the separator itself: MSH-9 is the 8th split
    ("MSH-10", A01, "MSG00001"),
    ("PID-3", A24, "11111~~~FOO&&0363~NI~FACILITY ID&200M&L"),  # the first of two PID segments
    ("PID-3.1", A24, "11111"),
    ("PID-5.2", A24, "JOHN"),
    ("PID-99", A01, None),
    ("PID-3.9", A01, None),
    ("ZZZ-1", A01, None),
    ("data.patient_id", A01, None),
])
def test_key_extraction(spec, document, key):
    assert ordering.key_for(spec, document) == key


def test_long_keys_are_hashed_to_fit_the_column():
    long_id = "P" * 300
    assert ordering.key_for("data.patient_id", {"data": {"patient_id": long_id}}) == \
        hashlib.sha256(long_id.encode()).hexdigest()
    assert ordering.key_for("data.patient_id", {"data": {"patient_id": "P" * 255}}) == "P" * 255
