"""courier.app.hl7.er7 against the real samples in tests/data/hl7 (driven by SOURCES.tsv), unit cases and fuzzing.

Where SOURCES.tsv's `kind` and Courier's reading of a file differ, the file is listed
below with the reason; every other file must behave exactly as its row says.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import pickle
import re
import threading
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from courier.app.hl7.er7 import (
    KNOWN_VERSIONS,
    Hl7Error,
    ack_code,
    Hl7Message,
    build_ack,
    decode,
    parse,
    parse_ack,
    parse_all,
    parse_stored,
    salvage_header,
    split,
)
from tests.support.data import HL7_SAMPLES

SAMPLES = HL7_SAMPLES
ROWS = list(csv.DictReader((SAMPLES / "SOURCES.tsv").open(encoding="utf-8"), delimiter="\t")) \
    if (SAMPLES / "SOURCES.tsv").exists() else []
BAD_INPUTS = sorted(p for p in (SAMPLES / "nHapi" / "BadInputs").rglob("*") if p.is_file())


def rows(*kinds: str) -> list[pytest.param]:
    return [pytest.param(r, id=r["file"]) for r in ROWS if r["kind"] in kinds]


def read(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


# --- per-file decisions where SOURCES.tsv's label and Courier disagree -------------------

# Labelled `valid`, refused: python-hl7's delimiter fixture stops after MSH-3, so there is
# no message type to route on and no control id to deduplicate or acknowledge.
VALID_BUT_REFUSED = {
    "python-hl7/test_parse.py__nonstd.hl7": "MSH-9 (message type) is empty",
}

# Batches refused as a whole (issue 19: counts are checked): {file: reason}.
BATCH_REFUSED = {
    # The converter's expected output says BTS|1 for the two messages it holds.
    "microsoft-FHIR-Converter/BundleToHl7v2.hl7": "BTS-1 (batch message count) says 1 messages, 2 were received",
    "courier/batch_bts_count_wrong.hl7": "BTS-1 (batch message count) says 3 messages, 2 were received",
}

# Labelled `malformed`, accepted: the message is syntactically sound; it only fails the
# IHE PDQ profile (PID-3 without assigning authority), and Courier validates no profiles.
MALFORMED_BUT_ACCEPTED = {"hl7apy/test_parser.py__invalid_rsp_k21.hl7": "HL7v2:RSP^K22",
                          # '^~\&#' in a v2.5.1 lab feed: every mainstream parser takes the truncation
                          # character in any version, and so does Courier (issue 19).
                          "elixir-hl7/examples.ex__elr_example.hl7": "HL7v2:ORU^R01"}

# Batches that split as labelled but hold messages Courier refuses: {message number: reason}.
BATCH_MEMBERS_REFUSED = {
    # python-hl7's mllp_send fixture: 'MSH|^~\&|1' has neither type nor control id.
    "python-hl7/test_client.py__two_messages_crlf.hl7": {1: "MSH-9 (message type) is empty",
                                                          2: "MSH-9 (message type) is empty"},
    # Messages 5 and 7 ('MSH|^~\&|HIS|ASE|LIS|Rapela|||OML^O21||T|2.5') have no MSH-10.
    "nHapi/OML_O21_messages.txt": {5: "MSH-10 (message control id) is empty",
                                   7: "MSH-10 (message control id) is empty"},
}

# Why each hand-made malformed file is refused (a substring of str(Hl7Error)); the
# fuzzer-found nHapi/BadInputs files only have to be refused, for whatever reason.
MALFORMED_REASON = {
    "python-hl7/samples.py__sample_bad_batch.hl7": "no MSH segment",
    "python-hl7/samples.py__sample_bad_batch1.hl7": "segment 4 (BHS): BHS inside a batch",
    "python-hl7/samples.py__sample_bad_file.hl7": "no MSH segment",
    "python-hl7/samples.py__sample_bad_file1.hl7": "segment 5 (BHS): BHS inside a batch",
    "python-hl7/samples.py__sample_bad_file2.hl7": "segment 5 (FHS): FHS is only allowed once",
    "python-hl7/samples.py__sample_bad_file3.hl7": "no MSH segment",
    "python-hl7/test_parse.py__cp1252.hl7": "field 9: MSH-9 (message type) is empty",  # truncated MSH
    "hl7apy/test_parser.py__missing_enc_chars.hl7": "field 2: MSH-2",
    "hl7apy/test_parser.py__three_enc_chars_v27.hl7": "field 2: MSH-2",
    "hl7apy/test_parser.py__too_few_enc_chars.hl7": "field 2: MSH-2",
    "hl7apy/test_parser.py__too_many_enc_chars.hl7": "field 2: MSH-2",
    "hl7apy/test_parser.py__six_enc_chars_v27.hl7": "field 2: MSH-2",
    "hl7apy/test_parser.py__dup_enc_chars.hl7": "field 2: MSH-2 (encoding characters) repeats",
    "hl7apy/test_parser.py__dup_enc_chars_v27.hl7": "field 2: MSH-2",
    "hl7apy/test_parser.py__empty_msh9.hl7": "field 9: MSH-9 (message type) is empty",
    "hl7apy/test_parser.py__truncated_msh9.hl7": "field 9: MSH-9.2 (trigger event) is empty",
    "hl7apy/test_parser.py__no_version.hl7": "field 10: MSH-10 (message control id) is empty",
    # 'MSH|^~\\&': the escape character doubled, as if copied from a source-code string.
    "LinuxForHealth-hl7v2-fhir-converter/sample_unix.hl7": "field 2: MSH-2 (encoding characters) repeats",
    "LinuxForHealth-hl7v2-fhir-converter/sample_win.hl7": "field 2: MSH-2 (encoding characters) repeats",
    # Courier's own (tests/data/hl7/courier), one per rule of docs/hl7.md.
    "courier/no_version.hl7": "field 12: MSH-12 (version id) is empty",
    "courier/version_1_0.hl7": "field 12: MSH-12 (version id) '1.0' is not an HL7 v2 version",
    "courier/utf8_declared_latin1_bytes.hl7": "field 18: byte 140 is not valid UNICODE UTF-8",
    "courier/unsupported_charset.hl7": "field 18: MSH-18 (character set) 'ISO IR87' is not one Courier can decode",
    "courier/duplicate_enc_chars_v251.hl7": "field 2: MSH-2 (encoding characters) repeats",
}


def raw_msh(data: bytes) -> tuple[str, str, list[str]]:
    """(field separator, component separator, MSH fields) read straight from the bytes, not via courier.app.hl7.er7."""
    text = data.decode("utf-8-sig", errors="replace")
    line = next(l for l in re.split(r"\r\n|\r|\n", text) if l.startswith("MSH"))
    return line[3], line[4], line.split(line[3])


def expected_type(msh9: str, component: str) -> str:
    code, _, rest = msh9.partition(component)
    return f"HL7v2:{code}^{rest.split(component)[0]}"


def run_within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails if it has not returned after `seconds` (pytest-timeout is not installed)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds}s"
    return outcome


# --- the sample corpus ---------------------------------------------------------------------

def test_samples_are_present():
    assert len(ROWS) > 200, f"SOURCES.tsv not found or short under {SAMPLES}"
    assert len(BAD_INPUTS) >= 30


def test_every_decision_names_a_real_row():
    labelled = {r["file"]: r["kind"] for r in ROWS}
    for name in VALID_BUT_REFUSED:
        assert labelled[name] == "valid"
    for name in MALFORMED_BUT_ACCEPTED:
        assert labelled[name] == "malformed"
    for name in [*BATCH_MEMBERS_REFUSED, *BATCH_REFUSED]:
        assert labelled[name] == "batch"
    for name in MALFORMED_REASON:
        assert labelled[name] == "malformed"
    undecided = [n for n, k in labelled.items() if k == "malformed" and not n.startswith("nHapi/BadInputs/")
                 and n not in MALFORMED_REASON and n not in MALFORMED_BUT_ACCEPTED]
    assert undecided == []


@pytest.mark.parametrize("row", rows("valid"))
def test_valid_sample_parses_to_one_message(row):
    data = read(row["file"])
    if row["file"] in VALID_BUT_REFUSED:
        with pytest.raises(Hl7Error, match=re.escape(VALID_BUT_REFUSED[row["file"]])):
            parse_all(data)
        return
    [message] = parse_all(data)
    sep, component, fields = raw_msh(data)
    assert message.message_type == expected_type(row["msh9_types"], component)
    assert message.control_id == fields[9]
    assert message.version == fields[11].split(component)[0] == row["msh12_versions"]
    assert message.field_separator == sep
    assert message.text.startswith("MSH" + sep) and "\n" not in message.text
    assert not message.text.endswith("\r")
    assert message.text.count("\r") + 1 == len([l for l in re.split(rb"\r\n|\r|\n", data) if l.strip()])


@pytest.mark.parametrize("row", rows("batch"))
def test_batch_sample_splits_and_parses(row):
    data = read(row["file"])
    if row["file"] in BATCH_REFUSED:
        for refuse in (lambda: split(decode(data)), lambda: parse_all(data)):
            with pytest.raises(Hl7Error, match=re.escape(BATCH_REFUSED[row["file"]])) as err:
                refuse()
            assert err.value.location == ("BTS", None, 1, None) and err.value.error_code == "100"
        return
    parts = split(decode(data))
    assert len(parts) == int(row["msh_count"])
    assert all(p.startswith("MSH") for p in parts)
    assert not any(p.startswith(("FHS", "BHS", "BTS", "FTS")) or re.search(r"\r(FHS|BHS|BTS|FTS)", p)
                   for p in parts)
    refused = BATCH_MEMBERS_REFUSED.get(row["file"], {})
    sep, component, _ = raw_msh(data)
    types = {expected_type(t, component) for t in row["msh9_types"].split(";") if t}
    for number, part in enumerate(parts, 1):
        if number in refused:
            with pytest.raises(Hl7Error, match=re.escape(refused[number])):
                parse(part)
        else:
            assert parse(part).message_type in types
    if refused:
        with pytest.raises(Hl7Error, match=rf"^message {min(refused)}, "):
            parse_all(data)
    else:
        messages = parse_all(data)
        assert [m.control_id for m in messages] == [parse(p).control_id for p in parts]
        assert all(m.raw in data for m in messages)
        if len({m.charset for m in messages}) == 1:  # else decode() reads them all in the first one's
            assert [m.text for m in messages] == parts
        else:  # each read in its own: no mojibake (UTF-8 read as 8859/1 shows as 'Ã')
            assert not any("\u00c3" in m.text or "\ufffd" in m.text for m in messages)
            assert [m.text for m in messages][:1] == parts[:1]


@pytest.mark.parametrize("row", rows("malformed"))
def test_malformed_sample_is_refused_with_hl7error_only(row):
    data = read(row["file"])
    if row["file"] in MALFORMED_BUT_ACCEPTED:
        [message] = parse_all(data)
        assert message.message_type == MALFORMED_BUT_ACCEPTED[row["file"]]
        return
    outcome = run_within(5, parse_all, data)
    assert "value" not in outcome, f"accepted: {outcome.get('value')}"
    assert isinstance(outcome["error"], Hl7Error), repr(outcome["error"])
    expected = MALFORMED_REASON.get(row["file"])
    if expected is not None:
        assert expected in str(outcome["error"])
    assert outcome["error"].reason and outcome["error"].where


@pytest.mark.parametrize("row", rows("fragment", "json", "fhir", "fhir-r4-json"))
def test_non_messages_are_refused(row):
    assert row["kind"] in ("fragment", "json", "fhir", "fhir-r4-json")
    with pytest.raises(Hl7Error, match="no MSH segment"):
        parse_all(read(row["file"]))


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(SAMPLES))) for p in BAD_INPUTS])
def test_fuzzer_found_inputs_fail_fast_and_cleanly(path):
    data = path.read_bytes()
    outcome = run_within(5, parse_all, data)
    assert isinstance(outcome.get("error"), Hl7Error), outcome
    salvaged = run_within(5, salvage_header, data)
    assert "error" not in salvaged, salvaged
    ack = build_ack(salvaged["value"], "AR", text=str(outcome["error"]), error_code=outcome["error"].error_code)
    assert parse_ack(ack)[0] == "AR"
    parse(ack)


# --- decode --------------------------------------------------------------------------------

MSH = "MSH|^~\\&|SEND|SFAC|RECV|RFAC|20240101120000||ADT^A01^ADT_A01|CTRL-1|P|2.5"


def test_decode_strips_bom_even_after_mllp_start_byte():
    assert decode(b"\xef\xbb\xbf" + MSH.encode()) == MSH
    assert decode(b"\x0b\xef\xbb\xbf" + MSH.encode()).lstrip("\x0b") == MSH


def test_decode_utf8_first():
    assert decode((MSH + "\rPID|||1||Müller").encode()).endswith("Müller")


def test_decode_falls_back_to_cp1252():
    text = decode(read("python-hl7/test_parse.py__cp1252.hl7"))
    assert text == "MSH|^~\\&|GHH LAB|ELAB\u20133"  # 0x96 is an en dash in cp1252


def test_decode_uses_charset_declared_in_msh18():
    msh = MSH + "||||||8859/7"
    # 0xE1 is Greek alpha in ISO 8859-7 but a-acute in cp1252: proves MSH-18 won.
    assert decode(msh.encode() + b"\rPID|||1||\xe1").endswith("\u03b1")
    assert decode((MSH + "||||||8859/1").encode() + b"\rPID|||1||\xe9").endswith("\u00e9")


def test_decode_ignores_declared_codecs_that_rewrite_text():
    raw = (MSH + "||||||unicode_escape").encode() + b"\rNTE|1||a\\r\\nb \xe9"
    assert decode(raw).endswith("a\\r\\nb \u00e9")  # cp1252, backslashes untouched


def test_decode_last_resort_latin1_never_raises():
    assert decode(MSH.encode() + b"\x81\x8d").endswith("\x81\x8d")  # undefined in cp1252


def test_decode_refuses_nul_and_non_hl7():
    with pytest.raises(Hl7Error) as err:
        decode(b"MSH|^~\\&|\x00")
    assert err.value.where == "byte 9"
    with pytest.raises(Hl7Error, match="no MSH"):
        decode(b'{"type": "service.completed"}')
    with pytest.raises(Hl7Error, match="no MSH"):
        decode(b"")
    with pytest.raises(TypeError):
        decode("MSH|")  # type: ignore[arg-type]


# --- split ---------------------------------------------------------------------------------

PID = "PID|1||123^^^HOSP^MR||DOE^JOHN"
PV1 = "PV1|1|I"


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_split_normalises_terminators(terminator):
    text = terminator.join([MSH, PID, PV1]) + terminator
    assert split(text) == ["\r".join([MSH, PID, PV1])]


def test_split_mixed_terminators_blank_lines_and_framing():
    text = "\x0b\n" + MSH + "\r\n" + PID + "\n\n  \r" + PV1 + "\r\x1c\r"
    assert split(text) == ["\r".join([MSH, PID, PV1])]


def test_split_bare_msh_after_msh():
    second = MSH.replace("CTRL-1", "CTRL-2")
    assert split("\n".join([MSH, PID, second, PID])) == [f"{MSH}\r{PID}", f"{second}\r{PID}"]


def test_split_removes_file_and_batch_envelopes():
    second = MSH.replace("CTRL-1", "CTRL-2")
    text = "\r".join(["FHS|^~\\&|X", "BHS|^~\\&|X", MSH, PID, "BTS|1", "BHS|^~\\&|Y", second, "BTS|1", "FTS|2"])
    assert split(text) == [f"{MSH}\r{PID}", second]


@pytest.mark.parametrize("text, reason", [
    (f"EVN|A01\r{MSH}", "segment outside a message"),
    (f"BHS|^~\\&\rEVN|A01\r{MSH}", "segment outside a message"),
    (f"{MSH}\rBTS|1\rPID|1", "segment outside a message"),
    (f"{MSH}\rFTS|\r{MSH}", "after the file trailer"),
    (f"{MSH}\rFTS|2", r"FTS-1 \(file batch count\) says 2 batches, 1 were received"),
    (f"BHS|^~\\&\r{MSH}\rBTS|2", r"BTS-1 \(batch message count\) says 2 messages, 1 were received"),
    (f"BHS|^~\\&\r{MSH}\rBTS|x", r"BTS-1 \(batch message count\) is not a number"),
    (f"BHS|^~\\&\r{MSH}\rBHS|^~\\&", "BHS inside a batch"),
    (f"FHS|^~\\&\r{MSH}\rFHS|^~\\&", "FHS is only allowed once"),
    ("FHS|^~\\&\rBHS|^~\\&\rBTS|0\rFTS|1", "no MSH"),
    ("\r\n \n", "empty input"),
])
def test_split_refuses_broken_structure(text, reason):
    with pytest.raises(Hl7Error, match=reason):
        split(text)


# --- parse ---------------------------------------------------------------------------------

def test_parse_reads_the_header():
    message = parse(f"{MSH}\r{PID}")
    assert message == Hl7Message(
        text=f"{MSH}\r{PID}", message_type="HL7v2:ADT^A01", control_id="CTRL-1", version="2.5",
        sending_application="SEND", sending_facility="SFAC", receiving_application="RECV",
        receiving_facility="RFAC", field_separator="|", encoding_characters="^~\\&", processing_id="P")


def test_parse_takes_first_components_and_keeps_escapes_raw():
    text = "MSH|^~\\&|APP^1.2.3^ISO|FAC|||||ORU^R01^ORU_R01|ID\\F\\1|T^A|2.5.1^USA"
    message = parse(text)
    assert (message.sending_application, message.processing_id, message.version) == ("APP", "T", "2.5.1")
    assert message.control_id == "ID\\F\\1"  # echoed byte for byte in MSA-2, so kept escaped


def test_parse_accepts_lf_and_surrounding_junk():
    assert parse(f"\ufeff {MSH}\n{PID}\n\n").text == f"{MSH}\r{PID}"


@pytest.mark.parametrize("text, message_type, encoding", [
    ("MSH$%~\\&$A$B$C$D$$$ADT%A01$X1$P$2.5\rPID$$$555%%%L", "HL7v2:ADT^A01", "%~\\&"),
    ("MSH^~|\\&^A^B^C^D^^^ADT~A24^X1^T^2.4\rEVN^A24", "HL7v2:ADT^A24", "~|\\&"),  # '^' as field separator
    ("MSH|*~\\&|A|B|C|D|||ADT*A01*ADT_A01|X1|P|2.5", "HL7v2:ADT^A01", "*~\\&"),
])
def test_parse_non_default_delimiters(text, message_type, encoding):
    message = parse(text)
    assert (message.message_type, message.control_id, message.encoding_characters) == (message_type, "X1", encoding)


@pytest.mark.parametrize("version", ["2.1", "2.3", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.9"])
def test_truncation_character_is_accepted_and_kept_in_any_version(version):
    message = parse(f"MSH|^~\\&#|A|B|C|D|||ADT^A01|X1|P|{version}\rPID|||1||A#B")
    assert (message.encoding_characters, message.version) == ("^~\\&#", version)
    assert message.text.endswith("A#B")
    ack = parse(build_ack(message, "AA"))
    assert (ack.encoding_characters, ack.version) == ("^~\\&#", version)


@pytest.mark.parametrize("encoding, reason, code", [
    ("", "MSH-2 (encoding characters) is missing", "101"),
    ("^~", "MSH-2 (encoding characters) has 2 characters; 4 are needed", "102"),
    ("^~\\", "has 3 characters; 4 are needed", "102"),
    ("^~\\&#!", "has 6 characters; at most 5", "102"),
    ("^^\\&", "repeats a delimiter", "102"),
    ("^~\\&^", "repeats a delimiter", "102"),
    ("^~\\&a", "not a printable ASCII non-alphanumeric", "102"),
])
def test_bad_encoding_characters_are_refused_with_a_reason(encoding, reason, code):
    with pytest.raises(Hl7Error, match=re.escape(reason)) as err:
        parse(f"MSH|{encoding}|A|B|C|D|||ADT^A01|X1|P|2.5")
    assert (err.value.where, err.value.error_code, err.value.location) == (
        "segment 1 (MSH), field 2", code, ("MSH", 1, 2, None))


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
                                     "2.8", "2.8.1", "2.8.2", "2.9", "2.5.1^DEU"])
def test_every_v2_version_is_accepted(version):
    assert parse(f"MSH|^~\\&|A|B|C|D|||ADT^A01|X1|P|{version}").version == version.split("^")[0]


@pytest.mark.parametrize("version", ["", "1.0", "2.0", "2.10", "3.0", "2.5.2", "2.x", " ", "^DEU"])
def test_missing_or_unknown_version_is_refused_203(version):
    with pytest.raises(Hl7Error, match=r"MSH-12 \(version id\)") as err:
        parse(f"MSH|^~\\&|A|B|C|D|||ADT^A01|X1|P|{version}")
    assert (err.value.error_code, err.value.location) == ("203", ("MSH", 1, 12, None))


def test_ack_without_trigger_is_allowed_other_types_are_not():
    assert parse("MSH|^~\\&|A|B|C|D|||ACK|X1|P|2.3\rMSA|AA|1").message_type == "HL7v2:ACK"
    with pytest.raises(Hl7Error, match=re.escape("MSH-9.2 (trigger event) is empty")):
        parse("MSH|^~\\&|A|B|C|D|||ADT|X1|P|2.3")


def test_empty_control_id_is_refused_with_where():
    with pytest.raises(Hl7Error) as err:
        parse("MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5")
    assert err.value.reason == "MSH-10 (message control id) is empty"
    assert err.value.where == "segment 1 (MSH), field 10"
    assert str(err.value) == "segment 1 (MSH), field 10: MSH-10 (message control id) is empty"
    assert err.value.error_code == "101"


@pytest.mark.parametrize("text, where", [
    ("PID|1", "segment 1"),
    ("MSH", "segment 1 (MSH), field 1"),
    ("MSHA^~\\&|", "segment 1 (MSH), field 1"),
    ("MSH|^~\\&", "segment 1 (MSH), field 9"),
    ("MSH|^~\\|", "segment 1 (MSH), field 2"),
    ("MSH|^~\\&&|A", "segment 1 (MSH), field 2"),
    ("MSH|^~|&|A", "segment 1 (MSH), field 2"),
    ("MSH|^~\\a|A", "segment 1 (MSH), field 2"),
    ("MSH|^~\\&|||||||AD T^A01|1", "segment 1 (MSH), field 9"),
    (f"{MSH}\rpid|1", "segment 2 (pid)"),
    (f"{MSH}\rPI|1", "segment 2 (PI|)"),
    (f"{MSH}\r1ID|1", "segment 2 (1ID)"),
    (f"{MSH}\rPIDX|1", "segment 2 (PID)"),
    (f"{MSH}\r{MSH}", "segment 2 (MSH)"),
    (f"{MSH}\rBTS|1", "segment 2 (BTS)"),
    (f"{MSH}\rNTE|1||a\x1cb", "segment 2 (NTE)"),
    (MSH.replace("CTRL-1", "C" * 200), "segment 1 (MSH), field 10"),
    (MSH.replace("CTRL-1", "C\x07"), "segment 1 (MSH), field 10"),
])
def test_parse_errors_say_where(text, where):
    with pytest.raises(Hl7Error) as err:
        parse(text)
    assert err.value.where == where


def test_hl7error_is_a_valueerror_and_pickles():
    err = Hl7Error("MSH-9 (message type) is empty", "segment 1 (MSH), field 9", "101")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.where, copy.error_code, str(copy)) == (err.reason, err.where, "101", str(err))


def test_parse_all_names_the_message_of_a_batch():
    bad = MSH.replace("CTRL-1", "")
    with pytest.raises(Hl7Error) as err:
        parse_all(f"{MSH}\r{bad}".encode())
    assert err.value.where == "message 2, segment 1 (MSH), field 10"


# --- ACKs ----------------------------------------------------------------------------------

ACK_SAMPLES = [
    "microsoft-FHIR-Converter/ADT-A01-01.hl7",
    "microsoft-FHIR-Converter/ADT01-23.hl7",
    "elixir-hl7/examples.ex__wikipedia_sample_hl7_alt_delimiters.hl7",
    "nHapi/segmentfinder_a24.hl7",
    "hl7apy/test_parser.py__rsp_k21_27.hl7",
    "HL7-dotnetcore/Sample-ORM.txt",
]
NOW = datetime(2024, 5, 6, 7, 8, 9)


def fields_of(segment: str, sep: str) -> list[str]:
    return segment.split(sep)


@pytest.mark.parametrize("name", ACK_SAMPLES)
@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_ack_round_trips_and_answers_the_message(name, code):
    [message] = parse_all(read(name))
    ack_text = build_ack(message, code, text="why", now=NOW, control_id="ACK-1")
    assert ack_text.endswith("\r") and "\n" not in ack_text
    ack = parse(ack_text)
    sep, comp = message.field_separator, message.encoding_characters[0]
    assert ack.field_separator == sep and ack.encoding_characters == message.encoding_characters
    assert ack.message_type == f"HL7v2:ACK^{message.message_type.split('^')[1]}"
    assert (ack.sending_application, ack.sending_facility) == (message.receiving_application,
                                                               message.receiving_facility)
    assert (ack.receiving_application, ack.receiving_facility) == (message.sending_application,
                                                                   message.sending_facility)
    assert (ack.control_id, ack.version, ack.processing_id) == ("ACK-1", message.version, message.processing_id)
    msh, msa = (fields_of(s, sep) for s in ack.text.split("\r")[:2])
    assert msh[6] == "20240506070809"
    assert msh[8].split(comp)[2] == "ACK"
    assert msa == ["MSA", code, message.control_id, "why"]
    assert parse_ack(ack_text) == (code, message.control_id, "why")
    segment_ids = [s[:3] for s in ack.text.split("\r")]
    if code in ("AA", "CA"):
        assert segment_ids == ["MSH", "MSA"]
    else:
        assert segment_ids == ["MSH", "MSA", "ERR"]
        err = fields_of(ack.text.split("\r")[2], sep)
        if message.version in ("2.1", "2.2", "2.3", "2.3.1", "2.4"):  # ERR-1 only (ELD)
            sub = message.encoding_characters[3]
            assert err[1:] == [comp.join(["", "", "", sub.join(["207", "Application internal error", "HL70357"])])]
        else:
            assert err[3].split(comp) == ["207", "Application internal error", "HL70357"]
            assert (err[1], err[2], err[4], err[8]) == ("", "", "E", "why")


def test_ack_keeps_whole_hd_fields_of_sender_and_receiver():
    [message] = parse_all(read("microsoft-FHIR-Converter/ORU-R01-01.hl7"))
    _, _, original = raw_msh(message.text.encode())
    msh = build_ack(message, "AA").split("\r")[0].split("|")
    assert msh[2:6] == [original[4], original[5], original[2], original[3]]


def test_ack_text_cannot_inject_segments_or_fields():
    [message] = parse_all(read("elixir-hl7/examples.ex__wikipedia_sample_hl7_alt_delimiters.hl7"))
    evil = "bad|thing\rMSA|AA|01052901\nZZZ|x*y~z\\w&v\x0b\x1c"
    ack_text = build_ack(message, "AR", text=evil, error_code="200")
    segments = ack_text.rstrip("\r").split("\r")
    assert [s[:3] for s in segments] == ["MSH", "MSA", "ERR"]
    assert len(segments[1].split("|")) == 4 and len(segments[2].split("|")) == 9
    assert "\x0b" not in ack_text and "\x1c" not in ack_text
    assert segments[1].split("|")[3] == "bad\\F\\thing MSA\\F\\AA\\F\\01052901 ZZZ\\F\\x\\S\\y\\R\\z\\E\\w\\T\\v  "
    code, control_id, text = parse_ack(ack_text)
    assert (code, control_id) == ("AR", "01052901")
    assert text == "bad|thing MSA|AA|01052901 ZZZ|x*y~z\\w&v  "
    assert segments[2].split("|")[3] == "200*Unsupported message type*HL70357"


def test_ack_truncates_long_text():
    message = parse(MSH)
    segments = build_ack(message, "AE", text="x" * 1000).split("\r")
    assert segments[1].split("|")[3] == "x" * 80
    assert segments[2].split("|")[8] == "x" * 250


def test_ack_without_a_message_uses_defaults():
    ack_text = build_ack(None, "AR", text="unparseable", error_code="100", now=NOW)
    ack = parse(ack_text)
    assert (ack.field_separator, ack.encoding_characters, ack.version) == ("|", "^~\\&", "2.5")
    assert ack.message_type == "HL7v2:ACK" and len(ack.control_id) == 20
    assert parse_ack(ack_text) == ("AR", "", "unparseable")


def test_ack_control_ids_are_fresh():
    message = parse(MSH)
    assert parse(build_ack(message, "AA")).control_id != parse(build_ack(message, "AA")).control_id


def test_ack_arguments_are_checked():
    message = parse(MSH)
    with pytest.raises(ValueError):
        build_ack(message, "OK")
    with pytest.raises(ValueError):
        build_ack(message, "AA", error_code="207")


def test_real_v251_lab_feed_with_truncation_character_is_accepted():
    [message] = parse_all(read("elixir-hl7/examples.ex__elr_example.hl7"))
    assert (message.control_id, message.encoding_characters, message.version) == ("PHELR.1.45543", "^~\\&#", "2.5.1")
    ack = parse(build_ack(message, "AA"))
    assert ack.encoding_characters == "^~\\&#" and ack.version == "2.5.1"


@pytest.mark.parametrize("name, control_id", [
    ("hl7apy/test_parser.py__truncated_msh9.hl7", ""),
    ("hl7apy/test_parser.py__empty_msh9.hl7", "0123456789"),
    ("python-hl7/test_parse.py__nonstd.hl7", ""),
])
def test_salvaged_header_addresses_reject_acks(name, control_id):
    data = read(name)
    with pytest.raises(Hl7Error):
        parse_all(data)
    salvaged = salvage_header(data)
    assert salvaged is not None
    assert parse_ack(build_ack(salvaged, "AR"))[:2] == ("AR", control_id)


def test_salvage_gives_up_on_garbage():
    assert salvage_header(b"\x00\x01garbage") is None
    assert salvage_header("MSH0000|x") is None


def test_parse_ack_reads_err_when_msa3_is_empty():
    remote = "MSH|^~\\&|B|B|A|A|20240101||ACK^A01^ACK|9|P|2.5\rMSA|AE|CTRL-1\rERR||||E||||disk \\T\\ full"
    assert parse_ack(remote) == ("AE", "CTRL-1", "disk & full")
    remote_old = "MSH|^~\\&|B|B|A|A|20240101||ACK|9|P|2.3\rMSA|ar|CTRL-1\rERR|^^^207&Internal error"
    assert parse_ack(remote_old) == ("AR", "CTRL-1", "")


def test_parse_ack_refuses_non_acks():
    with pytest.raises(Hl7Error, match="no MSA"):
        parse_ack(MSH)
    with pytest.raises(Hl7Error, match="MSA-1"):
        parse_ack(f"{MSH}\rMSA|OK|CTRL-1")
    with pytest.raises(Hl7Error):
        parse_ack("garbage")


def test_parse_ack_does_not_log_field_contents(caplog):
    caplog.set_level(logging.DEBUG)
    text = parse_ack(f"{MSH}\rMSA|AE|CTRL-1|secret \\Q1\\ \\.spX\\ patient")[2]
    assert text.startswith("secret")
    assert "secret" not in caplog.text


# --- fuzzing -------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = [read(r["file"]) for r in ROWS if r["kind"] in ("valid", "batch") and (SAMPLES / r["file"]).stat().st_size
         < 4000] or [MSH.encode()]
SPECIAL = b"|^~\\&#$*%\r\n\x0b\x1c\x00 MSHBTSFHS0\xef\xbb\xbf\x96\xff"


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        # Half the edits hit the MSH, where the delimiters and header fields live.
        limit = min(len(data), 120) if draw(st.booleans()) else len(data)
        at = draw(st.integers(0, limit))
        byte = draw(st.sampled_from(SPECIAL) | st.integers(0, 255))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        if edit == "insert":
            data[at:at] = bytes([byte])
        elif at < len(data):
            data[at:at + 1] = b"" if edit == "delete" else bytes([byte])
    return bytes(data)


def check_accepts_or_refuses_cleanly(data: bytes) -> None:
    try:
        messages = parse_all(data)
    except Hl7Error as err:
        assert err.reason and err.where
        salvaged = salvage_header(data)
        ack_text = build_ack(salvaged, "AR", text=str(err), error_code=err.error_code, location=err.location)
        assert parse_ack(ack_text)[0] == "AR"
        if salvaged is None or salvaged.version in KNOWN_VERSIONS:
            parse(ack_text)
        return
    assert messages
    for message in messages:
        assert dataclasses.replace(parse(message.text), charset=message.charset) == message
        assert message.raw and message.raw in data  # stored as received
        ack_text = build_ack(message, "AE", text="x|y\rz")
        ack = parse(ack_text)
        assert ack.encoding_characters[:4] == message.encoding_characters[:4]
        assert parse_ack(ack_text) == ("AE", message.control_id, "x|y z")


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data):
    check_accepts_or_refuses_cleanly(data)


@FUZZ
@given(st.binary(max_size=300).map(lambda tail: b"MSH|^~\\&|" + tail))
def test_fuzz_bytes_after_an_msh_start(data):
    check_accepts_or_refuses_cleanly(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_real_messages(data):
    check_accepts_or_refuses_cleanly(data)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_text_entry_points(text):
    for fn in (split, parse, parse_ack):
        try:
            fn(text)
        except Hl7Error:
            pass
    salvage_header(text)


# --- issue 19: bytes as received, charsets, enhanced acknowledgment, ERR -------------------------

LATIN1 = (MSH + "||||||8859/1").encode() + b"\rPID|||1||M\xfcller\r"


def test_parse_all_keeps_each_messages_bytes_as_received():
    second = (MSH.replace("CTRL-1", "CTRL-2") + "||||||UNICODE UTF-8\nPID|||2||M\u00fcller\n").encode()
    raw = b"\xef\xbb\xbf FHS|^~\\&\r\nBHS|^~\\&\r" + LATIN1 + second + b"BTS|2\rFTS|1\r\n\x1c"
    first, other = parse_all(raw)
    assert (first.raw, other.raw) == (LATIN1, second)
    assert (first.charset, other.charset) == ("iso8859-1", "utf-8")
    assert first.text.endswith("M\u00fcller") and other.text.endswith("M\u00fcller")
    [single] = parse_all(b"\r\n" + LATIN1.rstrip(b"\r") + b" \x1c")
    assert single.raw == LATIN1.rstrip(b"\r")


@pytest.mark.parametrize("raw, default, family, codec", [
    ((MSH + "\rPID|||1||Muller").encode(), None, "Muller", "ascii"),
    ((MSH + "\rPID|||1||M\u00fcller").encode(), None, "M\u00fcller", "utf-8"),           # not ASCII: UTF-8
    ((MSH + "\rPID|||1||M").encode() + b"\xfcller", None, "M\u00fcller", "cp1252"),      # nor UTF-8: 8859/1 (cp1252)
    ((MSH + "\rPID|||1||M\u00fcller").encode(), "8859/1", "M\u00c3\u00bcller", "iso8859-1"),  # the source says so
    ((MSH + "\rPID|||1||M").encode() + b"\xfcller", "8859/1", "M\u00fcller", "iso8859-1"),
    ((MSH + "||||||8859/2\rPID|||1||").encode() + b"\xa3ukasz", "UNICODE UTF-8", "\u0141ukasz", "iso8859-2"),
])
def test_charset_is_msh18_else_the_sources_default_else_the_tolerant_fallback(raw, default, family, codec):
    [message] = parse_all(raw, default)
    assert (message.text.rsplit("|", 1)[1], message.charset, message.raw) == (family, codec, raw)


@pytest.mark.parametrize("msh18, body, reason, code", [
    ("UNICODE UTF-8", b"M\xfcller", "byte 103 is not valid UNICODE UTF-8", "102"),
    ("ASCII", b"M\xfcller", "is not valid ASCII", "102"),
    ("ISO IR87", b"x", "MSH-18 (character set) 'ISO IR87' is not one Courier can decode", "103"),
    ("unicode_escape", b"x", "MSH-18 (character set) 'unicode_escape'", "103"),
])
def test_declared_charset_is_never_second_guessed(msh18, body, reason, code):
    with pytest.raises(Hl7Error, match=re.escape(reason)) as err:
        parse_all((MSH + f"||||||{msh18}\rPID|||1||").encode() + body)
    assert (err.value.error_code, err.value.location) == (code, ("MSH", 1, 18, None))


def test_parse_stored_reads_the_charset_of_the_content_type():
    [message] = parse_all(LATIN1)
    again = parse_stored(message.raw, f"application/hl7-v2; charset={message.charset}")
    assert again == message and again.charset == "iso8859-1"
    # Rows stored before issue 19: normalised UTF-8 text, "charset=utf-8".
    assert parse_stored(message.text.encode(), "application/hl7-v2; charset=utf-8").text == message.text
    assert parse_stored(LATIN1, "application/hl7-v2").charset == "iso8859-1"  # no charset: read as received


@pytest.mark.parametrize("msh15, msh16, outcomes", [
    ("", "", ("AA", "AE", "AR")),
    ("AL", "", ("CA", "CE", "CR")), ("AL", "NE", ("CA", "CE", "CR")), ("", "AL", ("CA", "CE", "CR")),
    ("NE", "AL", (None, None, None)), ("ER", "", (None, "CE", "CR")), ("SU", "", ("CA", None, None)),
    ("XX", "", ("CA", "CE", "CR")),
])
def test_ack_code_follows_msh15_in_enhanced_mode(msh15, msh16, outcomes):
    message = parse(MSH + f"|||{msh15}|{msh16}")
    assert (message.accept_ack_type, message.application_ack_type) == (msh15, msh16)
    assert tuple(ack_code(message, o) for o in ("AA", "AE", "AR")) == outcomes
    assert ack_code(None, "AR") == "AR"


@pytest.mark.parametrize("version, err", [
    ("2.3", "ERR|MSH^1^10^101&Required field missing&HL70357"),
    ("2.4", "ERR|MSH^1^10^101&Required field missing&HL70357"),
    ("2.5", "ERR||MSH^1^10|101^Required field missing^HL70357|E||||why"),
    ("2.9", "ERR||MSH^1^10|101^Required field missing^HL70357|E||||why"),
    ("1.0", "ERR|MSH^1^10^101&Required field missing&HL70357|MSH^1^10|101^Required field missing^HL70357|E||||why"),
])
def test_err_segment_is_in_the_senders_version(version, err):
    message = salvage_header(f"MSH|^~\\&|A|B|C|D|||ADT^A01|X1|P|{version}")
    ack = build_ack(message, "AR", text="why", error_code="101", location=("MSH", 1, 10, None))
    assert ack.split("\r")[2] == err
    assert ack.split("\r")[0].split("|")[11] == version  # as received, nothing invented


def test_err_location_names_a_component_and_the_msh18_is_echoed():
    message = parse(MSH + "||||||8859/1")
    ack = build_ack(message, "CR", text="t", error_code="200", location=("MSH", 1, 9, 2))
    msh, _, err = ack.split("\r")[:3]
    assert msh.split("|")[17] == "8859/1"
    assert err.split("|")[2] == "MSH^1^9^^2"


# --- one parse per frame: MSH read without python-hl7's tree, a frame read again in another charset -------

def _parse_with_python_hl7(text: str) -> Hl7Message:
    """parse() as it was: the header taken from python-hl7's tree of the whole message (the reference)."""
    import hl7

    from courier.app.hl7 import er7

    segments = er7._segments(text)
    sep, encoding = er7._delimiters(segments[0])
    message_text = "\r".join(segments)
    return er7._header(message_text, hl7.parse(message_text)[0], sep, encoding, strict=True)


# Text that passes parse()'s structural checks, so that only the header reading differs: MSH fields
# drawn from delimiters, letters and (Unicode) whitespace, valid values mixed in so the header checks
# pass often; a MSH alone or followed by segments.
_FIELD_CHARS = "AB1.-_ \t\xa0\x85\u2028|^~\\&#$*@%"


@st.composite
def msh_texts(draw):
    sep = draw(st.sampled_from("|#!"))
    encoding = draw(st.sampled_from(["^~\\&", "^~\\&#", "$*@%", "^~\\&|"]).filter(lambda e: sep not in e))
    fields = ["LAB", "HOSP", "COURIER", "HOSP", "20240101", "", "ADT^A01^ADT_A01", "CTRL-1", "P", "2.5.1",
              "", "", "AL", "NE", "", "8859/1~UNICODE UTF-8^x"]
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(fields)))
        value = draw(st.text(_FIELD_CHARS, max_size=10))
        if at == len(fields):
            fields.append(value)
        else:
            fields[at] = value
    fields = fields[:draw(st.integers(0, len(fields)))]
    msh = "MSH" + sep + encoding + "".join(sep + f for f in fields) + draw(st.sampled_from(["", " ", "\xa0", "\x85"]))
    rest = draw(st.sampled_from(["", f"\rPID{sep}1{sep}{sep}X", f"\rEVN{sep}A01\rZZ1"]))
    return msh + rest


@settings(max_examples=1500, deadline=None)
@given(msh_texts())
def test_parse_reads_msh_exactly_as_python_hl7s_tree_does(text):
    try:
        new = parse(text)
    except Hl7Error as exc:
        new = exc
    try:
        old = _parse_with_python_hl7(text)
    except Hl7Error as exc:
        old = exc
    if isinstance(new, Hl7Error) or isinstance(old, Hl7Error):
        assert isinstance(new, Hl7Error) and isinstance(old, Hl7Error), (new, old)
        assert (str(new), new.error_code, new.location) == (str(old), old.error_code, old.location)
    else:
        assert new == old


@pytest.mark.parametrize("row", rows("valid", "batch", "malformed"))
def test_parse_reads_every_sample_as_python_hl7s_tree_does(row):
    from courier.app.hl7 import er7

    try:
        parts = er7.split(decode(read(row["file"])))
    except Hl7Error:
        return
    for part in parts:
        try:
            new = parse(part)
        except Hl7Error as exc:
            if exc.reason.startswith(("segment id must", "control character", "MSH inside", "FHS inside", "BHS inside",
                                      "BTS inside", "FTS inside", "MSH-1 ", "MSH-2 ", "a message must start")):
                continue  # refused before the header is read: the same code as before
            new = exc
        try:
            old = _parse_with_python_hl7(part)
        except Hl7Error as exc:
            old = exc
        if isinstance(new, Hl7Error):
            assert (str(new), new.error_code, new.location) == (str(old), old.error_code, old.location)
        else:
            assert new == old


@pytest.mark.parametrize("raw", [
    (MSH + "\rPID|||1||Muller").encode(),                                  # ASCII: the same text in any charset
    (MSH + "\rPID|||1||M\u00fcller").encode(),                             # UTF-8 bytes: other text in 8859/1
    (MSH + "\rPID|||1||M").encode() + b"\xfcller",
    (MSH + "||||||8859/2\rPID|||1||").encode() + b"\xa3ukasz",             # MSH-18 wins over any default
    b"BHS|^~\\&\r" + (MSH + "\rPID|||1||A\r").encode() + (MSH.replace("CTRL-1", "CTRL-2") + "\rPID|||2||").encode()
    + b"\x93\x5c\r" + b"BTS|2\r",                                          # Shift_JIS: a trail byte that is '\'
])
@pytest.mark.parametrize("default", ["8859/1", "UNICODE UTF-8", "ASCII", "SHIFT_JIS", "cp1252"])
def test_reread_is_parse_all_in_the_new_default_charset(raw, default):
    from courier.app.hl7.er7 import reread

    try:
        expected = parse_all(raw, default)
    except Hl7Error as exc:
        with pytest.raises(Hl7Error) as err:
            reread(parse_all(raw), default)
        assert (str(err.value), err.value.error_code, err.value.location) == (str(exc), exc.error_code, exc.location)
        return
    again = reread(parse_all(raw), default)
    assert again == expected
    assert [(m.charset, m.raw) for m in again] == [(m.charset, m.raw) for m in expected]
