"""Issue 19: HL7 v2 as real feeds send it, rule by rule, over real MLLP connections (python-hl7's
`mllp_send` console script and a raw socket client), over HTTP, and on to destinations.

Each rule: what is accepted (AA, stored byte for byte as sent), what is refused (AR with an ERR
saying where and why, in the sender's version), and the ACK's form (delimiters, version, charset,
original or enhanced mode). docs/hl7.md is the table these tests prove.
"""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from courier.adapters.mllp import MllpAdapter
from courier.app.domain import transforms
from courier.app.hl7 import er7
from courier.app.hl7.listener import END_BLOCK, START_BLOCK, frame
from courier.app.store.models import Message
from tests.support.config import settings_for
from tests.support.mllp_peers import Client, Hl7Server, listener_thread
from tests.support.processes import VENV_BIN
from tests.unit.test_adapters import outgoing

pytestmark = pytest.mark.postgres


def msh(*, enc: str = "^~\\&", version: str = "2.5", control_id: str = "C-1", app: str = "LAB",
        msh15: str = "", msh16: str = "", msh18: str = "", sep: str = "|") -> str:
    comp = enc[0] if enc else "^"
    fields = [enc, app, "HOSP", "COURIER", "HOSP", "20240101120000", "", f"ADT{comp}A01", control_id, "P", version]
    tail = ["", "", msh15, msh16, "", msh18]
    while tail and not tail[-1]:
        tail.pop()
    return "MSH" + sep + sep.join(fields + tail)


def message(family: str = "Muller", *, charset: str = "utf-8", **kw) -> bytes:
    text = msh(**kw) + "\rPID|1||12345^^^HOSP^MR||" + family + "^Hans||19800101|M\rPV1|1|I\r"
    return text.encode(charset)


def write_config(tmp_path: Path) -> Path:
    """lab: any sender from 127.0.0.1 (default charset ASCII); legacy: sender OLD, ADT only, 8859/1 by default."""
    (tmp_path / "out").mkdir(exist_ok=True)
    doc = {"sources": {"legacy": {"mllp_allow": ["127.0.0.1/32"], "mllp_senders": ["OLD"], "charset": "8859/1",
                                  "allowed_types": ["HL7v2:ADT^*"]},
                       "lab": {"mllp_allow": ["127.0.0.1/32"]}},
           "destinations": {"archive": {"url": (tmp_path / "out").as_uri(), "clearance": "phi"}},
           "routes": [{"match": {"source": "*"}, "to": ["archive"]}]}
    path = tmp_path / "courier.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def feed_settings(tmp_path, store, queue_prefix):
    return settings_for(write_config(tmp_path), store.url, queue_prefix)


@pytest.fixture
def listener(feed_settings, store):
    with listener_thread(feed_settings, store, idle_timeout=30, frame_timeout=10) as running:
        yield running


def stored(store) -> dict[str, Message]:
    with store.session() as session:
        return {m.dedup_key: m for m in session.scalars(select(Message))}


def on_wire(payload: bytes) -> bytes:
    """What mllp_send puts in the frame: it strips VT and CR from both ends of each message."""
    return payload.strip(START_BLOCK + b"\r")


def mllp_send(port: int, payloads: list[bytes], tmp_path: Path) -> list[bytes]:
    """python-hl7's mllp_send: one stream of pre-framed messages; the answer payload of each."""
    stream = tmp_path / "stream.mllp"
    stream.write_bytes(b"".join(frame(p) for p in payloads))
    out = subprocess.run([str(VENV_BIN / "mllp_send"), "-p", str(port), "-f", str(stream), "127.0.0.1"],
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    printed = out.stdout.split(END_BLOCK + b"\r\n")
    assert printed[-1] == b"" and len(printed) - 1 == len(payloads), out.stdout
    return [p.removeprefix(START_BLOCK) for p in printed[:-1]]


def segments(answer: bytes, codec: str = "ascii") -> dict[str, list[str]]:
    text = answer.decode(codec)
    sep = text[3]
    return {s[:3]: s.split(sep) for s in text.split("\r") if s}


# --- 1. MSH-2: four or five encoding characters ------------------------------------------------

@pytest.mark.parametrize("enc", ["^~\\&", "^~\\&#"])
@pytest.mark.parametrize("version", ["2.3", "2.5.1", "2.7", "2.8"])
def test_four_or_five_encoding_characters_are_accepted_in_any_version(listener, store, tmp_path, enc, version):
    sent = message("Mul#ler", enc=enc, version=version, control_id=f"E{len(enc)}-{version}")
    [answer] = mllp_send(listener.port, [sent], tmp_path)
    ack = segments(answer)
    assert ack["MSA"][1:3] == ["AA", f"E{len(enc)}-{version}"]
    assert (ack["MSH"][1], ack["MSH"][11]) == (enc, version)  # the truncation character is kept
    assert stored(store)[f"E{len(enc)}-{version}"].body == on_wire(sent)  # nothing changed


@pytest.mark.parametrize("enc, reason", [
    ("", "MSH-2 (encoding characters) is missing"),
    ("^~\\", "MSH-2 (encoding characters) has 3 characters"),
    ("^~\\&#!", "MSH-2 (encoding characters) has 6 characters"),
    ("^~^&", "MSH-2 (encoding characters) repeats a delimiter"),
])
def test_missing_duplicate_or_too_many_encoding_characters_get_ar_with_err(listener, store, tmp_path, enc, reason):
    [answer] = mllp_send(listener.port, [message(enc=enc, control_id="BAD-ENC")], tmp_path)
    ack = segments(answer)
    assert ack["MSA"][1] == "AR" and ack["MSA"][3].startswith("segment 1 (MSH), field 2: MSH-2")
    assert ack["ERR"][2] == "MSH^1^2" and ack["ERR"][4] == "E"
    assert reason in ack["ERR"][8]
    assert stored(store) == {}


# --- 2. MSH-12 ---------------------------------------------------------------------------------

VERSIONS = ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2",
            "2.9"]


def test_every_version_21_to_29_is_accepted_and_answered_in_it(listener, store, tmp_path):
    answers = mllp_send(listener.port, [message(version=v, control_id=f"V-{v}") for v in VERSIONS], tmp_path)
    for version, answer in zip(VERSIONS, answers):
        ack = segments(answer)
        assert (ack["MSA"][1:3], ack["MSH"][11]) == (["AA", f"V-{version}"], version)
    assert set(stored(store)) == {f"V-{v}" for v in VERSIONS}


@pytest.mark.parametrize("version", ["", "1.0", "2.0", "2.10", "3.0"])
def test_missing_or_unknown_version_gets_ar_203_and_nothing_invented(listener, store, tmp_path, version):
    [answer] = mllp_send(listener.port, [message(version=version, control_id="V-BAD")], tmp_path)
    ack = segments(answer)
    assert ack["MSA"][1:3] == ["AR", "V-BAD"]
    assert ack["MSH"][11] == version  # echoed, not made up
    # A version Courier does not know: ERR-1 (v2.4 and older) and ERR-2..4 (v2.5 on) both.
    assert ack["ERR"][1] == "MSH^1^12^203&Unsupported version id&HL70357"
    assert ack["ERR"][2:5] == ["MSH^1^12", "203^Unsupported version id^HL70357", "E"]
    assert "MSH-12 (version id)" in ack["ERR"][8]
    assert stored(store) == {}


# --- 4. negative ACKs in the sender's version ------------------------------------------------------

@pytest.mark.parametrize("version, err", [
    ("2.3", ["ERR", "MSH^1^9^200&Unsupported message type&HL70357"]),
    ("2.4", ["ERR", "MSH^1^9^200&Unsupported message type&HL70357"]),
    ("2.5", ["ERR", "", "MSH^1^9", "200^Unsupported message type^HL70357", "E", "", "", "",
             "source 'legacy' may not send 'HL7v2:ZZZ\\S\\Z01'"]),  # '^' escaped in ERR-8
    ("2.8", ["ERR", "", "MSH^1^9", "200^Unsupported message type^HL70357", "E", "", "", "",
             "source 'legacy' may not send 'HL7v2:ZZZ\\S\\Z01'"]),  # '^' escaped in ERR-8
])
def test_refused_type_gets_err_in_the_senders_version(listener, store, version, err):
    sent = message(app="OLD", version=version, control_id="T-1").replace(b"ADT^A01", b"ZZZ^Z01")
    with Client(listener.port) as client:
        ack = segments(client.exchange(sent))
    assert ack["MSA"][1] == "AR" and ack["MSH"][11] == version
    assert ack["ERR"] == err
    assert stored(store) == {}


# --- 3. charsets ------------------------------------------------------------------------------------

def test_8859_1_message_is_stored_as_received_and_answered_in_8859_1(listener, store, tmp_path):
    sent = message("M\u00fcller", charset="latin-1", msh18="8859/1", control_id="L1-1", app="SEND\u00c9")
    [answer] = mllp_send(listener.port, [sent], tmp_path)
    ack = segments(answer, "latin-1")
    assert ack["MSA"][1:3] == ["AA", "L1-1"]
    assert ack["MSH"][17] == "8859/1" and ack["MSH"][4] == "SEND\u00c9"  # 0xC9, the sender's own byte
    assert b"SEND\xc9" in answer
    row = stored(store)["L1-1"]
    assert row.body == on_wire(sent) and row.content_type == "application/hl7-v2; charset=iso8859-1"


@pytest.mark.parametrize("source_app, body, family", [
    ("LAB", message("M\u00fcller", control_id="D-1"), "M\u00fcller"),                    # UTF-8, no MSH-18
    ("LAB", message("M\u00fcller", charset="latin-1", control_id="D-1"), "M\u00fcller"),  # 8859/1, no MSH-18
    ("LAB", message("Muller", control_id="D-1"), "Muller"),                               # ASCII
    ("OLD", message("M\u00fcller", charset="latin-1", app="OLD", control_id="D-1"), "M\u00fcller"),  # source: 8859/1
    ("LAB", message("\u0141ukasz", charset="iso8859-2", msh18="8859/2", control_id="D-1"), "\u0141ukasz"),
    ("LAB", message("M\u00fcller", msh18="UNICODE UTF-8", control_id="D-1"), "M\u00fcller"),
])
def test_text_reaches_a_json_destination_right_whatever_the_charset(listener, store, monkeypatch, source_app, body,
                                                                     family):
    with Client(listener.port) as client:
        assert segments(client.exchange(body), "latin-1")["MSA"][1] == "AA"
    row = stored(store)["D-1"]
    assert row.body == body
    envelope = transforms.Envelope(row.id, row.source, row.type, row.content_type, row.body, "json", "phi")
    out, _ = transforms.apply("canonical_json", envelope)
    [event] = json.loads(out)["events"]
    assert event["data"]["patient"]["names"][0]["family"] == family


def test_legacy_source_default_charset_reads_bytes_as_8859_1(listener, store):
    # 0xC3 0xBC is 'ü' in UTF-8 and 'Ã¼' in 8859/1: the source's charset decides, not a guess.
    body = message("M\u00fcller", app="OLD", control_id="OLD-1")
    with Client(listener.port) as client:
        assert segments(client.exchange(body))["MSA"][1] == "AA"
    assert stored(store)["OLD-1"].content_type == "application/hl7-v2; charset=iso8859-1"


@pytest.mark.parametrize("body, where, code, says", [
    (message(msh18="UNICODE UTF-8", control_id="X-1").replace(b"Muller", b"M\xfcller"), "MSH^1^18", "102",
     "is not valid UNICODE UTF-8 (the charset MSH-18 declares)"),
    (message(msh18="ISO IR87", control_id="X-1"), "MSH^1^18", "103", "MSH-18 (character set) 'ISO IR87'"),
    (message(msh18="EBCDIC", control_id="X-1"), "MSH^1^18", "103", "is not one Courier can decode"),
])
def test_charset_that_cannot_be_read_as_declared_gets_ar(listener, store, body, where, code, says):
    with Client(listener.port) as client:
        ack = segments(client.exchange(body), "latin-1")
    assert ack["MSA"][1] == "AR" and ack["ERR"][2] == where and ack["ERR"][3].startswith(code + "^")
    assert says in ack["ERR"][8]
    assert stored(store) == {}


def test_mllp_destination_gets_the_bytes_of_its_own_charset(listener, store):
    """Stored as 8859/1 bytes; an MLLP destination that reads UTF-8 gets UTF-8 (and MSH-18 says so)."""
    sent = message("M\u00fcller", charset="latin-1", msh18="8859/1", control_id="OUT-1")
    with Client(listener.port) as client:
        assert segments(client.exchange(sent), "latin-1")["MSA"][1] == "AA"
    row = stored(store)["OUT-1"]
    body, content_type = transforms.apply("passthrough", transforms.Envelope(
        row.id, row.source, row.type, row.content_type, row.body, "legacy", "phi"))
    with Hl7Server() as receiver:
        with MllpAdapter(f"{receiver.url}?charset=UNICODE+UTF-8", timeout=5) as adapter:
            adapter.send(outgoing(body=body, content_type=content_type))
        with MllpAdapter(f"{receiver.url}?charset=8859/15", timeout=5) as adapter:
            adapter.send(outgoing(body=body, content_type=content_type))
    utf8, latin9 = receiver.received
    assert b"M\xc3\xbcller" in utf8 and utf8.split(b"\r")[0].split(b"|")[17] == b"UNICODE UTF-8"
    assert b"M\xfcller" in latin9 and latin9.split(b"\r")[0].split(b"|")[17] == b"8859/15"


def test_escape_sequences_are_decoded_for_canonical_fields(listener, store):
    body = (msh(control_id="ESC-1", msh18="8859/1") + "\rPID|1||12345^^^HOSP^MR||\\XD6\\sterreich\\T\\Co^A\\S\\B"
            "\\F\\C\\R\\D\\E\\E|||M\rPV1|1|I\r").encode("latin-1")
    with Client(listener.port) as client:
        assert segments(client.exchange(body))["MSA"][1] == "AA"
    row = stored(store)["ESC-1"]
    out, _ = transforms.apply("canonical_json", transforms.Envelope(
        row.id, row.source, row.type, row.content_type, row.body, "json", "phi"))
    name = json.loads(out)["events"][0]["data"]["patient"]["names"][0]
    assert (name["family"], name["given"]) == ("\u00d6sterreich&Co", "A^B|C~D\\E")


# --- 5. enhanced acknowledgment ------------------------------------------------------------------

@pytest.mark.parametrize("msh15, msh16, outcome, expected", [
    ("AL", "", "accepted", "CA"), ("AL", "AL", "accepted", "CA"), ("SU", "", "accepted", "CA"),
    ("", "AL", "accepted", "CA"), ("XX", "", "accepted", "CA"),
    ("AL", "NE", "refused", "CR"), ("ER", "", "refused", "CR"),
    ("", "", "accepted", "AA"), ("", "", "refused", "AR"),
])
def test_accept_acknowledgment_as_msh15_asks(listener, store, tmp_path, msh15, msh16, outcome, expected):
    sent = message(msh15=msh15, msh16=msh16, control_id="ENH-1")
    if outcome == "refused":
        sent = sent.replace(b"ADT^A01", b"ADT^")  # no trigger event
    [answer] = mllp_send(listener.port, [sent], tmp_path)
    ack = segments(answer)
    assert ack["MSA"][1:3] == [expected, "ENH-1"]
    assert ack["MSH"][14:16] == [] or ack["MSH"][14:16] == ["", ""]  # an ACK asks for no ACK
    assert ("ENH-1" in stored(store)) == (outcome == "accepted")


@pytest.mark.parametrize("msh15", ["NE", "ER"])
def test_no_answer_when_msh15_asks_for_none_on_success(listener, store, msh15):
    with Client(listener.port) as client:
        client.send(message(msh15=msh15, control_id="QUIET-1"))
        # Proof without waiting: the next frame's ACK is the first answer on the connection.
        assert segments(client.exchange(message(control_id="LOUD-1")))["MSA"][1:3] == ["AA", "LOUD-1"]
    assert set(stored(store)) == {"QUIET-1", "LOUD-1"}


def test_su_gets_no_answer_when_refused_but_unparseable_input_always_does(listener, store):
    with Client(listener.port) as client:
        # SU, a well-formed message refused (a type source legacy may not send): no answer.
        client.send(message(msh15="SU", control_id="SU-1", app="OLD").replace(b"ADT^A01", b"ORU^R01"))
        assert segments(client.exchange(message(control_id="NEXT-1")))["MSA"][1:3] == ["AA", "NEXT-1"]
        # NE, but MSH-12 unusable: the header is not trusted, the sender hears why (CR).
        ack = segments(client.exchange(message(msh15="NE", version="1.0", control_id="NE-BAD")))
        assert ack["MSA"][1:3] == ["CR", "NE-BAD"] and ack["ERR"][3].startswith("203^")


# --- 6. batches ---------------------------------------------------------------------------------------

def batch(*messages: bytes, count: int | None = None) -> bytes:
    n = len(messages) if count is None else count
    return b"FHS|^~\\&|LAB\rBHS|^~\\&|LAB\r" + b"".join(messages) + f"BTS|{n}\rFTS|1\r".encode()


def test_batch_over_mllp_is_stored_message_by_message_and_answered_per_message(listener, store, tmp_path):
    first = message("M\u00fcller", charset="latin-1", msh18="8859/1", control_id="B-1")
    second = message("M\u00fcller", msh18="UNICODE UTF-8", control_id="B-2", enc="^~\\&#")
    [answer] = mllp_send(listener.port, [batch(first, second)], tmp_path)
    assert answer.startswith(b"BHS|") and answer.endswith(b"BTS|2\r")
    assert [a[:2] for a in map(er7.parse_ack, er7.split(er7.decode(answer)))] == [("AA", "B-1"), ("AA", "B-2")]
    rows = stored(store)
    assert (rows["B-1"].body, rows["B-2"].body) == (first, second)  # each one's own bytes, terminators too
    assert rows["B-1"].content_type.endswith("iso8859-1") and rows["B-2"].content_type.endswith("utf-8")


def test_batch_count_that_does_not_match_bts1_is_refused_whole(listener, store, tmp_path):
    [answer] = mllp_send(listener.port, [batch(message(control_id="N-1"), message(control_id="N-2"), count=3)],
                         tmp_path)
    got = [er7.parse_ack(p) for p in er7.split(er7.decode(answer))]
    assert [code for code, _, _ in got] == ["AR", "AR"]
    assert got[0][2].startswith("segment 9 (BTS), field 1: BTS-1 (batch message count) says 3")  # MSA-3: 80 chars
    assert b"BTS-1 (batch message count) says 3 messages, 2 were received" in answer  # ERR-8: all of it
    assert stored(store) == {}


def test_batch_over_http_is_stored_message_by_message(client, make_token, store):
    first = message("M\u00fcller", charset="latin-1", msh18="8859/1", control_id="H-1")
    second = message(control_id="H-2", version="2.3")
    r = client.post("/api/v1/messages", data=batch(first, second), headers=make_token(),
                    content_type="application/hl7-v2")
    assert r.status_code == 202, r.get_json()
    assert [m["status"] for m in r.get_json()["messages"]] == ["accepted", "accepted"]
    rows = stored(store)
    assert (rows["H-1"].body, rows["H-2"].body) == (first, second)
    wrong = client.post("/api/v1/messages", data=batch(message(control_id="H-3"), count=2), headers=make_token(),
                        content_type="application/hl7-v2")
    assert wrong.status_code == 400
    assert wrong.get_json()["error"]["details"]["where"] == "segment 6 (BTS), field 1"


@pytest.mark.parametrize("body, status, where", [
    (message(enc="^~\\&#", version="2.5.1", control_id="HT-1"), 202, None),
    (message(version="", control_id="HT-2"), 400, ["MSH", 1, 12, None]),
    (message(enc="^~^&", control_id="HT-3"), 400, ["MSH", 1, 2, None]),
    (message(msh18="UNICODE UTF-8", control_id="HT-4").replace(b"Muller", b"M\xfcller"), 400, ["MSH", 1, 18, None]),
])
def test_http_accepts_and_refuses_exactly_what_mllp_does(client, make_token, store, body, status, where):
    r = client.post("/api/v1/messages", data=body, headers=make_token(), content_type="application/hl7-v2")
    assert r.status_code == status, r.get_json()
    if where is not None:
        assert r.get_json()["error"]["details"]["location"] == where
    else:
        assert stored(store)["HT-1"].body == body


# --- 7. fuzz: MSH variations over a real connection ----------------------------------------------------

ENCODINGS = st.sampled_from(["^~\\&", "^~\\&#", "", "^~", "^~\\", "^~\\&#!", "^^\\&", "*~\\&", "^~\\&\\"])
VERSION_VALUES = st.sampled_from([*VERSIONS, "", "1.0", "2.0", "2.10", "2.5^DEU", "x"])
CHARSETS = st.sampled_from([("", "ascii"), ("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8"), ("ASCII", "ascii"),
                            ("8859/15", "iso8859-15"), ("", "latin-1"), ("", "utf-8"), ("KOI8", "latin-1")])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(enc=ENCODINGS, version=VERSION_VALUES, charset=CHARSETS,
       msh15=st.sampled_from(["", "AL", "NE", "ER", "SU", "??"]),
       family=st.text(alphabet="Mueller\u00fc\u00e9#&^~|\\", min_size=1, max_size=12))
def test_fuzz_msh_variations_get_an_answer_and_what_is_accepted_is_unchanged(listener, store, enc, version, charset,
                                                                             msh15, family):
    name, codec = charset
    number = uuid.uuid4().hex[:12]  # examples share the store: each its own control ids
    control_id = f"FZ-{number}"
    try:
        sent = message(family, enc=enc, version=version, msh18=name, msh15=msh15, control_id=control_id,
                       charset=codec)
    except UnicodeEncodeError:
        sent = message("Muller", enc=enc, version=version, msh18=name, msh15=msh15, control_id=control_id,
                       charset=codec)
    probe = f"ALIVE-{number}"
    with Client(listener.port, timeout=20) as client:  # a hang or a dropped connection fails here
        client.send(sent)
        client.send(message(control_id=probe))  # answered in order: what comes before its ACK is ours
        answers = [client.read_frame()]
        while er7.parse_ack(er7.decode(answers[-1]))[1] != probe:
            answers.append(client.read_frame())
    assert len(answers) <= 2
    rows = stored(store)
    if len(answers) == 1:  # no answer: only a sender that asked for none on success, and it is stored as sent
        assert msh15 in ("NE", "ER") and rows[control_id].body == sent
        return
    code, msa2, text = er7.parse_ack(er7.decode(answers[0]))
    assert code in ("AA", "AE", "AR", "CA", "CE", "CR")
    assert code in ("AA", "CA") or text
    if code in ("AA", "CA"):
        assert msa2 == control_id and rows[control_id].body == sent  # nothing accepted is changed
    else:
        assert control_id not in rows
