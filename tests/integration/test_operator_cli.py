"""The operator's shell view (`courier messages show`, `deliveries list`, `stats`) and the audited token commands,
run as the real `courier` console script against the run's PostgreSQL database."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from courier.app.store import audit, circuits
from courier.app.store.models import DEAD, DELIVERED, PENDING, RETRYING, Attempt, AuditRecord, Delivery, utcnow
from tests.integration.test_cli import courier
from tests.integration.test_retention import add_message


@pytest.fixture
def run(config_file, store):
    def run(*args: str):
        result = courier(*args, config=config_file, database_url=store.url)
        assert "Traceback" not in result.stderr, result.stderr
        return result
    return run


def deliveries_of(store, message_id: str) -> list[Delivery]:
    with store.session() as session:
        return list(session.scalars(select(Delivery).where(Delivery.message_id == message_id)
                                    .order_by(Delivery.destination)))


def test_messages_show_is_the_trace_without_the_body(run, store):
    message_id = add_message(store, [DEAD, RETRYING], age=timedelta(minutes=5))  # billing dead, erp retrying
    billing, erp = deliveries_of(store, message_id)
    with store.session() as session:
        session.add(Attempt(delivery_id=billing.id, number=1, started_at=utcnow(), duration_ms=12,
                            outcome="permanent", status_code=422, detail="HTTP 422: \x1b[31mbad field"))
        session.get(Delivery, billing.id).last_error = "HTTP 422: bad field"
        session.get(Delivery, billing.id).attempts = 1

    shown = run("messages", "show", message_id)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert message_id in out and billing.id in out and erp.id in out
    assert "dead" in out and "retrying" in out and "HTTP 422: bad field" in out and "permanent" in out
    assert "\x1b" not in out  # a destination's reply cannot drive the operator's terminal
    assert '"phi"' not in out  # never the body

    doc = json.loads(run("messages", "show", message_id, "--json").stdout)
    assert doc["id"] == message_id and doc["body_purged"] is False
    assert [d["status"] for d in doc["deliveries"]] == [DEAD, RETRYING]
    assert doc["deliveries"][0]["attempt_log"][0]["status_code"] == 422
    assert "body" not in doc

    missing = run("messages", "show", "nope")
    assert missing.returncode == 1 and "no message 'nope'" in missing.stderr


def test_deliveries_list_filters(run, store):
    dead = add_message(store, [DEAD, DEAD])  # billing and erp
    add_message(store, [DELIVERED, PENDING])
    listed = run("deliveries", "list", "--status", "dead")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].split()[:4] == ["ID", "MESSAGE", "DESTINATION", "STATUS"]
    assert len(rows) == 3 and all(dead in r and " dead " in r for r in rows[1:])

    doc = json.loads(run("deliveries", "list", "--status", "dead", "--destination", "erp", "--json").stdout)
    assert [(d["message_id"], d["destination"], d["status"]) for d in doc["items"]] == [(dead, "erp", DEAD)]

    limited = run("deliveries", "list", "--limit", "1")
    assert len(limited.stdout.splitlines()) == 2 and "--limit" in limited.stderr
    assert run("deliveries", "list", "--status", "lost").returncode == 2
    empty = run("deliveries", "list", "--status", "in_flight")
    assert empty.returncode == 0 and empty.stdout == "" and "no deliveries" in empty.stderr


def test_stats_is_the_reconciliation_with_backlog_and_circuit(run, store, client, make_token):
    add_message(store, [DELIVERED, DELIVERED])  # billing, erp
    add_message(store, [DEAD, RETRYING])
    add_message(store, [PENDING], age=timedelta(days=100))
    with store.session() as session:
        circuits.pause(session, "erp", "cli:t", "upgrade")

    doc = json.loads(run("stats", "--json").stdout)
    assert doc["destinations"]["billing"] == {"accepted": 3, "delivered": 1, "pending": 1, "dead": 1, "backlog": 1,
                                              "circuit": "closed", "paused": False, "configured": True,
                                              "last_success_at": doc["destinations"]["billing"]["last_success_at"]}
    erp = doc["destinations"]["erp"]
    assert (erp["accepted"], erp["delivered"], erp["pending"], erp["dead"], erp["paused"]) == (2, 1, 1, 0, True)
    for d in doc["destinations"].values():
        assert d["accepted"] == d["delivered"] + d["pending"] + d["dead"]
    # The same numbers as the API's reconciliation: one query serves both.
    api = client.get("/api/v1/reconciliation", headers=make_token(scope="operate")).get_json()
    assert api["destinations"] == {name: {k: d[k] for k in ("accepted", "delivered", "pending", "dead")}
                                   for name, d in doc["destinations"].items()}

    since = (utcnow() - timedelta(days=50)).isoformat()
    windowed = json.loads(run("stats", "--since", since, "--json").stdout)["destinations"]["billing"]
    assert (windowed["accepted"], windowed["pending"], windowed["backlog"]) == (2, 0, 1)

    table = run("stats").stdout.splitlines()
    assert table[0].split() == ["DESTINATION", "ACCEPTED", "DELIVERED", "PENDING", "DEAD", "BACKLOG", "CIRCUIT",
                                "PAUSED", "LAST_SUCCESS"]
    assert table[1].split()[:8] == ["billing", "3", "1", "1", "1", "1", "closed", "no"]
    assert table[2].split()[:8] == ["erp", "2", "1", "1", "0", "1", "closed", "yes"]


def test_token_create_and_revoke_are_audited_without_the_token(run, store):
    created = run("tokens", "create", "--source", "lab", "--name", "lab engine", "--actor", "dana")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip()
    token_id = next(line.split()[1] for line in created.stderr.splitlines() if line.startswith("id:"))
    assert run("tokens", "revoke", token_id).returncode == 0
    assert run("tokens", "revoke", "00000000-0000-7000-8000-000000000000").returncode == 1  # changed nothing

    with store.session() as session:
        rows = list(session.scalars(select(AuditRecord).order_by(AuditRecord.id)))
    assert [(r.action, r.target) for r in rows] == [("token_create", token_id), ("token_revoke", token_id)]
    assert rows[0].actor == "cli:dana" and rows[1].actor == audit.cli_actor()
    assert audit.details_of(rows[0]) == {"scope": "ingest", "source": "lab", "name": "lab engine"}
    assert audit.details_of(rows[1])["already_revoked"] is False
    secret = plaintext.removeprefix("courier_")
    assert all(secret not in f"{r.actor}{r.target}{r.reason}{r.details}" for r in rows)

    listed = run("audit", "--action", "token_create")
    assert listed.stdout.count("\n") == 1 and "cli:dana\ttoken_create" in listed.stdout
