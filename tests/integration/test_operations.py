"""Operator actions: replay, pause/resume, the destinations view and the audit log (API and CLI).

On the real PostgreSQL. Dead and delivered deliveries are made the way the worker makes them:
accept through the API, then claim_due / begin_attempt / finish_attempt.
"""
from __future__ import annotations

import getpass
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from courier.app.store import circuits, outbox
from courier.app.store.models import Attempt, AuditRecord, Circuit, Delivery, utcnow
from tests.integration.test_cli import assert_clean_failure, courier

EVENT = {"type": "service.completed", "data": {"service": "US-ABD", "patient": "P1"}}
_seq = iter(range(10**6))


@pytest.fixture
def ingest(make_token):
    return make_token()


@pytest.fixture
def operate(make_token):
    return make_token(scope="operate")


def destinations(app):
    return app.extensions["courier.settings"].routing.destinations


def post(client, headers) -> dict[str, str]:
    """Accept one event routed to billing and erp; returns {destination: delivery id}."""
    r = client.post("/api/v1/messages", data=json.dumps({**EVENT, "id": f"evt-{next(_seq)}"}), headers=headers,
                    content_type="application/json")
    assert r.status_code == 202, r.get_json()
    return {d["destination"]: d["id"] for d in r.get_json()["deliveries"]}


def outcome(result: str, detail: str) -> outbox.Outcome:
    return outbox.Outcome(result, detail, utcnow(), 3, 400 if result == "permanent" else None)


def drive(store, app, results: dict[str, str]) -> dict[str, outbox.Claimed]:
    """Claim every due delivery and finish each with results[destination] ("permanent" -> dead)."""
    dests = destinations(app)
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=100)
    assert sorted(c.destination for c in claimed) == sorted(results), claimed
    for c in claimed:
        with store.session() as s:
            ticket = outbox.begin_attempt(s, c.delivery_id, c.dispatch, dests)
            assert isinstance(ticket, outbox.Ticket), ticket
            outbox.finish_attempt(s, ticket, outcome(results[c.destination], f"HTTP 400 from {c.destination}"),
                                  dests[c.destination])
    return {c.destination: c for c in claimed}


def accepted(client, ingest, store, app, billing="permanent", erp="delivered") -> dict[str, str]:
    """One message whose billing delivery ends `billing` and erp delivery `erp` (dead/delivered)."""
    ids = post(client, ingest)
    drive(store, app, {"billing": billing, "erp": erp})
    return ids


def row(store, delivery_id) -> Delivery:
    with store.session() as s:
        return s.get(Delivery, delivery_id)


def audit_rows(store, action=None) -> list[AuditRecord]:
    with store.session() as s:
        q = select(AuditRecord).order_by(AuditRecord.id)
        if action:
            q = q.where(AuditRecord.action == action)
        return list(s.scalars(q))


def token_id(store, scope):
    from courier.app.store.models import ApiToken
    with store.session() as s:
        return s.scalars(select(ApiToken.id).where(ApiToken.scope == scope)).one()


# --- replay over the API ---------------------------------------------------

def test_replay_of_a_dead_delivery_makes_it_pending_afresh_with_the_same_id(client, ingest, operate, store, app):
    ids = accepted(client, ingest, store, app)
    dead = row(store, ids["billing"])
    assert (dead.status, dead.attempts, dead.dispatches) == ("dead", 1, 1)

    before = utcnow()
    r = client.post(f"/api/v1/deliveries/{ids['billing']}/replay", json={"reason": "billing fixed the charge code"},
                    headers=operate)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert (body["id"], body["status"], body["attempts"], body["last_error"]) == (ids["billing"], "pending", 0, None)
    assert [a["detail"] for a in body["attempt_log"]] == ["HTTP 400 from billing"]  # the old log is kept

    d = row(store, ids["billing"])
    assert (d.status, d.attempts, d.last_error, d.delivered_at, d.dispatches) == ("pending", 0, None, None, 1)
    assert before <= d.due_at <= utcnow()
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Attempt).where(Attempt.delivery_id == d.id)) == 1
    assert row(store, ids["erp"]).status == "delivered"  # the message's other delivery is untouched

    (rec,) = audit_rows(store)
    assert (rec.action, rec.target, rec.reason) == ("replay", ids["billing"], "billing fixed the charge code")
    assert rec.actor == f"token:{token_id(store, 'operate')}"
    details = json.loads(rec.details)
    assert (details["count"], details["ids"], details["skipped"]) == (1, [ids["billing"]], {})

    # It really goes out again: the relay claims it at once.
    with store.session() as s:
        assert [c.delivery_id for c in outbox.claim_due(s, lease=60, limit=10)] == [ids["billing"]]


def test_replay_of_a_delivered_delivery_is_allowed(client, ingest, operate, store, app):
    ids = accepted(client, ingest, store, app)
    r = client.post(f"/api/v1/deliveries/{ids['erp']}/replay", headers=operate)  # no body at all
    assert r.status_code == 200, r.get_json()
    d = row(store, ids["erp"])
    assert (d.status, d.attempts, d.delivered_at) == ("pending", 0, None)
    assert audit_rows(store)[0].reason == ""


def test_replay_of_an_open_or_unknown_delivery_is_refused(client, ingest, operate, store):
    ids = post(client, ingest)  # still pending
    r = client.post(f"/api/v1/deliveries/{ids['billing']}/replay", json={"reason": "x"}, headers=operate)
    assert r.status_code == 409
    err = r.get_json()["error"]
    assert err["code"] == "not_replayable" and "pending" in err["message"] and err["details"]["status"] == "pending"

    missing = client.post("/api/v1/deliveries/00000000-0000-7000-8000-000000000000/replay", headers=operate)
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"

    bad = client.post(f"/api/v1/deliveries/{ids['billing']}/replay", json={"why": "x"}, headers=operate)
    assert bad.status_code == 422 and "why" in bad.get_json()["error"]["details"]["fields"]
    assert audit_rows(store) == []
    assert row(store, ids["billing"]).status == "pending"


def test_a_task_dispatched_before_the_replay_stays_stale(client, ingest, operate, store, app):
    post(client, ingest)
    old = drive(store, app, {"billing": "permanent", "erp": "delivered"})["billing"]
    assert client.post(f"/api/v1/deliveries/{old.delivery_id}/replay", headers=operate).status_code == 200

    with store.session() as s:
        (new,) = outbox.claim_due(s, lease=60, limit=10)
    assert new.delivery_id == old.delivery_id and new.dispatch == old.dispatch + 1  # dispatches were kept
    dests = destinations(app)
    with store.session() as s:  # the pre-replay task, redelivered by the broker
        assert outbox.begin_attempt(s, old.delivery_id, old.dispatch, dests) == "skipped"
    with store.session() as s:
        ticket = outbox.begin_attempt(s, new.delivery_id, new.dispatch, dests)
    assert isinstance(ticket, outbox.Ticket) and ticket.number == 1  # a fresh budget


def test_bulk_replay_touches_only_matching_rows(client, ingest, operate, store, app):
    early = accepted(client, ingest, store, app)                        # billing dead, erp delivered
    t1 = utcnow()
    middle = [accepted(client, ingest, store, app) for _ in range(3)]   # billing dead, erp delivered
    t2 = utcnow()
    late = accepted(client, ingest, store, app, erp="permanent")        # both dead
    open_ = post(client, ingest)                                        # both pending

    r = client.post("/api/v1/deliveries/replay", headers=operate, json={
        "destination": "billing", "status": "dead", "since": t1.isoformat(), "until": t2.isoformat(),
        "reason": "charge codes reloaded"})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["replayed"] == 3 and body["limit_reached"] is False
    assert sorted(body["ids"]) == sorted(m["billing"] for m in middle)
    statuses = {i: row(store, i).status for m in [early, *middle, late, open_] for i in m.values()}
    assert [i for i, s in statuses.items() if s == "pending" and i not in open_.values()] == \
           [m["billing"] for m in middle]
    assert statuses[early["billing"]] == statuses[late["billing"]] == statuses[late["erp"]] == "dead"
    assert all(statuses[m["erp"]] == "delivered" for m in middle)

    (rec,) = audit_rows(store)
    details = json.loads(rec.details)
    assert rec.target.startswith("destination=billing status=dead since=")
    assert details["count"] == 3 and details["filter"]["destination"] == "billing"
    assert details["filter"]["since"] == t1.isoformat() and rec.reason == "charge codes reloaded"

    # No window: the rest of billing's dead ones, in batches of `limit`, oldest first.
    first = client.post("/api/v1/deliveries/replay", headers=operate,
                        json={"destination": "billing", "status": "dead", "limit": 1}).get_json()
    assert first == {"replayed": 1, "ids": [early["billing"]], "limit_reached": True}
    second = client.post("/api/v1/deliveries/replay", headers=operate,
                         json={"destination": "billing", "status": "dead", "limit": 1}).get_json()
    assert second["ids"] == [late["billing"]]
    assert row(store, late["erp"]).status == "dead"  # another destination: never touched

    # status=delivered replays only delivered ones.
    delivered = client.post("/api/v1/deliveries/replay", headers=operate,
                            json={"destination": "erp", "status": "delivered"}).get_json()
    assert sorted(delivered["ids"]) == sorted([early["erp"]] + [m["erp"] for m in middle])
    assert row(store, late["erp"]).status == "dead"


def test_bulk_replay_validates_its_body(client, operate, store):
    def fields(doc):
        r = client.post("/api/v1/deliveries/replay", headers=operate, json=doc)
        assert r.status_code == 422, r.get_json()
        return r.get_json()["error"]["details"]["fields"]

    assert set(fields({})) == {"destination", "status"}
    assert "unknown destination 'nowhere'" in fields({"destination": "nowhere", "status": "dead"})["destination"][0]
    assert set(fields({"destination": "billing", "status": "pending"})) == {"status"}
    assert set(fields({"destination": "billing", "status": "dead", "since": "2026-01-01T00:00:00"})) == {"since"}
    assert set(fields({"destination": "billing", "status": "dead", "since": "2026-02-01T00:00:00Z",
                       "until": "2026-01-01T00:00:00Z"})) == {"until"}
    assert set(fields({"destination": "billing", "status": "dead", "limit": 0})) == {"limit"}
    assert set(fields({"destination": "billing", "status": "dead", "colour": "red"})) == {"colour"}
    not_json = client.post("/api/v1/deliveries/replay", headers=operate, data=b"{nope",
                           content_type="application/json")
    assert not_json.status_code == 400 and not_json.get_json()["error"]["code"] == "malformed"
    assert audit_rows(store) == []


def test_replay_by_ids_reports_what_it_left_alone(client, ingest, store, app):
    dead = accepted(client, ingest, store, app)["billing"]
    pending = post(client, ingest)["billing"]
    with store.session() as s:
        replayed = outbox.replay(s, [dead, pending, "nope"], actor="test", reason="r")
    assert replayed == [dead]
    assert row(store, pending).status == "pending"
    details = json.loads(audit_rows(store)[0].details)
    assert details["skipped"] == {pending: "pending", "nope": "unknown"}
    with store.session() as s, pytest.raises(ValueError):
        outbox.replay(s, [dead], actor="test", destination="billing")


# --- pause and resume ------------------------------------------------------

def test_paused_destination_is_held_while_others_flow(client, ingest, operate, store, app):
    r = client.post("/api/v1/destinations/billing/pause", json={"reason": "billing upgrade tonight"}, headers=operate)
    assert r.status_code == 200, r.get_json()
    view = r.get_json()
    assert view["name"] == "billing" and view["paused"] is True
    assert view["paused_by"] == f"token:{token_id(store, 'operate')}"
    assert view["pause_reason"] == "billing upgrade tonight"

    ids = post(client, ingest)
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10)
    assert [c.delivery_id for c in claimed] == [ids["erp"]]
    assert row(store, ids["billing"]).status == "pending"

    r = client.post("/api/v1/destinations/billing/resume", headers=operate)
    assert r.status_code == 200 and r.get_json()["paused"] is False
    with store.session() as s:
        assert [c.delivery_id for c in outbox.claim_due(s, lease=60, limit=10)] == [ids["billing"]]

    pause, resume = audit_rows(store)
    assert (pause.action, pause.target, pause.reason) == ("pause", "billing", "billing upgrade tonight")
    assert (resume.action, resume.target) == ("resume", "billing")
    assert json.loads(resume.details)["was_paused"] is True


def test_a_task_dispatched_before_the_pause_waits_without_spending_an_attempt(client, ingest, operate, store, app):
    ids = post(client, ingest)
    with store.session() as s:
        claimed = {c.destination: c for c in outbox.claim_due(s, lease=60, limit=10)}
    assert client.post("/api/v1/destinations/billing/pause", json={"reason": "maintenance"},
                       headers=operate).status_code == 200

    c = claimed["billing"]
    with store.session() as s:
        verdict = outbox.begin_attempt(s, c.delivery_id, c.dispatch, destinations(app))
    assert verdict == "waiting"
    held = row(store, ids["billing"])
    assert (held.status, held.attempts) == ("retrying", 0)
    assert held.due_at > utcnow() + timedelta(minutes=30) and "paused" in held.last_error
    with store.session() as s:
        assert outbox.claim_due(s, lease=60, limit=10) == []

    before = utcnow()
    assert client.post("/api/v1/destinations/billing/resume", json={"reason": "done"},
                       headers=operate).status_code == 200
    assert before <= row(store, ids["billing"]).due_at <= utcnow()
    with store.session() as s:
        (again,) = outbox.claim_due(s, lease=60, limit=10)
    # The claim counts its attempt: the first one spent, as the pause spent none.
    assert again.delivery_id == ids["billing"] and row(store, ids["billing"]).attempts == 1
    assert json.loads(audit_rows(store, "resume")[0].details) == {"was_paused": True, "woken": 1}


def test_pause_needs_a_reason_and_a_configured_destination(client, operate, store):
    r = client.post("/api/v1/destinations/billing/pause", json={}, headers=operate)
    assert r.status_code == 422 and "reason" in r.get_json()["error"]["details"]["fields"]
    for action in ("pause", "resume"):
        r = client.post(f"/api/v1/destinations/nowhere/{action}", json={"reason": "x"}, headers=operate)
        assert r.status_code == 404 and "nowhere" in r.get_json()["error"]["message"]
    assert audit_rows(store) == []
    with store.session() as s:
        assert s.get(Circuit, "billing") is None


def test_destinations_view_shows_circuit_and_pause(client, operate, store, app):
    with store.session() as s:
        for _ in range(5):  # the default failure_threshold
            circuits.record(s, destinations(app)["erp"], "d", "temporary", "HTTP 503")
    assert client.post("/api/v1/destinations/billing/pause", json={"reason": "upgrade"},
                       headers=operate).status_code == 200
    items = {d["name"]: d for d in client.get("/api/v1/destinations", headers=operate).get_json()["items"]}
    billing, erp = items["billing"], items["erp"]
    assert (billing["circuit"], billing["paused"], billing["pause_reason"]) == ("closed", True, "upgrade")
    assert billing["consecutive_failures"] == 0 and billing["paused_at"]
    assert (erp["circuit"], erp["paused"], erp["paused_by"], erp["consecutive_failures"]) == ("open", False, None, 5)
    assert datetime.fromisoformat(erp["circuit_open_until"]) > utcnow() and erp["circuit_changed_at"]
    assert {"backlog", "dead", "last_success_at"} <= set(erp)


def test_scopes(client, ingest, operate, make_token, store, app):
    ids = accepted(client, ingest, store, app)
    calls = [("post", f"/api/v1/deliveries/{ids['billing']}/replay", {}),
             ("post", "/api/v1/deliveries/replay", {"destination": "billing", "status": "dead"}),
             ("post", "/api/v1/destinations/billing/pause", {"reason": "x"}),
             ("post", "/api/v1/destinations/billing/resume", {}),
             ("get", "/api/v1/audit", None)]
    for method, url, doc in calls:
        assert getattr(client, method)(url, json=doc, headers=ingest).status_code == 403, url
        assert getattr(client, method)(url, json=doc).status_code == 401, url
    assert row(store, ids["billing"]).status == "dead" and audit_rows(store) == []
    admin = make_token(scope="admin")
    for i, (method, url, doc) in enumerate(calls):
        assert getattr(client, method)(url, json=doc, headers=operate if i % 2 else admin).status_code == 200, url


def test_audit_api_filters_and_pages(client, ingest, operate, store, app):
    ids = accepted(client, ingest, store, app)
    client.post("/api/v1/destinations/billing/pause", json={"reason": "one"}, headers=operate)
    client.post(f"/api/v1/deliveries/{ids['billing']}/replay", json={"reason": "two"}, headers=operate)
    client.post("/api/v1/destinations/billing/resume", json={"reason": "three"}, headers=operate)

    everything = client.get("/api/v1/audit", headers=operate).get_json()
    assert [i["reason"] for i in everything["items"]] == ["three", "two", "one"]  # newest first
    assert everything["items"][1]["details"]["ids"] == [ids["billing"]]
    assert client.get("/api/v1/audit?action=replay", headers=operate).get_json()["items"][0]["reason"] == "two"

    page1 = client.get("/api/v1/audit?limit=2", headers=operate).get_json()
    page2 = client.get(f"/api/v1/audit?limit=2&cursor={page1['next_cursor']}", headers=operate).get_json()
    assert [i["reason"] for i in page1["items"] + page2["items"]] == ["three", "two", "one"]
    assert page2["next_cursor"] is None
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert client.get("/api/v1/audit", query_string={"since": future}, headers=operate).get_json()["items"] == []
    assert client.get("/api/v1/audit?cursor=abc", headers=operate).status_code == 400


# --- the CLI ---------------------------------------------------------------

@pytest.fixture
def run(config_file, store):
    def run(*args: str):
        return courier(*args, config=config_file, database_url=store.url)
    return run


CLI_ACTOR = f"cli:{getpass.getuser()}"


def test_cli_replay_by_id(run, client, ingest, store, app):
    ids = accepted(client, ingest, store, app)
    result = run("replay", ids["billing"], ids["erp"], "--reason", "destination fixed")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "replayed 2 deliveries\n"
    assert {row(store, i).status for i in ids.values()} == {"pending"}
    (rec,) = audit_rows(store)
    assert (rec.actor, rec.action, rec.reason) == (CLI_ACTOR, "replay", "destination fixed")
    assert json.loads(rec.details)["count"] == 2


def test_cli_replay_by_id_errors(run, client, ingest, store, app):
    dead = accepted(client, ingest, store, app)["billing"]
    unknown = run("replay", "00000000-0000-7000-8000-000000000000")
    assert_clean_failure(unknown, "no delivery 00000000-0000-7000-8000-000000000000")
    pending = post(client, ingest)["billing"]
    refused = run("replay", pending)
    assert_clean_failure(refused, f"delivery {pending} is pending")
    assert audit_rows(store) == []  # nothing was replayed: nothing to log

    # Mixed: the dead one is replayed, the others are reported, and the exit code says so.
    mixed = run("replay", dead, pending, "nope")
    assert mixed.returncode == 1 and mixed.stdout == "replayed 1 deliveries\n"
    assert "no delivery nope" in mixed.stderr and f"{pending} is pending" in mixed.stderr
    assert row(store, dead).status == "pending"

    both = run("replay", dead, "--destination", "billing")
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr
    neither = run("replay")
    assert neither.returncode == 2 and "--destination" in neither.stderr


def test_cli_replay_by_filter(run, client, ingest, store, app):
    first = accepted(client, ingest, store, app)
    t1 = utcnow()
    second = accepted(client, ingest, store, app, erp="permanent")
    result = run("replay", "--destination", "billing", "--status", "dead", "--since", t1.isoformat(),
                 "--reason", "bulk")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "replayed 1 dead deliveries to billing\n"
    assert row(store, second["billing"]).status == "pending"
    assert row(store, first["billing"]).status == row(store, second["erp"]).status == "dead"

    everything = run("replay", "--destination", "billing", "--status", "dead")
    assert everything.stdout == "replayed 1 dead deliveries to billing\n"
    assert row(store, first["billing"]).status == "pending"
    assert [json.loads(r.details)["count"] for r in audit_rows(store)] == [1, 1]

    assert_clean_failure(run("replay", "--destination", "nowhere", "--status", "dead"), "unknown destination 'nowhere'")
    no_dest = run("replay", "--status", "dead")
    assert no_dest.returncode == 2 and "--destination" in no_dest.stderr
    bad_time = run("replay", "--destination", "billing", "--status", "dead", "--since", "yesterday")
    assert bad_time.returncode == 2 and "not an ISO 8601 time" in bad_time.stderr
    bad_status = run("replay", "--destination", "billing", "--status", "pending")
    assert bad_status.returncode == 2 and "Traceback" not in bad_status.stderr
    assert row(store, second["erp"]).status == "dead" and len(audit_rows(store)) == 2


def test_cli_pause_resume_list_and_audit(run, client, ingest, store):
    paused = run("destinations", "pause", "billing", "--reason", "billing upgrade")
    assert paused.returncode == 0, paused.stderr
    with store.session() as s:
        c = s.get(Circuit, "billing")
        assert (c.paused_by, c.pause_reason) == (CLI_ACTOR, "billing upgrade") and c.paused_at is not None

    ids = post(client, ingest)
    listing = run("destinations", "list")
    assert listing.returncode == 0, listing.stderr
    lines = [line.split() for line in listing.stdout.splitlines()]
    assert lines[0] == ["NAME", "CIRCUIT", "PAUSED", "BACKLOG", "DEAD"]
    assert lines[1][:5] == ["billing", "closed", "yes", "1", "0"] and "upgrade)" in listing.stdout
    assert lines[2] == ["erp", "closed", "no", "1", "0"]

    resumed = run("destinations", "resume", "billing", "--reason", "upgrade done")
    assert resumed.returncode == 0 and resumed.stdout.startswith("resumed billing")
    with store.session() as s:
        assert s.get(Circuit, "billing").paused_at is None
        assert {c.delivery_id for c in outbox.claim_due(s, lease=60, limit=10)} == set(ids.values())
    again = run("destinations", "resume", "billing")
    assert again.returncode == 0 and again.stdout == "billing was not paused\n"

    log = run("audit")
    assert log.returncode == 0, log.stderr
    rows = [line.split("\t") for line in log.stdout.splitlines()]
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        (CLI_ACTOR, "resume", "billing", "-"), (CLI_ACTOR, "resume", "billing", "upgrade done"),
        (CLI_ACTOR, "pause", "billing", "billing upgrade")]
    only_pause = run("audit", "--action", "pause")
    assert len(only_pause.stdout.splitlines()) == 1 and "\tpause\t" in only_pause.stdout
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    none = run("audit", "--since", future)
    assert none.returncode == 0 and none.stdout == "" and "no audit records" in none.stderr


def test_cli_pause_errors(run, store):
    assert_clean_failure(run("destinations", "pause", "nowhere", "--reason", "x"), "unknown destination 'nowhere'")
    assert_clean_failure(run("destinations", "resume", "nowhere"), "unknown destination 'nowhere'")
    no_reason = run("destinations", "pause", "billing")
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    assert audit_rows(store) == []
    with store.session() as s:
        assert s.get(Circuit, "billing") is None


def test_actor_names_the_token_and_its_label(client, ingest, store, app):
    from courier.app.store import tokens

    ids = accepted(client, ingest, store, app)
    with store.session() as s:
        tok, plaintext = tokens.create(s, scope="operate", source=None, name="alice")
    r = client.post(f"/api/v1/deliveries/{ids['billing']}/replay", headers={"Authorization": f"Bearer {plaintext}"})
    assert r.status_code == 200
    assert audit_rows(store)[0].actor == f"token:{tok.id} (alice)"
