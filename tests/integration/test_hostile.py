"""Hostile input (issue 9, item 5): oversized, truncated, wrongly encoded, deeply nested and
injection-laden input through the real HTTP API (Flask's client, and raw bytes to gunicorn for
what that client refuses to send), the real MLLP listener and the file adapter, on PostgreSQL.

Each refusal is a clear 4xx (or an AR with its reason in MSA-3 and ERR), says what and where, holds
no traceback, file path, exception repr or PHI from the input, and leaves every Courier table as it
was (row counts and a hash of the rows, taken before and after). Schemathesis with every scope is
in tests/integration/test_openapi.py; the HL7 parser's own fuzzing in tests/unit/test_hl7v2.py and
tests/integration/test_mllp_listener.py. Here: hypothesis on courier.app.ingest's JSON and HL7 body parsing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from courier.adapters.base import Outgoing, PermanentError
from courier.adapters.file import FileAdapter
from courier.app import create_app
from courier.app.store import outbox
from courier.app.ingest import MAX_JSON_DEPTH, IngestError, json_object, parse_body
from courier.app.hl7.listener import START_BLOCK, frame
from courier.app.store.models import Message
from courier.tasks.deliver import run_batch
from tests.support.config import settings_for, write_config
from tests.support.services import BROKER_URL
from tests.support.mllp_peers import Client, listener_thread
from tests.support.processes import VENV_BIN
from tests.integration.test_mllp_listener import acks, write_mllp_config

LIMIT = 256 * 1024  # COURIER_MAX_MESSAGE_BYTES for these tests: room for 100,000 '['
# PHI in every hostile body; no answer may quote it back.
PATIENT, MRN = "ZZPATIENT^HOSTILE", "MRN7731"
PHI = (PATIENT, "ZZPATIENT", "HOSTILE", MRN)
SQL = "'; DROP TABLE courier_messages;--"
# What an answer must never hold: a traceback, a source file, a path of this machine, an exception repr.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/work/|/usr/|/tmp/|/home/|/root/"
                   r"|\b\w+(?:Error|Exception)\(|<[\w.]+ object at 0x")


def hl7(control_id: str = "MSG0001", pid: str = f"PID|1||{MRN}^^^HOSP^MR||{PATIENT}") -> str:
    return (f"MSH|^~\\&|LAB|HOSP|ERP|HOSP|20261121100000||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
            f"EVN|A01|20261121100000\r{pid}\r")


def event(**extra) -> dict:
    return {"type": "lab.result", "id": "evt-1", "data": {"patient": PATIENT, "mrn": MRN}, **extra}


# --- the checks ----------------------------------------------------------------------------

def snapshot(store) -> dict[str, tuple[int, str]]:
    """Every courier_* table of the database: its row count and an MD5 of all its rows (as text, sorted)."""
    with store.engine.connect() as conn:
        names = conn.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                                  "AND tablename LIKE 'courier%' ORDER BY tablename")).all()
        assert "courier_messages" in names and "courier_deliveries" in names, names
        return {name: tuple(conn.execute(text(  # nosec B608  # table names from pg_tables, not input
            f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM \"{name}\" AS t"
        )).one()) for name in names}


def assert_no_leak(answer: str) -> None:
    assert not LEAKS.search(answer), answer[:1000]
    for phi in PHI:
        assert phi not in answer, (phi, answer[:1000])


def assert_refused(r, status: int, code: str, says: str) -> dict:
    """`r` is `status` with the error shape, a message that holds `says` (what and where), no leak."""
    raw = r.get_data(as_text=True)
    assert r.status_code == status, (r.status_code, raw[:1000])
    body = r.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    err = body["error"]
    assert err["code"] == code, err
    assert says in err["message"], err
    assert_no_leak(raw)
    return err


@pytest.fixture
def api(app, client, store, make_token):
    """The app with a LIMIT body limit, tokens of each scope, and a JSON event and an HL7 message
    with PHI already stored (so "nothing stored changes" has something to change)."""
    app.extensions["courier.settings"] = dataclasses.replace(app.extensions["courier.settings"],
                                                             max_message_bytes=LIMIT)
    ingest, operate = make_token(), make_token(scope="operate")
    seeded = [client.post("/api/v1/messages", json=event(), headers=ingest),
              client.post("/api/v1/messages", data=hl7().encode(), content_type="application/hl7-v2",
                          headers=ingest),
              client.get("/api/v1/messages", headers=operate)]  # the operate token's first use, too
    assert [r.status_code for r in seeded] == [202, 202, 200], [r.get_json() for r in seeded]
    return {"ingest": ingest, "operate": operate}


# --- POST /api/v1/messages: a table of hostile bodies and headers -----------------------------

J, H = "application/json", "application/hl7-v2"
ADT = hl7()
MSH10_START = ADT.index("MSG0001")  # a cut before here loses MSH-9 or all of MSH-10
BODIES = [
    # (id, body, content type, extra headers, status, code, what the message says)
    ("json-over-the-limit", json.dumps(event(data={"x": "y" * LIMIT})).encode(), J, {}, 413, "too_large",
     f"larger than the limit of {LIMIT} bytes"),
    ("hl7-over-the-limit", (ADT + "NTE|1||" + "x" * LIMIT + "\r").encode(), H, {}, 413, "too_large",
     f"larger than the limit of {LIMIT} bytes"),
    ("json-empty", b"", J, {}, 400, "malformed", "line 1 column 1"),
    ("json-truncated", json.dumps(event()).encode()[:-7], J, {}, 400, "malformed", "line 1 column"),
    ("json-invalid-utf8", json.dumps(event()).encode().replace(b"HOSTILE", b"HOST\xffILE"), J, {}, 400,
     "malformed", "not UTF-8: byte"),
    ("json-utf16-with-bom", json.dumps(event()).encode("utf-16"), J, {}, 400, "malformed", "not UTF-8: byte 0"),
    ("json-latin1-labelled-utf8", json.dumps(event(), ensure_ascii=False).replace("HOSTILE", "H\u00d6STILE")
     .encode("latin-1"), "application/json; charset=utf-8", {}, 400, "malformed", "not UTF-8: byte"),
    ("json-raw-nul", json.dumps(event()).encode().replace(b"lab.result", b"lab\x00result"), J, {}, 400,
     "malformed", "Invalid control character at line 1 column"),
    ("json-escaped-nul-in-id", json.dumps(event(id="a\u0000b")).encode(), J, {}, 422, "invalid",
     "envelope schema"),
    ("json-100000-brackets", b"[" * 100_000, J, {}, 400, "malformed", "nested more than"),
    ("json-deep-data", b'{"type": "lab.result", "data": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_001, J, {},
     400, "malformed", "nested more than"),
    ("json-huge-integer", b'{"type": "lab.result", "data": {"n": 1' + b"0" * 10_000 + b"}}", J, {}, 400,
     "malformed", "an integer has more than"),
    ("json-huge-float", b'{"type": "lab.result", "data": {"n": 1e999}}', J, {}, 400, "malformed",
     "number 1e999 is out of range"),
    ("json-nan", b'{"type": "lab.result", "data": {"n": NaN}}', J, {}, 400, "malformed", "NaN is not JSON"),
    ("json-infinity", b'{"type": "lab.result", "data": {"n": -Infinity}}', J, {}, 400, "malformed",
     "-Infinity is not JSON"),
    ("json-duplicate-type", b'{"type": "lab.result", "type": "adt.admit", "data": {}}', J, {}, 400,
     "malformed", "duplicate key 'type'"),
    ("json-duplicate-in-data", f'{{"type": "lab.result", "data": {{"mrn": "{MRN}", "mrn": "x"}}}}'.encode(), J,
     {}, 400, "malformed", "duplicate key 'mrn'"),
    ("json-top-level-array", json.dumps([event()]).encode(), J, {}, 422, "invalid", "must be an object"),
    ("json-event-id-sql", json.dumps(event(id=SQL)).encode(), J, {}, 422, "invalid", "envelope schema"),
    ("json-event-id-percent", json.dumps(event(id="%")).encode(), J, {}, 422, "invalid", "envelope schema"),
    ("json-event-id-backslash", json.dumps(event(id="a\\b")).encode(), J, {}, 422, "invalid", "envelope schema"),
    ("json-type-too-long", json.dumps(event(type="t" * 129)).encode(), J, {}, 422, "invalid", "envelope schema"),
    ("text-plain", ADT.encode(), "text/plain", {}, 415, "unsupported_media_type", "'text/plain'"),
    *[(f"idempotency-key-{name}", json.dumps(event()).encode(), J, {"Idempotency-Key": key}, 400, "malformed",
       "Idempotency-Key header") for name, key in [
        ("sql", SQL), ("percent", "%"), ("backslash", "a\\b"), ("space", "a b"), ("soh", "a\x01b"),
        ("tab", "a\tb"), ("del", "a\x7fb"), ("esc", "\x1b[31m"), ("too-long", "k" * 256)]],
    *[(f"hl7-cut-at-{at}", ADT[:at].encode(), H, {}, 400, "malformed", "segment 1")
      for at in (3, 9, 20, 50, MSH10_START)],
    ("hl7-missing-msh-fields", f"MSH|^~\\&|A|B\rPID|1||{MRN}||{PATIENT}\r".encode(), H, {}, 400, "malformed",
     "segment 1 (MSH), field 9"),
    ("hl7-no-msh", f"PID|1||{MRN}||{PATIENT}\r".encode(), H, {}, 400, "malformed", "MSH"),
    ("hl7-utf16-with-bom", ADT.encode("utf-16"), H, {}, 400, "malformed", "NUL byte"),
    ("hl7-nul-in-pid", ADT.replace("PID|1", "PID|1\x00").encode(), H, {}, 400, "malformed", "NUL byte"),
    # VT and FS are MLLP's framing bytes (other control characters in field content are left to the destination).
    ("hl7-vt-in-pid", ADT.replace("PID|1", "PID|\x0b").encode(), H, {}, 400, "malformed",
     "control character '\\x0b' inside the message"),
    ("hl7-fs-in-pid", ADT.replace("PID|1", "PID|\x1c").encode(), H, {}, 400, "malformed",
     "control character '\\x1c' inside the message"),
    ("hl7-msh10-control-char", hl7("C\x01-1").encode(), H, {}, 400, "malformed", "segment 1 (MSH), field 10"),
    ("hl7-bad-field-separator", ("MSHa^~\\&a" + ADT[9:]).encode(), H, {}, 400, "malformed", "MSH-1"),
    ("hl7-batch-with-a-bad-member", ("BHS|^~\\&|LAB|HOSP\r" + hl7("B-1") + hl7("") + "BTS|2\r").encode(), H, {},
     400, "malformed", "HL7 message 2 of the batch"),
]


@pytest.mark.parametrize(("body", "content_type", "headers", "status", "code", "says"),
                         [pytest.param(*row[1:], id=row[0]) for row in BODIES])
def test_a_hostile_body_or_header_is_a_clear_4xx_and_nothing_stored_changes(
        api, client, store, body, content_type, headers, status, code, says):
    before = snapshot(store)
    r = client.post("/api/v1/messages", data=body, content_type=content_type, headers={**api["ingest"], **headers})
    assert_refused(r, status, code, says)
    assert snapshot(store) == before


@pytest.mark.parametrize(("url", "body", "status", "says"), [
    ("/api/v1/destinations/billing/pause", b'{"reason": "a", "reason": "b"}', 400, "duplicate key 'reason'"),
    ("/api/v1/destinations/billing/pause", b'{"reason": ' + b"[" * 100_000, 400, "nested more than"),
    ("/api/v1/destinations/billing/pause", b'{"reason": "\xff"}', 400, "not UTF-8: byte 12"),
    ("/api/v1/destinations/billing/pause", b'{"reason": "x' + b"x" * LIMIT + b'"}', 413, "larger than the limit"),
    ("/api/v1/deliveries/replay", b'{"destination": "erp", "status": "dead", "limit": 1' + b"0" * 5000 + b"}", 400,
     "an integer has more than"),
    ("/api/v1/deliveries/replay", json.dumps({"destination": SQL, "status": "dead"}).encode(), 422, "field errors"),
])
def test_hostile_operator_bodies_are_refused_and_change_nothing(api, client, store, url, body, status, says):
    """The operator actions read their JSON with the same decoder: no pause, no replay, no audit row."""
    before = snapshot(store)
    r = client.post(url, data=body, content_type="application/json", headers=api["operate"])
    assert_refused(r, status, {400: "malformed", 413: "too_large", 422: "invalid"}[status], says)
    assert snapshot(store) == before


@pytest.mark.parametrize("source", [SQL, "../../etc/passwd", "lab%", "lab\t"])
def test_an_admin_naming_a_hostile_source_is_refused(api, client, store, make_token, source):
    admin = make_token(scope="admin")
    client.get("/api/v1/destinations", headers=admin)  # the token's first use (last_used_at) before the snapshot
    before = snapshot(store)
    r = client.post("/api/v1/messages", json=event(), headers={**admin, "X-Courier-Source": source})
    assert_refused(r, 403, "unknown_source", "is not configured")
    assert snapshot(store) == before


def test_sql_metacharacters_in_an_event_type_are_stored_as_text(api, client, store):
    """The type has no character set of its own (routes match it by pattern): SQL in it is data,
    bound as a parameter; the tables are intact and the type reads back byte for byte."""
    r = client.post("/api/v1/messages", json=event(type=SQL + " %_\\", id="evt-sql"), headers=api["ingest"])
    assert r.status_code == 202, r.get_json()
    with store.session() as s:
        assert s.get(Message, r.get_json()["id"]).type == SQL + " %_\\"
        assert s.scalar(select(func.count()).select_from(Message)) == 3


# --- query and path parameters -----------------------------------------------------------------

@pytest.mark.parametrize(("url", "says"), [
    (f"/api/v1/messages?since={SQL}", "query parameter since"),
    ("/api/v1/messages?until=2026-01-01T00:00:00%27%20OR%20%271%27=%271", "query parameter until"),
    ("/api/v1/messages?status=accepted%27%20OR%201=1--", "query parameter status"),
    ("/api/v1/messages?limit=1;DROP%20TABLE%20courier_messages", "query parameter limit"),
    ("/api/v1/messages?cursor=%27%20OR%201=1--", "query parameter cursor"),
    ("/api/v1/messages?cursor=../../etc/passwd", "query parameter cursor"),
    ("/api/v1/deliveries?status=%25", "query parameter status"),
    ("/api/v1/audit?cursor=1%20OR%201=1", "query parameter cursor"),
    ("/api/v1/reconciliation?since=%0d%0aX-Evil:%201", "query parameter since"),
])
def test_hostile_query_parameters_are_a_400_that_names_the_parameter(api, client, store, url, says):
    before = snapshot(store)
    assert_refused(client.get(url, headers=api["operate"]), 400, "malformed", says)
    assert snapshot(store) == before


@pytest.mark.parametrize("query", [
    "idempotency_key=%25", "idempotency_key=_", "type=%25", "type=lab%25", "source=_ab", "source=%25",
    f"type={SQL}", "type=%27%20OR%20%271%27=%271", "idempotency_key=%5C", "type=lab.result%5C",
])
def test_sql_wildcards_and_quotes_in_filters_match_literally(api, client, store, query):
    """Filters are equality with bound parameters: '%', '_' and quotes match only themselves."""
    before = snapshot(store)
    everything = client.get("/api/v1/messages", headers=api["operate"]).get_json()["items"]
    exact = client.get("/api/v1/messages?type=lab.result", headers=api["operate"]).get_json()["items"]
    assert len(everything) == 2 and len(exact) == 1  # the filters work, so an empty answer means something
    r = client.get(f"/api/v1/messages?{query}", headers=api["operate"])
    assert r.status_code == 200 and r.get_json()["items"] == [], r.get_json()
    assert_no_leak(r.get_data(as_text=True))
    assert snapshot(store) == before


@pytest.mark.parametrize(("method", "url", "says"), [
    ("GET", "/api/v1/messages/%27%20OR%20%271%27=%271", "no message \"' OR '1'='1\""),
    ("POST", "/api/v1/deliveries/%27%3B%20DROP%20TABLE%20courier_deliveries%3B--/replay", "no delivery"),
    ("POST", "/api/v1/destinations/billing%27--/resume", "no destination \"billing'--\""),
    # %2F is a '/' to the router: no route matches, the app's JSON 404 all the same.
    ("GET", "/api/v1/messages/..%2F..%2Fetc%2Fpasswd", "URL was not found"),
    ("POST", "/api/v1/destinations/..%2Fbilling/pause", "URL was not found"),
])
def test_hostile_path_parameters_are_a_404_and_nothing_changes(api, client, store, method, url, says):
    before = snapshot(store)
    r = client.open(url, method=method, json={"reason": "x"}, headers=api["operate"])
    assert_refused(r, 404, "not_found", says)
    assert snapshot(store) == before


def test_an_unexpected_exception_is_a_json_500_without_the_exception(api, client, store, monkeypatch, caplog):
    """The generic handler: a bug answers in the error shape, the exception only in the log."""
    def broken(*_args, **_kw):
        raise RuntimeError(f"bug while reading {PATIENT} from /work/main/app/outbox.py")

    monkeypatch.setattr(outbox, "trace", broken)
    r = client.get("/api/v1/messages/any", headers=api["operate"])
    err = assert_refused(r, 500, "internal_error", "correlation id")
    assert err["details"]["correlation_id"] == r.headers["X-Correlation-ID"]
    assert any(rec.exc_info and "RuntimeError" in rec.getMessage() for rec in caplog.records)


# --- raw bytes to gunicorn: headers Werkzeug's client will not send ----------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gunicorn(tmp_path, store, queue_prefix, make_token):
    """`gunicorn courier.app:create_app()` on a free loopback port (one worker), as the Procfile runs it."""
    cfg = write_config(tmp_path / "courier.yml", {"erp": (tmp_path / "erp").as_uri()})
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": store.url, "BROKER_URL": BROKER_URL, "COURIER_CONFIG": str(cfg),
           "COURIER_QUEUE_PREFIX": queue_prefix, "COURIER_MAX_MESSAGE_BYTES": str(LIMIT)}
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # nosec B603  # fixed argv, no shell
            [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--no-control-socket",
             "courier.app:create_app()"], env=env, stdout=out, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        token = make_token()
        # Its first use sets last_used_at: done here, so the tests' snapshots see only what they send.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /api/openapi.json HTTP/1.1\r\nHost: courier\r\nConnection: close\r\nAuthorization: "
                      + token["Authorization"].encode() + b"\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.1 200"
        yield port, token
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def raw_post(port: int, token: dict, header_lines: bytes, body: bytes = b"", *, chunked: bool = False,
             content_type: bytes = b"application/json") -> tuple[int, dict, bytes]:
    """POST /api/v1/messages as raw bytes; (status, headers, body) of the answer."""
    body = body or json.dumps(event()).encode()
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: " + str(len(body)).encode()
    if chunked:  # 64 KiB chunks, then the last (empty) one
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                        for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    request = (b"POST /api/v1/messages HTTP/1.1\r\nHost: courier\r\nConnection: close\r\n"
               b"Authorization: " + token["Authorization"].encode() + b"\r\nContent-Type: " + content_type + b"\r\n"
               + framing + b"\r\n" + header_lines + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        try:
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all: the answer is still there
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    head, _, content = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, content


@pytest.mark.parametrize("header_lines", [
    pytest.param(b"Idempotency-Key: k-1\nX-Evil: 1", id="idempotency-key-bare-lf"),
    pytest.param(b"Idempotency-Key: k-1\rX-Evil: 1", id="idempotency-key-bare-cr"),
    pytest.param(b"Idempotency-Key: k-1\x00x", id="idempotency-key-nul"),
    pytest.param(b"Idempotency-Key: k-1\x01x", id="idempotency-key-soh"),
    pytest.param(b"Idempotency-Key: k-1\r\n x", id="idempotency-key-folded"),
    pytest.param(b"X-Correlation-ID: abc\rSet-Cookie: evil=1", id="correlation-id-bare-cr"),
    pytest.param(b"X-Correlation-ID: abc\x7fdef", id="correlation-id-del"),
])
def test_control_characters_in_header_values_are_refused_by_the_server(gunicorn, store, header_lines):
    """gunicorn refuses them before the app runs (400, its own short HTML page naming only the header)."""
    port, token = gunicorn
    before = snapshot(store)
    status, headers, content = raw_post(port, token, header_lines)
    assert status == 400, content
    assert b"Invalid HTTP Header" in content or b"line folding" in content, content
    assert "set-cookie" not in headers and b"evil" not in content and b"x-evil" not in content.lower()
    assert_no_leak(content.decode("latin-1"))
    assert snapshot(store) == before


def test_crlf_in_header_values_only_ends_the_header_and_injects_nothing(gunicorn, store):
    """A CRLF inside a header value is the end of that header. What follows is a header of its own,
    and neither reaches past the app's checks: an ingest token posts as its own source whatever
    X-Courier-Source says, and the correlation id echoed is the valid one, never the extra line."""
    port, token = gunicorn
    status, headers, content = raw_post(
        port, token, b"Idempotency-Key: k-crlf\r\nX-Courier-Source: other\r\n"
                     b"X-Correlation-ID: cid-1\r\nSet-Cookie: evil=1")
    assert status == 202, content
    assert headers["x-correlation-id"] == "cid-1" and "set-cookie" not in headers
    with store.session() as s:
        message = s.get(Message, json.loads(content)["id"])
        assert (message.source, message.dedup_key, message.correlation_id) == ("lab", "k-crlf", "cid-1")
    # An unusable correlation id is replaced (it is Courier's to make), never echoed.
    status, headers, content = raw_post(port, token, b"X-Correlation-ID: a b;c\xff",
                                        json.dumps(event(id="evt-2")).encode())
    assert status == 202 and re.fullmatch(r"[0-9a-f]{32}", headers["x-correlation-id"]), (headers, content)
    # And an Idempotency-Key with bytes beyond ASCII reaches the app, which says what is wrong.
    before = snapshot(store)
    status, headers, content = raw_post(port, token, b"Idempotency-Key: \xff\xfe'--")
    body = json.loads(content)
    assert status == 400 and "Idempotency-Key header" in body["error"]["message"], body
    assert snapshot(store) == before


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("kind", ["json", "hl7"])
def test_an_oversized_body_is_a_413_with_or_without_a_content_length(gunicorn, store, chunked, kind):
    """Through the real server: a declared length over the limit, and a chunked body (no length
    given) that grows past it. Chunked, Werkzeug used to stop at the limit without a word: the JSON
    was a 400 for a cut string, the HL7 message, cut inside its NTE, was accepted truncated."""
    port, token = gunicorn
    before = snapshot(store)
    if kind == "json":
        body, content_type = json.dumps(event(data={"x": "y" * LIMIT})).encode(), b"application/json"
    else:
        body, content_type = (hl7("BIG-1") + "NTE|1||" + "x" * LIMIT + "\r").encode(), b"application/hl7-v2"
    status, _, content = raw_post(port, token, b"X-Test: big", body, chunked=chunked, content_type=content_type)
    body = json.loads(content)
    assert status == 413 and body["error"]["code"] == "too_large", body
    assert f"limit of {LIMIT} bytes" in body["error"]["message"]
    assert_no_leak(content.decode())
    assert snapshot(store) == before


def test_a_chunked_body_of_exactly_the_limit_is_accepted_whole(gunicorn, store):
    port, token = gunicorn
    head = hl7("EXACT-1") + "NTE|1||"
    body = (head + "x" * (LIMIT - len(head) - 1) + "\r").encode()
    assert len(body) == LIMIT
    status, _, content = raw_post(port, token, b"X-Test: exact", body, chunked=True, content_type=b"application/hl7-v2")
    assert status == 202, content
    with store.session() as s:
        stored = s.get(Message, json.loads(content)["id"]).body
    assert stored.count(b"x") == body.count(b"x")


# --- MLLP: the same refusals as ACKs -------------------------------------------------------------

MLLP_LIMIT = 4096
MLLP_CASES = [
    ("garbage-frame", frame(b"GET / HTTP/1.1\r\nHost: courier\r\n\r\n"), "MSH"),
    ("binary-frame", frame(bytes(range(1, 256)) * 4), "MSH"),
    ("truncated-in-msh", frame(hl7("T-1").encode()[:40]), "MSH-9"),
    ("utf16-with-bom", frame(hl7("U-1").encode("utf-16")), "NUL byte"),
    ("nul-in-pid", frame(hl7("N-1", pid=f"PID|1||{MRN}\x00||{PATIENT}").encode()), "NUL byte"),
    ("control-char-in-msh10", frame(hl7("C\x01-1").encode()), "MSH-10"),
    ("oversize-frame", START_BLOCK + hl7("BIG").encode() + b"NTE|1||" + b"x" * MLLP_LIMIT, "larger than"),
    ("batch-with-empty-msh10-member", frame(("BHS|^~\\&|LAB|HOSP\r" + hl7("OK-1") + hl7("") + "BTS|2\r").encode()),
     "message 2"),
]


@pytest.fixture
def mllp(tmp_path, store, queue_prefix):
    small = settings_for(write_mllp_config(tmp_path / "c.yml", tmp_path), store.url, queue_prefix,
                         max_message_bytes=MLLP_LIMIT)
    with listener_thread(small, store, idle_timeout=30, frame_timeout=10) as running:
        with Client(running.port) as client:  # something stored first, so a change would show
            assert acks(client.exchange(hl7("SEED-1").encode()))[0][:2] == ("AA", "SEED-1")
        yield running


@pytest.mark.parametrize(("raw", "says"), [pytest.param(*row[1:], id=row[0]) for row in MLLP_CASES])
def test_hostile_mllp_input_gets_ar_with_its_reason_and_nothing_stored_changes(mllp, store, raw, says):
    before = snapshot(store)
    with Client(mllp.port) as client:
        client.send_raw(raw)
        answer = client.read_frame()
    got = acks(answer)
    assert got and {code for code, _, _ in got} == {"AR"}, got
    assert all(reason for _, _, reason in got) and says in got[0][2], got
    assert b"\rERR|" in answer, answer  # and the reason as an ERR segment
    assert_no_leak(answer.decode("utf-8", "replace"))
    assert snapshot(store) == before
    with Client(mllp.port) as client:  # the listener still serves
        assert acks(client.exchange(hl7("AFTER-1").encode()))[0][0] == "AA"


# --- injection material that is valid HL7 is accepted and stored literally ---------------------------

# MSH-10 is ST: legacy engines put spaces, quotes and '%' in it. Bound parameters make SQL
# metacharacters harmless, so refusing them would only refuse real feeds.
LITERAL_IDS = [SQL, "100%", "A B_1", "x' OR '1'='1"]


def _stored_ids(store, before: dict) -> list[str]:
    with store.session() as s:
        return s.scalars(select(Message.dedup_key).order_by(Message.received_at)).all()[before["courier_messages"][0]:]


@pytest.mark.parametrize("control_id", LITERAL_IDS)
def test_sql_metacharacters_in_msh10_are_stored_literally_over_http(api, client, store, control_id):
    before = snapshot(store)
    r = client.post("/api/v1/messages", data=hl7(control_id).encode(), content_type="application/hl7-v2",
                    headers=api["ingest"])
    assert r.status_code == 202, r.get_json()
    assert _stored_ids(store, before) == [control_id]
    after = snapshot(store)
    assert set(after) == set(before) and after["courier_messages"][0] == before["courier_messages"][0] + 1


@pytest.mark.parametrize("control_id", LITERAL_IDS)
def test_sql_metacharacters_in_msh10_are_stored_literally_over_mllp(mllp, store, control_id):
    before = snapshot(store)
    with Client(mllp.port) as client:
        assert acks(client.exchange(hl7(control_id).encode()))[0][:2] == ("AA", control_id)  # MSA-2 echoes it
    assert _stored_ids(store, before) == [control_id]
    assert set(snapshot(store)) == set(before)


# --- path traversal: file names come from the delivery id only ------------------------------------

TRAVERSAL = "../../etc/passwd"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_message_fields_with_path_traversal_never_name_a_file(tmp_path, store, queue_prefix, make_token):
    """An event id, Idempotency-Key and MSH-10 of "../../etc/passwd" and the like (allowed: '.' and '/' are
    valid key characters) are delivered to a file destination: one file each, in the directory, named
    <delivery id>.<suffix>, and nothing anywhere else."""
    drop = tmp_path / "a" / "b" / "drop"
    drop.mkdir(parents=True)
    cfg = write_config(tmp_path / "courier.yml", {"drop": drop.as_uri()})
    flask_app = create_app(settings_for(cfg, store.url, queue_prefix), {"TESTING": True})
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    client, headers = flask_app.test_client(), make_token()
    before = _files(tmp_path)
    answers = [
        client.post("/api/v1/messages", json=event(id=TRAVERSAL), headers=headers),
        client.post("/api/v1/messages", json=event(id="evt-2"), headers={**headers, "Idempotency-Key": "/etc/x"}),
        client.post("/api/v1/messages", data=hl7("../../etc/shadow").encode(), content_type="application/hl7-v2",
                    headers=headers),
    ]
    assert [r.status_code for r in answers] == [202] * 3, [r.get_json() for r in answers]
    with store.session() as s:
        assert sorted(m.dedup_key for m in s.scalars(select(Message))) == sorted([TRAVERSAL, "/etc/x", "../../etc/shadow"])
        claimed = outbox.claim_due(s, lease=60, limit=10)
    statuses = run_batch(flask_app.extensions["courier.settings"], store,
                         [(c.delivery_id, c.dispatch) for c in claimed])
    ids = {r.get_json()["deliveries"][0]["id"]: suffix for r, suffix in zip(answers, (".json", ".json", ".hl7"))}
    assert statuses == {i: "delivered" for i in ids}
    written = {f"a/b/drop/{i}{suffix}" for i, suffix in ids.items()}
    assert _files(tmp_path) - before == written
    assert not list(tmp_path.rglob("passwd")) + list(tmp_path.rglob("shadow")) and not (tmp_path / "a" / "etc").exists()


@pytest.mark.parametrize("delivery_id", [
    TRAVERSAL, "..", ".", "a/b", "/etc/passwd", "..\\..\\x", "a\x00b", "a\nb", "", "x" * 201, "ÿ",
    ".hidden", "a.json",
])
def test_the_file_adapter_refuses_a_hostile_delivery_id_and_writes_nothing(tmp_path, delivery_id):
    drop = tmp_path / "drop"
    drop.mkdir()
    out = Outgoing(delivery_id=delivery_id, message_id="m", correlation_id="c", body=b"x",
                   content_type="application/json", message_type="t")
    with pytest.raises(PermanentError, match="not a safe file name"):
        FileAdapter(drop.as_uri()).send(out)
    assert _files(tmp_path) == set()


# --- hypothesis: the body parsers raise only IngestError -----------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
FRAGMENTS = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\u0000", b"\\ud800", b"1e999", b"NaN",
                             b"-", b"0" * 5000, b"\xff", b"\xef\xbb\xbf", b"\x00", b'"type"', b'"data"', b"{}"])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_cleanly(content_type: str, body: bytes) -> None:
    try:
        parsed, _ = parse_body(content_type, body)
    except IngestError as exc:
        assert 400 <= exc.status < 500 and exc.code and exc.message, vars(exc)
        assert_no_leak(exc.message)
        return
    assert parsed and all(p.message_type for p in parsed)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_any_bytes_as_json_or_hl7_raise_only_ingest_error(data):
    for content_type in ("application/json", "application/hl7-v2"):
        _parse_cleanly(content_type, data)


@FUZZ
@given(st.lists(FRAGMENTS | st.binary(max_size=8), max_size=40).map(b"".join))
def test_fuzz_json_shaped_fragments_raise_only_ingest_error(data):
    _parse_cleanly("application/json", data)


@FUZZ
@given(JSONISH, st.sampled_from(["type", "id", "occurred_at", "version", "data"]))
def test_fuzz_any_json_value_in_the_envelope_raises_only_ingest_error(value, key):
    """Valid JSON of every shape, in every envelope field: accepted or an IngestError, never another."""
    doc = {"type": "lab.result", "data": {}, key: value}
    _parse_cleanly("application/json", json.dumps(doc).encode())
    try:
        assert isinstance(json_object(json.dumps(value).encode()), dict)
    except IngestError as exc:
        assert exc.status in (400, 422)


@pytest.mark.parametrize("depth", [1, 61, 62, 63, 500, 5000, 200_000])
def test_nesting_up_to_the_limit_is_parsed_and_deeper_is_400(depth):
    """The envelope and data take 2 levels, so 62 arrays reach MAX_JSON_DEPTH (64) exactly."""
    body = b'{"type": "t", "data": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    if depth <= MAX_JSON_DEPTH - 2:
        assert parse_body("application/json", body)[0][0].message_type == "t"
    else:
        with pytest.raises(IngestError) as exc:
            parse_body("application/json", body)
        assert exc.value.status == 400 and f"more than {MAX_JSON_DEPTH} levels" in exc.value.message


def test_the_snapshot_sees_a_change_to_any_stored_row(api, store):
    """The no-change checks can fail: one column of one row changed, same row counts, another snapshot."""
    before = snapshot(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE courier_deliveries SET attempts = attempts + 1 "
                          "WHERE id = (SELECT min(id) FROM courier_deliveries)"))
    after = snapshot(store)
    assert after["courier_deliveries"][0] == before["courier_deliveries"][0] > 0
    assert after["courier_deliveries"] != before["courier_deliveries"]
