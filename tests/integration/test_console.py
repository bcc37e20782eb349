"""The operator console (/console/, docs/console.md), view by view, on the real PostgreSQL.

Logged in as a token of each scope: the login, session and CSRF rules, the strict CSP, and every
page and action. Dead and delivered deliveries are made as the worker makes them (test_operations'
`drive`), and every action is checked where it lands: the delivery rows, the circuit row, the audit log.
"""
from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
import requests
from sqlalchemy import select, update
from sqlalchemy import text as text_sql

from courier.app.store import audit, circuits, tokens
from courier.app.store.models import (AuditRecord, Circuit, ConsoleSession, Delivery, Message, MessageLink,
                                      PatientKey, utcnow)
from tests.integration.test_operations import drive, post, row

pytestmark = pytest.mark.postgres

KEY = "k" * 40
MRN, NAME = "MRN77123", "DOE^JANE"
ADT = (f"MSH|^~\\&|LAB|GH|ERP|GH|20261121100000||ADT^A01^ADT_A01|{{id}}|P|2.5\r"
       f"EVN|A01|20261121100000\rPID|1||{MRN}^^^GH^MR||{NAME}||19800101|F\rPV1|1|O|OPD^^^GH\r")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(autouse=True)
def pseudonym_key(monkeypatch):
    monkeypatch.setenv("COURIER_PSEUDONYM_KEY", KEY)


@pytest.fixture
def ingest(make_token):
    return make_token()


class Console:
    """A test client logged in to the console with a token of `scope`, named `scope`-user."""

    def __init__(self, app, store, scope: str):
        self.client = app.test_client()
        with store.session() as session:
            row_, self.plaintext = tokens.create(session, scope=scope, source=None, name=f"{scope}-user")
            self.token_id = row_.id
        self.actor = f"token:{self.token_id} ({scope}-user)"
        page = self.client.get("/console/login")
        response = self.client.post("/console/login", data={"token": self.plaintext, "csrf": csrf_of(page)})
        assert response.status_code == 303, response.get_data(as_text=True)
        self.csrf = csrf_of(self.client.get("/console/"))

    def get(self, path, **kwargs):
        return self.client.get(path, **kwargs)

    def post(self, path, data=None, csrf=True):
        return self.client.post(path, data={**({"csrf": self.csrf} if csrf else {}), **(data or {})})


def csrf_of(response) -> str:
    return CSRF.search(response.get_data(as_text=True)).group(1)


def text(response) -> str:
    return response.get_data(as_text=True)


def done(response) -> str:
    """What an action's redirect says was done (its `done` query parameter)."""
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(response.headers["Location"]).query)["done"][0]


@pytest.fixture
def console(app, store):
    return lambda scope="operate": Console(app, store, scope)


def post_hl7(client, headers, control_id: str) -> dict:
    r = client.post("/api/v1/messages", data=ADT.format(id=control_id), headers=headers,
                    content_type="application/hl7-v2")
    assert r.status_code == 202, r.get_json()
    return r.get_json()


def dead_and_delivered(client, ingest, store, app) -> dict[str, str]:
    ids = post(client, ingest)
    drive(store, app, {"billing": "permanent", "erp": "delivered"})
    return ids


def actions(store, action) -> list[AuditRecord]:
    with store.session() as s:
        return list(s.scalars(select(AuditRecord).where(AuditRecord.action == action).order_by(AuditRecord.id)))


# --- login, session, CSRF, CSP ---------------------------------------------

def test_console_redirects_to_login_without_a_session(client):
    r = client.get("/console/")
    assert r.status_code == 302 and r.headers["Location"].startswith("/console/login")
    r = client.get("/console/messages?status=accepted")
    assert "next=/console/messages" in r.headers["Location"]


def test_login_page_has_a_csrf_token_and_a_strict_csp(client):
    r = client.get("/console/login")
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert csrf_of(r)
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]


def test_login_without_the_form_csrf_token_is_refused(client, store):
    with store.session() as s:
        _, plaintext = tokens.create(s, scope="operate", source=None)
    client.get("/console/login")
    r = client.post("/console/login", data={"token": plaintext, "csrf": "forged"})
    assert r.status_code == 400
    assert client.get("/console/").status_code == 302


def test_login_with_a_token_starts_an_httponly_strict_session_and_is_audited(client, store):
    with store.session() as s:
        row_, plaintext = tokens.create(s, scope="view", source=None, name="night-shift")
    r = client.post("/console/login", data={"token": plaintext, "csrf": csrf_of(client.get("/console/login")),
                                            "next": "/console/messages"})
    assert r.status_code == 303 and r.headers["Location"] == "/console/messages"
    cookie = next(c for c in r.headers.getlist("Set-Cookie") if c.startswith("courier_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the TLS test below
    page = client.get("/console/")
    assert page.status_code == 200 and "night-shift" in text(page)
    assert page.headers["Cache-Control"] == "no-store"
    with store.session() as s:
        stored = s.scalars(select(ConsoleSession)).one()
    raw = cookie.split(";")[0].split("=", 1)[1]
    assert stored.id != raw and len(stored.id) == 64  # only the hash of the cookie is stored
    assert [a.actor for a in actions(store, "console_login")] == [f"token:{row_.id} (night-shift)"]


def test_login_never_redirects_off_the_console(client, store):
    with store.session() as s:
        _, plaintext = tokens.create(s, scope="view", source=None)
    r = client.post("/console/login", data={"token": plaintext, "csrf": csrf_of(client.get("/console/login")),
                                            "next": "//evil.example/x"})
    assert r.headers["Location"] == "/console/"


def test_session_cookie_is_secure_over_tls(app, store):
    client = app.test_client()
    with store.session() as s:
        _, plaintext = tokens.create(s, scope="view", source=None)
    page = client.get("/console/login", base_url="https://localhost")
    r = client.post("/console/login", base_url="https://localhost", data={"token": plaintext, "csrf": csrf_of(page)})
    cookie = next(c for c in r.headers.getlist("Set-Cookie") if c.startswith("courier_console="))
    assert "Secure" in cookie


@pytest.mark.parametrize("credential", ["courier_nope", ""])
def test_login_with_an_unknown_token_is_refused(client, credential):
    r = client.post("/console/login", data={"token": credential, "csrf": csrf_of(client.get("/console/login"))})
    assert r.status_code == 401 and "unknown" in text(r)


def test_an_ingest_token_may_not_use_the_console(client, store):
    with store.session() as s:
        _, plaintext = tokens.create(s, scope="ingest", source="lab")
    r = client.post("/console/login", data={"token": plaintext, "csrf": csrf_of(client.get("/console/login"))})
    assert r.status_code == 401
    assert client.get("/console/").status_code == 302


def test_an_idle_session_ends(console, store):
    c = console("view")
    assert c.get("/console/").status_code == 200
    with store.session() as s:
        s.execute(update(ConsoleSession).values(last_seen_at=utcnow() - timedelta(minutes=31)))
    assert c.get("/console/").status_code == 302
    with store.session() as s:
        assert s.scalars(select(ConsoleSession)).all() == []


def test_revoking_the_token_ends_its_session(console, store):
    c = console("operate")
    with store.session() as s:
        tokens.revoke(s, c.token_id)
    assert c.get("/console/").status_code == 302


def test_logout_needs_the_csrf_token_and_ends_the_session(console, store):
    c = console("view")
    assert c.post("/console/logout", csrf=False).status_code == 400
    assert c.get("/console/").status_code == 200
    r = c.post("/console/logout")
    assert r.status_code == 303 and r.headers["Location"] == "/console/login"
    assert c.get("/console/").status_code == 302
    assert [a.actor for a in actions(store, "console_logout")] == [c.actor]


def test_every_post_without_the_csrf_token_is_refused(console, client, ingest, store, app):
    ids = dead_and_delivered(client, ingest, store, app)
    c = console("admin")
    for path, data in [("/console/dead/replay", {"ids": ids["billing"]}),
                       ("/console/destinations/billing/pause", {"reason": "x"}),
                       ("/console/destinations/billing/reset", {}),
                       ("/console/tokens", {"scope": "view"})]:
        assert c.post(path, data, csrf=False).status_code == 400, path
    assert row(store, ids["billing"]).status == "dead"
    with store.session() as s:
        assert s.get(Circuit, "billing") is None


# --- dashboard --------------------------------------------------------------

def test_dashboard_shows_each_destination_from_the_store(console, client, ingest, store, app):
    dead_and_delivered(client, ingest, store, app)
    post(client, ingest)  # one more, left pending for both
    r = console("view").get("/console/")
    page = text(r)
    billing = re.search(r'data-destination="billing">(.*?)</tr>', page, re.S).group(1)
    erp = re.search(r'data-destination="erp">(.*?)</tr>', page, re.S).group(1)

    def cells(html):
        return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r'<td class="num[^"]*">(.*?)</td>', html, re.S)]
    assert cells(billing)[:3] == ["0 / 0", "1 / 1", "1"]  # delivered, dead, pending
    assert cells(erp)[:3] == ["1 / 1", "0 / 0", "1"]
    assert "<svg" in billing and 'class="bar-dead"' in billing and 'class="bar-ok"' in erp
    assert "circuit-closed" in billing


def test_dashboard_shows_paused_and_open_circuits(console, store, app):
    with store.session() as s:
        circuits.pause(s, "erp", "someone", "maintenance")
        dest = app.extensions["courier.settings"].routing.destinations["billing"]
        for _ in range(dest.circuit.failure_threshold):
            circuits.record(s, dest, "d", "temporary", "HTTP 503")
    page = text(console("view").get("/console/"))
    assert re.search(r'data-destination="billing">.*?circuit-open', page, re.S)
    assert re.search(r'data-destination="erp">.*?badge paused', page, re.S)


# --- message browser ---------------------------------------------------------

def test_search_by_msh10_finds_the_message(console, client, ingest):
    wanted = post_hl7(client, ingest, "CTRL-1")["id"]
    post_hl7(client, ingest, "CTRL-2")
    page = text(console("view").get("/console/messages?idempotency_key=CTRL-1"))
    assert wanted in page and page.count('href="/console/messages/') == 1


def test_search_by_patient_uses_a_keyed_hash_never_the_identifier(console, client, ingest, store):
    wanted = post_hl7(client, ingest, "CTRL-3")["id"]
    post(client, ingest)  # a JSON event of patient P1
    with store.session() as s:
        keys = s.scalars(select(PatientKey)).all()
    assert len(keys) == 2 and all(MRN not in k.patient_key and "P1" != k.patient_key for k in keys)
    page = text(console("view").get(f"/console/messages?patient={MRN}"))
    assert wanted in page and page.count('href="/console/messages/') == 1
    assert text(console("view").get("/console/messages?patient=P1")).count('href="/console/messages/') == 1
    assert "No message matches" in text(console("view").get("/console/messages?patient=NOBODY"))


def test_patient_search_is_off_without_a_key(console, client, ingest, monkeypatch):
    monkeypatch.delenv("COURIER_PSEUDONYM_KEY")
    post_hl7(client, ingest, "CTRL-4")
    page = text(console("view").get(f"/console/messages?patient={MRN}"))
    assert "COURIER_PSEUDONYM_KEY is not set" in page


def test_search_by_destination_and_delivery_status(console, client, ingest, store, app):
    ids = dead_and_delivered(client, ingest, store, app)
    post(client, ingest)
    c = console("view")
    page = text(c.get("/console/messages?destination=billing&delivery_status=dead"))
    with store.session() as s:
        dead_message = s.get(Delivery, ids["billing"]).message_id
    assert dead_message in page and page.count('href="/console/messages/') == 1
    assert text(c.get("/console/messages?destination=erp&delivery_status=dead")).count('href="/console/messages/') == 0
    assert dead_message in text(c.get("/console/messages?delivery_status=dead"))  # any destination
    assert text(c.get("/console/messages?delivery_status=dead")).count('href="/console/messages/') == 1
    assert text(c.get("/console/messages?delivery_status=pending")).count('href="/console/messages/') == 1
    assert text(c.get("/console/messages?delivery_status=delivered")).count('href="/console/messages/') == 1
    assert text(c.get("/console/messages?destination=billing")).count('href="/console/messages/') == 2


def test_search_by_window_source_type_and_id(console, client, ingest):
    event = post(client, ingest)
    hl7 = post_hl7(client, ingest, "CTRL-5")["id"]
    c = console("view")
    assert text(c.get("/console/messages?window=1h")).count('href="/console/messages/') == 2
    assert text(c.get("/console/messages?type=HL7v2:ADT%5EA01")).count('href="/console/messages/') == 1
    assert text(c.get("/console/messages?source=other")).count('href="/console/messages/') == 0
    assert hl7 in text(c.get(f"/console/messages?id={hl7}"))
    assert event


def test_search_pages_by_keyset(console, client, ingest, monkeypatch):
    from courier.app.web import console as console_module

    monkeypatch.setattr(console_module, "PAGE", 2)
    made = [post_hl7(client, ingest, f"PAGE-{i}")["id"] for i in range(5)]
    c = console("view")
    seen, url = [], "/console/messages?source=lab"
    while url:
        page = text(c.get(url))
        seen += re.findall(r'href="/console/messages/([0-9a-f-]{36})"', page)
        found = re.search(r'id="next-page" href="([^"]+)"', page)
        url = found.group(1).replace("&amp;", "&") if found else None
    assert seen == list(reversed(made))


def test_a_bad_filter_is_said_on_the_page(console):
    c = console("view")
    assert "not a cursor" in text(c.get("/console/messages?cursor=zzz"))
    assert "query parameter since" in text(c.get("/console/messages?since=yesterday"))
    assert "delivery_status" in text(c.get("/console/messages?delivery_status=lost"))


# --- message detail -----------------------------------------------------------

def test_detail_shows_hl7_fields_by_name_the_sent_body_and_the_attempts(console, client, ingest, store, app):
    message_id = post_hl7(client, ingest, "CTRL-6")["id"]
    drive(store, app, {"billing": "permanent", "erp": "delivered"})
    c = console("operate")
    page = text(c.get(f"/console/messages/{message_id}"))
    assert "PID-5" in page and "Patient Name" in page and "DOE^JANE" in page
    assert "MSH-10" in page and "Message Control ID" in page and "CTRL-6" in page
    assert "Sent to billing (after transform passthrough)" in page
    assert "HTTP 400 from billing" in page and "permanent" in page and "3 ms" in page
    assert [a.target for a in actions(store, "view_body")] == [message_id]
    assert actions(store, "view_body")[0].actor == c.actor


def test_a_view_token_sees_statuses_and_errors_but_no_body_or_phi(console, client, ingest, store, app):
    message_id = post_hl7(client, ingest, "CTRL-7")["id"]
    drive(store, app, {"billing": "permanent", "erp": "delivered"})
    page = text(console("view").get(f"/console/messages/{message_id}"))
    assert 'id="body-hidden"' in page
    assert MRN not in page and "DOE" not in page and "PID-" not in page
    assert "HTTP 400 from billing" in page and "dead" in page
    assert actions(store, "view_body") == []


def test_detail_of_an_unknown_message_is_404(console):
    r = console("view").get("/console/messages/nope")
    assert r.status_code == 404 and "no message" in text(r)


def test_edit_then_resend_makes_a_linked_new_message_and_keeps_the_original(console, client, ingest, store):
    original = post_hl7(client, ingest, "CTRL-8")["id"]
    c = console("operate")
    edited = ADT.format(id="CTRL-8").replace("DOE^JANE", "DOE^JOAN").replace("\r", "\n")
    r = c.post(f"/console/messages/{original}/resend", {"body": edited, "reason": "name typo"})
    assert r.status_code == 303
    with store.session() as s:
        link = s.scalars(select(MessageLink)).one()
        assert link.original_id == original and link.actor == c.actor
        new, old = s.get(Message, link.message_id), s.get(Message, original)
        assert b"DOE^JOAN" in new.body and b"\r" in new.body and b"DOE^JANE" in old.body
        assert len(new.deliveries) == 2
    record = actions(store, "resend")[0]
    assert record.target == original and record.reason == "name typo"
    assert audit.details_of(record)["new_message_id"] == link.message_id
    assert f"/console/messages/{original}" in text(c.get(f"/console/messages/{link.message_id}"))


def test_a_view_token_may_not_resend(console, client, ingest):
    original = post_hl7(client, ingest, "CTRL-9")["id"]
    assert console("view").post(f"/console/messages/{original}/resend", {"body": "x"}).status_code == 403


def test_a_resend_that_does_not_parse_is_refused_and_nothing_is_stored(console, client, ingest, store):
    original = post_hl7(client, ingest, "CTRL-10")["id"]
    r = console("operate").post(f"/console/messages/{original}/resend", {"body": "not hl7", "reason": "x"})
    assert done(r).startswith("not resent: not a valid HL7 v2 message")
    with store.session() as s:
        assert s.scalars(select(MessageLink)).all() == []


# --- dead letters ---------------------------------------------------------

def test_dead_letters_are_grouped_by_destination_and_error(console, client, ingest, store, app):
    dead_and_delivered(client, ingest, store, app)
    dead_and_delivered(client, ingest, store, app)
    page = text(console("view").get("/console/dead"))
    group = re.search(r'<table class="grid" id="groups">(.*?)</table>', page, re.S).group(1)
    assert "HTTP 400 from billing" in group and '<td class="num">2</td>' in group
    assert "2 dead deliveries match" in page
    assert "Replay selected" not in page  # a view token sees no replay button


def test_replay_of_one_dead_delivery_from_the_console(console, client, ingest, store, app):
    ids = dead_and_delivered(client, ingest, store, app)
    c = console("operate")
    r = c.post("/console/dead/replay", {"ids": ids["billing"], "reason": "fixed the mapping"})
    assert r.status_code == 303 and done(r) == "replayed 1 of 1"
    assert row(store, ids["billing"]).status == "pending"
    record = actions(store, "replay")[-1]
    assert record.actor == c.actor and record.reason == "fixed the mapping"


def test_replay_of_everything_matching_is_capped_and_says_what_is_left(console, client, ingest, store, app,
                                                                        monkeypatch):
    from courier.app.web import console as console_module

    monkeypatch.setattr(console_module, "BULK_CAP", 2)
    made = [dead_and_delivered(client, ingest, store, app)["billing"] for _ in range(3)]
    c = console("operate")
    r = c.post("/console/dead/replay", {"all": "1", "destination": "billing", "error": "HTTP 400 from billing"})
    assert done(r) == "replayed 2 of 2; 1 more match: replay again for the next 2"
    assert sorted(row(store, i).status for i in made) == ["dead", "pending", "pending"]
    c.post("/console/dead/replay", {"all": "1", "destination": "billing", "error": "HTTP 400 from billing"})
    assert [row(store, i).status for i in made] == ["pending"] * 3


def test_a_view_token_may_not_replay(console, client, ingest, store, app):
    ids = dead_and_delivered(client, ingest, store, app)
    assert console("view").post("/console/dead/replay", {"ids": ids["billing"]}).status_code == 403
    assert row(store, ids["billing"]).status == "dead"


# --- destination controls ------------------------------------------------------

def test_pause_needs_a_reason_then_holds_and_resume_lifts_it(console, store):
    c = console("operate")
    r = c.post("/console/destinations/billing/pause", {"reason": ""})
    assert done(r) == "not paused: give a reason"
    with store.session() as s:
        assert s.get(Circuit, "billing") is None
    c.post("/console/destinations/billing/pause", {"reason": "billing upgrade tonight"})
    with store.session() as s:
        paused = s.get(Circuit, "billing")
        assert paused.paused_at is not None and paused.paused_by == c.actor
    assert "billing upgrade tonight" in text(c.get("/console/destinations/billing"))
    c.post("/console/destinations/billing/resume", {"reason": "done"})
    with store.session() as s:
        assert s.get(Circuit, "billing").paused_at is None
    assert [a.action for a in actions(store, "pause") + actions(store, "resume")] == ["pause", "resume"]
    assert all(a.actor == c.actor for a in actions(store, "pause") + actions(store, "resume"))


def test_reset_closes_an_open_circuit_and_wakes_what_it_held(console, client, ingest, store, app):
    dest = app.extensions["courier.settings"].routing.destinations["billing"]
    ids = post(client, ingest)
    with store.session() as s:
        for _ in range(dest.circuit.failure_threshold):
            circuits.record(s, dest, "d", "temporary", "HTTP 503")
        s.execute(update(Delivery).where(Delivery.id == ids["billing"]).values(
            status="retrying", due_at=utcnow() + timedelta(hours=1), last_error=f"{circuits.WAITING}circuit open"))
    c = console("operate")
    assert "circuit-open" in text(c.get("/console/destinations/billing"))
    r = c.post("/console/destinations/billing/reset", {"reason": "billing is back"})
    assert done(r) == "circuit reset (it was open)"
    with store.session() as s:
        assert s.get(Circuit, "billing").state == "closed"
        assert s.get(Delivery, ids["billing"]).due_at <= utcnow()
    assert audit.details_of(actions(store, "circuit_reset")[0]) == {"was": "open", "woken": 1}


def test_replay_everything_dead_since_a_time(console, client, ingest, store, app):
    ids = dead_and_delivered(client, ingest, store, app)
    c = console("operate")
    future = (utcnow() + timedelta(hours=1)).isoformat()
    c.post("/console/destinations/billing/replay", {"since": future})
    assert row(store, ids["billing"]).status == "dead"
    r = c.post("/console/destinations/billing/replay", {"since": "not a time"})
    assert done(r).startswith("not replayed: give a time")
    c.post("/console/destinations/billing/replay", {"since": (utcnow() - timedelta(hours=1)).isoformat()})
    assert row(store, ids["billing"]).status == "pending"


def test_controls_of_an_unknown_destination_are_404(console):
    c = console("operate")
    assert c.get("/console/destinations/nowhere").status_code == 404
    assert c.post("/console/destinations/nowhere/pause", {"reason": "x"}).status_code == 404
    assert c.post("/console/destinations/billing/explode", {}).status_code == 404


def test_a_view_token_sees_no_controls_and_may_not_pause(console, store):
    c = console("view")
    assert 'id="pause"' not in text(c.get("/console/destinations/billing"))
    assert c.post("/console/destinations/billing/pause", {"reason": "x"}).status_code == 403


def test_circuit_reset_over_the_json_api_is_the_same_action(client, make_token, store, app):
    dest = app.extensions["courier.settings"].routing.destinations["erp"]
    with store.session() as s:
        for _ in range(dest.circuit.failure_threshold):
            circuits.record(s, dest, "d", "temporary", "boom")
    assert client.post("/api/v1/destinations/erp/reset", headers=make_token(scope="view")).status_code == 403
    r = client.post("/api/v1/destinations/erp/reset", headers=make_token(scope="operate"),
                    data=json.dumps({"reason": "back"}), content_type="application/json")
    assert r.status_code == 200 and r.get_json()["circuit"] == "closed"
    assert actions(store, "circuit_reset")[0].reason == "back"


def test_a_view_token_reads_the_json_api_but_never_acts(client, make_token, ingest, store, app):
    ids = dead_and_delivered(client, ingest, store, app)
    view = make_token(scope="view")
    assert client.get("/api/v1/destinations", headers=view).status_code == 200
    assert client.get("/api/v1/messages", headers=view).status_code == 200
    assert client.post(f"/api/v1/deliveries/{ids['billing']}/replay", headers=view).status_code == 403
    assert client.post("/api/v1/messages", headers=view, data="{}", content_type="application/json").status_code == 403


# --- audit, alerts, tokens ------------------------------------------------------

def test_audit_log_is_searchable(console, store):
    c = console("operate")
    c.post("/console/destinations/billing/pause", {"reason": "upgrade 42"})
    c.post("/console/destinations/erp/pause", {"reason": "disk full"})
    page = text(c.get("/console/audit?action=pause&q=upgrade"))
    rows = re.search(r'<table class="grid" id="audit">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    assert "upgrade 42" in rows and "disk full" not in rows and c.actor in rows
    assert "disk full" in text(c.get("/console/audit?q=disk"))
    assert "Nothing recorded" in text(c.get("/console/audit?actor=nobody-at-all"))


def test_tokens_page_is_for_admins_only(console):
    assert console("operate").get("/console/tokens").status_code == 403


def test_an_admin_creates_a_token_shown_once_and_revokes_it(console, store):
    c = console("admin")
    page = text(c.post("/console/tokens", {"scope": "view", "name": "auditor"}))
    plaintext = re.search(r'<code id="new-token">([^<]+)</code>', page).group(1)
    with store.session() as s:
        created = tokens.authenticate(s, plaintext)
        assert created.scope == "view" and created.name == "auditor"
        token_id = created.id
    assert plaintext not in text(c.get("/console/tokens"))
    c.post("/console/tokens", {"revoke": token_id})
    with store.session() as s:
        assert tokens.authenticate(s, plaintext) is None
    assert [a.target for a in actions(store, "token_create")] == [token_id]
    assert [a.target for a in actions(store, "token_revoke")] == [token_id]
    assert actions(store, "token_revoke")[0].actor == c.actor


def test_alerts_notify_once_when_firing_and_once_when_cleared(client, ingest, store, app, monkeypatch, console):
    from courier.app.store import alerts

    monkeypatch.setenv("COURIER_ALERT_BACKLOG", "0")
    settings = app.extensions["courier.settings"]
    post(client, ingest)
    with store.session() as s:
        first = alerts.evaluate(s, settings)
    with store.session() as s:
        second = alerts.evaluate(s, settings)
    assert sorted((n["rule"], n["state"]) for n in first) == [("billing:backlog", "firing"),
                                                               ("erp:backlog", "firing")]
    assert second == []
    assert "billing:backlog" in text(console("view").get("/console/"))
    drive(store, app, {"billing": "delivered", "erp": "delivered"})
    with store.session() as s:
        cleared = alerts.evaluate(s, settings)
    assert sorted((n["rule"], n["state"]) for n in cleared) == [("billing:backlog", "cleared"),
                                                                 ("erp:backlog", "cleared")]
    assert "firing" not in text(console("view").get("/console/alerts")).split("<h2>Rules")[0].split("<tbody>")[1]


def test_alert_rules_on_dead_growth_and_circuit_open(client, ingest, store, app):
    from courier.app.store import alerts

    settings = app.extensions["courier.settings"]
    dead_and_delivered(client, ingest, store, app)
    dest = settings.routing.destinations["erp"]
    with store.session() as s:
        for _ in range(dest.circuit.failure_threshold):
            circuits.record(s, dest, "d", "temporary", "boom")
        fired = {n["rule"] for n in alerts.evaluate(s, settings)}
    assert fired == {"billing:dead_growth", "erp:circuit_open"}


@pytest.fixture
def webhook(client, ingest, monkeypatch):
    """A webhook sink in COURIER_ALERT_WEBHOOK, the backlog rule at 0, and one message pending for both."""
    from tests.support.sinks import HttpSink

    with HttpSink(200) as sink:
        monkeypatch.setenv("COURIER_ALERT_WEBHOOK", sink.url)
        monkeypatch.setenv("COURIER_ALERT_BACKLOG", "0")
        post(client, ingest)
        yield sink


def test_the_alert_task_posts_each_change_to_the_webhook(webhook, store, app):
    from courier.tasks import alerts as alert_task

    settings = app.extensions["courier.settings"]
    sent = alert_task.check(store, settings)
    assert alert_task.check(store, settings) == []
    got = webhook.wait_for(2)
    assert sorted(json.loads(r.body)["rule"] for r in got) == ["billing:backlog", "erp:backlog"]
    assert len(sent) == 2 and len(webhook.received) == 2


def test_a_failed_webhook_post_is_sent_again_at_the_next_check(webhook, store, app):
    from courier.tasks import alerts as alert_task

    settings = app.extensions["courier.settings"]
    webhook.status = 500
    with pytest.raises(requests.HTTPError):
        alert_task.check(store, settings)
    webhook.status = 200
    assert len(alert_task.check(store, settings)) == 2


def test_under_encryption_at_rest_bodies_are_decrypted_on_view_and_errors_grouped(console, client, ingest, store,
                                                                                   app):
    from cryptography.fernet import Fernet

    from courier.app.store import crypto

    crypto.attach(store.engine, crypto.parse_keys(Fernet.generate_key().decode()), replace=True)
    message_id = post_hl7(client, ingest, "CTRL-ENC")["id"]
    drive(store, app, {"billing": "permanent", "erp": "delivered"})
    dead_and_delivered(client, ingest, store, app)
    with store.engine.connect() as conn:  # as stored: plain SQL, not the columns' decrypting types
        stored = conn.execute(text_sql("SELECT body FROM courier_messages WHERE id = :i"), {"i": message_id}).scalar()
        errors = conn.execute(text_sql("SELECT last_error FROM courier_deliveries WHERE status = 'dead'")).scalars()
        errors = list(errors)
    assert stored.startswith(b"fernet:") and all(e.startswith("fernet:") for e in errors)
    c = console("operate")
    assert "DOE^JANE" in text(c.get(f"/console/messages/{message_id}"))
    group = re.search(r'id="groups">(.*?)</table>', text(c.get("/console/dead")), re.S).group(1)
    assert "HTTP 400 from billing" in group and '<td class="num">2</td>' in group


def test_courier_tokens_create_makes_a_view_token_that_logs_in_to_the_console(app, config_file, store):
    from tests.integration.test_cli import courier

    result = courier("tokens", "create", "--scope", "view", "--name", "auditor", config=config_file,
                     database_url=store.url)
    assert result.returncode == 0, result.stderr
    plaintext = result.stdout.strip()
    client = app.test_client()
    r = client.post("/console/login", data={"token": plaintext, "csrf": csrf_of(client.get("/console/login"))})
    assert r.status_code == 303
    assert '<span class="role role-view" id="role">view</span>' in text(client.get("/console/"))


def test_courier_alerts_checks_once_and_prints_each_change(client, ingest, config_file, store):
    from tests.integration.test_cli import courier

    post(client, ingest)
    first = courier("alerts", config=config_file, database_url=store.url, COURIER_ALERT_BACKLOG="0")
    assert first.returncode == 0, first.stderr
    assert sorted(json.loads(line)["rule"] for line in first.stdout.splitlines()) == ["billing:backlog", "erp:backlog"]
    again = courier("alerts", config=config_file, database_url=store.url, COURIER_ALERT_BACKLOG="0")
    assert again.returncode == 0 and again.stdout == ""
