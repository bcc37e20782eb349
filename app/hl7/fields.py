"""HL7 v2 field names, so the console shows a message segment by segment with each field named.

Names from the HL7 v2.5.1 standard's segment definitions (the segments Courier's feeds carry); a
field or segment not listed is shown by its position only. No I/O: plain text in, rows out.
"""
from __future__ import annotations

from dataclasses import dataclass

NAMES: dict[str, tuple[str, ...]] = {
    "MSH": ("Field Separator", "Encoding Characters", "Sending Application", "Sending Facility",
            "Receiving Application", "Receiving Facility", "Date/Time of Message", "Security", "Message Type",
            "Message Control ID", "Processing ID", "Version ID", "Sequence Number", "Continuation Pointer",
            "Accept Acknowledgment Type", "Application Acknowledgment Type", "Country Code", "Character Set",
            "Principal Language of Message"),
    "EVN": ("Event Type Code", "Recorded Date/Time", "Date/Time Planned Event", "Event Reason Code",
            "Operator ID", "Event Occurred", "Event Facility"),
    "PID": ("Set ID", "Patient ID", "Patient Identifier List", "Alternate Patient ID", "Patient Name",
            "Mother's Maiden Name", "Date/Time of Birth", "Administrative Sex", "Patient Alias", "Race",
            "Patient Address", "County Code", "Phone Number - Home", "Phone Number - Business",
            "Primary Language", "Marital Status", "Religion", "Patient Account Number", "SSN Number",
            "Driver's License Number", "Mother's Identifier", "Ethnic Group", "Birth Place",
            "Multiple Birth Indicator", "Birth Order", "Citizenship", "Veterans Military Status", "Nationality",
            "Patient Death Date and Time", "Patient Death Indicator"),
    "PV1": ("Set ID", "Patient Class", "Assigned Patient Location", "Admission Type", "Preadmit Number",
            "Prior Patient Location", "Attending Doctor", "Referring Doctor", "Consulting Doctor",
            "Hospital Service", "Temporary Location", "Preadmit Test Indicator", "Re-admission Indicator",
            "Admit Source", "Ambulatory Status", "VIP Indicator", "Admitting Doctor", "Patient Type",
            "Visit Number", "Financial Class"),
    "NK1": ("Set ID", "Name", "Relationship", "Address", "Phone Number", "Business Phone Number",
            "Contact Role"),
    "ORC": ("Order Control", "Placer Order Number", "Filler Order Number", "Placer Group Number",
            "Order Status", "Response Flag", "Quantity/Timing", "Parent", "Date/Time of Transaction",
            "Entered By", "Verified By", "Ordering Provider"),
    "OBR": ("Set ID", "Placer Order Number", "Filler Order Number", "Universal Service Identifier",
            "Priority", "Requested Date/Time", "Observation Date/Time", "Observation End Date/Time",
            "Collection Volume", "Collector Identifier", "Specimen Action Code", "Danger Code",
            "Relevant Clinical Information", "Specimen Received Date/Time", "Specimen Source",
            "Ordering Provider"),
    "OBX": ("Set ID", "Value Type", "Observation Identifier", "Observation Sub-ID", "Observation Value",
            "Units", "References Range", "Abnormal Flags", "Probability", "Nature of Abnormal Test",
            "Observation Result Status", "Effective Date of Reference Range", "User Defined Access Checks",
            "Date/Time of the Observation", "Producer's ID", "Responsible Observer", "Observation Method"),
    "FT1": ("Set ID", "Transaction ID", "Transaction Batch ID", "Transaction Date", "Transaction Posting Date",
            "Transaction Type", "Transaction Code", "Transaction Description", "Transaction Description - Alt",
            "Transaction Quantity", "Transaction Amount - Extended", "Transaction Amount - Unit",
            "Department Code", "Insurance Plan ID", "Insurance Amount", "Assigned Patient Location",
            "Fee Schedule", "Patient Type", "Diagnosis Code", "Performed By Code", "Ordered By Code",
            "Unit Cost", "Filler Order Number", "Entered By Code", "Procedure Code"),
    "DG1": ("Set ID", "Diagnosis Coding Method", "Diagnosis Code", "Diagnosis Description",
            "Diagnosis Date/Time", "Diagnosis Type"),
    "AL1": ("Set ID", "Allergen Type Code", "Allergen Code/Mnemonic/Description", "Allergy Severity Code",
            "Allergy Reaction Code", "Identification Date"),
    "IN1": ("Set ID", "Insurance Plan ID", "Insurance Company ID", "Insurance Company Name",
            "Insurance Company Address"),
    "MSA": ("Acknowledgment Code", "Message Control ID", "Text Message", "Expected Sequence Number",
            "Delayed Acknowledgment Type", "Error Condition"),
    "ERR": ("Error Code and Location", "Error Location", "HL7 Error Code", "Severity"),
    "NTE": ("Set ID", "Source of Comment", "Comment", "Comment Type"),
    "SCH": ("Placer Appointment ID", "Filler Appointment ID", "Occurrence Number", "Placer Group Number",
            "Schedule ID", "Event Reason", "Appointment Reason", "Appointment Type", "Appointment Duration"),
    "MRG": ("Prior Patient Identifier List", "Prior Alternate Patient ID", "Prior Patient Account Number",
            "Prior Patient ID", "Prior Visit Number"),
}


@dataclass(frozen=True)
class Field:
    position: str  # "PID-5"
    name: str
    value: str


@dataclass(frozen=True)
class Segment:
    name: str
    fields: list[Field]


def field_name(segment: str, number: int) -> str:
    names = NAMES.get(segment, ())
    return names[number - 1] if 0 < number <= len(names) else ""


def segments(text: str) -> list[Segment]:
    """Each segment of an ER7 message with its non-empty fields, numbered and named as HL7 numbers them."""
    lines = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
    sep = lines[0][3] if lines and lines[0].startswith("MSH") and len(lines[0]) > 3 else "|"
    out = []
    for line in lines:
        name, *values = line.split(sep)
        if name == "MSH":  # MSH-1 is the separator itself, so MSH's values start at MSH-2
            values = [sep, *values]
        fields = [Field(f"{name}-{n}", field_name(name, n), v) for n, v in enumerate(values, 1) if v != ""]
        out.append(Segment(name, fields))
    return out


__all__ = ["NAMES", "Field", "Segment", "field_name", "segments"]
