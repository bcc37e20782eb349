"""A stock issue and Courier's `supply.consumed` commit together or not at all; Courier's API under /courier."""
from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app import courier
from conftest import BIN, host_env, rows, run, scalar

COUNTS = ("SELECT (SELECT count(*) FROM stock_issues), (SELECT count(*) FROM courier_messages), "
          "(SELECT count(*) FROM courier_deliveries)")


def issue(client, quantity: int, sku: str = "gauze-10"):
    return client.post(f"/stock/{sku}/issues", json={"quantity": quantity, "ward": "4B"})


def test_the_issue_and_its_event_are_one_commit(host):
    r = issue(host.test_client(), 3)
    assert r.status_code == 201, r.get_data(as_text=True)
    issue_id = r.get_json()["issue_id"]
    assert rows(host, COUNTS) == [(1, 1, 1)]
    assert scalar(host, "SELECT on_hand FROM stock_items WHERE sku = 'gauze-10'") == 37
    # Rows written by one transaction carry its id (xmin): the host's row and Courier's are one commit.
    [(issue_xmin, message_xmin, delivery_xmin, idempotency)] = rows(host, """
        SELECT i.xmin::text, m.xmin::text, d.xmin::text, m.dedup_key
        FROM stock_issues i, courier_messages m JOIN courier_deliveries d ON d.message_id = m.id""")
    assert issue_xmin == message_xmin == delivery_xmin
    assert idempotency == f"stock-issue-{issue_id}"


def test_a_rollback_stores_neither(host):
    assert issue(host.test_client(), 41).status_code == 409  # the shelf's CHECK refuses, after the emit
    with pytest.raises(RuntimeError), host.app_context(), \
            Session(host.extensions["supplyroom.engine"]) as session, session.begin():
        courier.emit(session, "supply.consumed", {"sku": "iv-set", "quantity": 1})
        raise RuntimeError("the host changed its mind")
    assert rows(host, COUNTS) == [(0, 0, 0)]
    assert scalar(host, "SELECT on_hand FROM stock_items WHERE sku = 'gauze-10'") == 40


def test_the_courier_api_answers_under_its_prefix(host):
    client = host.test_client()
    assert client.get("/courier/healthz").get_json() == {"status": "ok"}
    # A token made as the host's operators would: `flask --app app courier tokens create`.
    made = run([str(BIN / "flask"), "--app", "app", "courier", "tokens", "create", "--scope", "operate",
                "--name", "host-tests"], host_env(host.config["DATABASE_URL"]))
    headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
    assert issue(client, 2).status_code == 201
    message_id = scalar(host, "SELECT id FROM courier_messages")

    trace = client.get(f"/courier/api/v1/messages/{message_id}", headers=headers)
    assert trace.status_code == 200, trace.get_data(as_text=True)
    body = trace.get_json()
    assert body["id"] == message_id and [d["destination"] for d in body["deliveries"]] == ["erp"]
    assert client.get(f"/courier/api/v1/messages/{message_id}").status_code == 401  # no token, no trace
    assert client.get(f"/api/v1/messages/{message_id}", headers=headers).status_code == 404  # only under /courier
    assert client.get("/stock/iv-set").get_json() == {"sku": "iv-set", "name": "IV administration set",
                                                      "on_hand": 12}
