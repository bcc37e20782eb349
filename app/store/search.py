"""The console's message search by patient: a keyed hash of each message's patient identifier.

`index_patient` runs in ingest's transaction (one marked call in courier.app.ingest.store_plans) and
stores `governance.pseudonym(identifier, "console-patient", COURIER_PSEUDONYM_KEY)` beside the
message id and time, never the identifier. The identifier is PID-3.1 of an HL7 v2 message, or
`data.patient` (a string, or an object's `mrn` / `id`) of a JSON event. Without a key nothing is
indexed and the console says patient search is off: an unkeyed hash of an MRN is reversed by
trying every MRN.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from courier.app.domain import governance
from courier.app.store.models import PatientKey, utcnow

NAMESPACE = "console-patient"  # a search key is no pseudonym sent to a destination


def patient_identifier(document: Any) -> str | None:
    """PID-3.1 of a parsed HL7 message, or data.patient of a JSON event; None if it has none."""
    text = getattr(document, "text", None)
    if isinstance(text, str):  # courier.app.hl7.er7.Hl7Message
        sep, enc = document.field_separator or "|", document.encoding_characters or "^~\\&"
        for segment in text.split("\r"):
            if segment.startswith("PID" + sep):
                fields = segment.split(sep)
                if len(fields) > 3:
                    value = fields[3].split(enc[1] if len(enc) > 1 else "~")[0].split(enc[0])[0].strip()
                    return value or None
        return None
    if isinstance(document, dict):
        patient = document.get("data", {}).get("patient") if isinstance(document.get("data"), dict) else None
        if isinstance(patient, dict):
            patient = patient.get("mrn") or patient.get("id")
        if isinstance(patient, (str, int)) and not isinstance(patient, bool) and str(patient).strip():
            return str(patient).strip()
    return None


def search_key(identifier: str, key: bytes | None = None) -> str | None:
    """The stored form of a patient identifier; None when COURIER_PSEUDONYM_KEY is not set."""
    key = key if key is not None else governance.process_key()
    if key is None or not identifier.strip():
        return None
    return governance.pseudonym(identifier.strip(), NAMESPACE, key)


def index_patient(session: Session, message: Any, created: bool, document: Any) -> None:
    """Store the search key of a newly accepted message's patient (nothing for a duplicate or no patient)."""
    if not created:
        return
    identifier = patient_identifier(document)
    try:
        hashed = search_key(identifier) if identifier else None
    except ValueError:  # a key too short: the configuration check refuses it at start; never fail an ingest on it
        return
    if hashed is not None:
        session.execute(insert(PatientKey.__table__).values(message_id=message.id, patient_key=hashed,
                                                            received_at=utcnow()))


def messages_of(hashed: str):
    """A subquery of the ids of the messages whose patient has this search key."""
    return select(PatientKey.message_id).where(PatientKey.patient_key == hashed)


__all__ = ["index_patient", "patient_identifier", "search_key", "messages_of", "NAMESPACE"]
