"""GET /api/v1/messages and /api/v1/deliveries: filters, the [since, until) window, lookup by
idempotency key, parameter validation, and keyset paging on (received_at, id)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time
from sqlalchemy import insert

from courier.app.store.models import Message, new_id

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def post(client, headers, event_id, type_="service.completed"):
    doc = {"type": type_, "id": event_id, "occurred_at": "2026-11-21T10:00:00Z", "data": {"n": event_id}}
    r = client.post("/api/v1/messages", data=json.dumps(doc), headers=headers, content_type="application/json")
    assert r.status_code in (201, 202), r.get_json()
    return r.get_json()["id"]


def seed(store, rows):
    """Messages straight into the store: (source, type, status, dedup_key, received_at) each."""
    with store.session() as s:
        s.execute(insert(Message), [
            {"id": new_id(), "source": src, "type": typ, "content_type": "application/json", "body": b"{}",
             "size": 2, "dedup_key": key, "correlation_id": "c", "status": status, "received_at": at}
            for src, typ, status, key, at in rows])


def ids(client, headers, query):
    r = client.get(f"/api/v1/messages?{query}", headers=headers)
    assert r.status_code == 200, r.get_json()
    return [(m["source"], m["type"], m["status"], m["idempotency_key"]) for m in r.get_json()["items"]]


@pytest.fixture
def op(make_token):
    return make_token(scope="operate")


def test_each_filter_and_the_until_window(client, store, op):
    seed(store, [("lab", "a", "accepted", "k1", T0),
                 ("lab", "b", "unrouted", "k2", T0 + timedelta(hours=1)),
                 ("other", "a", "accepted", "k1", T0 + timedelta(hours=2)),
                 ("other", "b", "accepted", None, T0 + timedelta(hours=3))])
    assert ids(client, op, "status=unrouted") == [("lab", "b", "unrouted", "k2")]
    assert [r[0] for r in ids(client, op, "source=other")] == ["other", "other"]
    assert [r[:2] for r in ids(client, op, "type=a")] == [("other", "a"), ("lab", "a")]
    assert [r[:2] for r in ids(client, op, "source=lab&type=a")] == [("lab", "a")]
    # until is exclusive, since inclusive: [T0+1h, T0+3h) holds the second and third.
    window = f"since={(T0 + timedelta(hours=1)).isoformat()}&until={(T0 + timedelta(hours=3)).isoformat()}"
    assert [r[3] for r in ids(client, op, window.replace("+", "%2B"))] == ["k1", "k2"]
    assert [r[3] for r in ids(client, op, "until=2026-11-01T13:00:00Z")] == ["k1"]
    # The idempotency key alone finds it in every source; with a source, in that one.
    assert [r[0] for r in ids(client, op, "idempotency_key=k1")] == ["other", "lab"]
    assert ids(client, op, "idempotency_key=k1&source=lab") == [("lab", "a", "accepted", "k1")]
    assert ids(client, op, "idempotency_key=nope") == []


@pytest.mark.parametrize("query, parameter", [
    ("status=delivered", "status"), ("since=yesterday", "since"), ("until=2026-11-01T12:00:00", "until"),
    ("until=not-a-time", "until"), ("cursor=abc", "cursor"), ("limit=many", "limit")])
def test_bad_parameters_are_400_naming_the_parameter(client, op, query, parameter):
    r = client.get(f"/api/v1/messages?{query}", headers=op)
    assert r.status_code == 400, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == "malformed" and parameter in error["message"], error


def test_deliveries_filter_and_validate_status(client, make_token, op):
    h = make_token()
    for i in range(3):
        post(client, h, f"e{i}")
    r = client.get("/api/v1/deliveries?destination=billing&status=pending", headers=op).get_json()
    assert len(r["items"]) == 3 and {d["destination"] for d in r["items"]} == {"billing"}
    assert client.get("/api/v1/deliveries?status=dead", headers=op).get_json()["items"] == []
    bad = client.get("/api/v1/deliveries?status=lost", headers=op)
    assert bad.status_code == 400 and "status" in bad.get_json()["error"]["message"]
    page1 = client.get("/api/v1/deliveries?limit=4", headers=op).get_json()
    page2 = client.get(f"/api/v1/deliveries?limit=4&cursor={page1['next_cursor']}", headers=op).get_json()
    assert len({d["id"] for d in page1["items"] + page2["items"]}) == 6 and page2["next_cursor"] is None


def test_paging_returns_each_message_once_in_order_when_many_share_a_time(client, make_token, op):
    h = make_token()
    posted = []
    # Three instants, seven messages each: ties on received_at must be broken by id, across pages.
    for minute in range(3):
        with freeze_time(T0 + timedelta(minutes=minute)):
            posted += [post(client, h, f"m{minute}-{i}") for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        r = client.get(f"/api/v1/messages?limit=4{f'&cursor={cursor}' if cursor else ''}", headers=op).get_json()
        seen += [(m["received_at"], m["id"]) for m in r["items"]]
        pages, cursor = pages + 1, r["next_cursor"]
        if cursor is None:
            break
    assert pages == 6 and len(seen) == 21
    assert sorted(i for _, i in seen) == sorted(posted)
    assert seen == sorted(seen, reverse=True)
    # A filter keeps the cursor's meaning: the same walk over one type.
    first = client.get("/api/v1/messages?limit=5&source=lab", headers=op).get_json()
    rest = client.get(f"/api/v1/messages?limit=50&source=lab&cursor={first['next_cursor']}", headers=op).get_json()
    assert [m["id"] for m in first["items"] + rest["items"]] == [i for _, i in seen]


def test_the_status_filter_uses_an_index(client, store, app):
    """At millions of rows a Seq Scan plus sort of the whole table is what made a list slow."""
    from courier.app.web import api

    seed(store, [(f"s{i % 5}", f"t{i % 20}", "unrouted" if i % 50 == 0 else "accepted", f"k{i}",
                  T0 + timedelta(seconds=i // 3)) for i in range(4000)])
    cursor = api._encode_cursor(T0 + timedelta(minutes=10), "ffffffff")
    with app.test_request_context("/api/v1/messages?status=unrouted"):
        query = api.keyset(api.messages_query(), Message.id, Message.received_at, cursor).limit(101)
        sql = str(query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE courier_messages")
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "ix_courier_messages_unrouted" in plan and "Seq Scan" not in plan, plan


def test_paging_on_sqlite(sqlite_store, config_file, queue_prefix, make_token):
    """SQLite gives times back without their zone: the cursor must still page (the hospital scenario's store)."""
    from courier.app import create_app
    from courier.app.store import tokens
    from tests.support.config import settings_for

    app = create_app(settings_for(config_file, sqlite_store.url, queue_prefix), {"TESTING": True})
    app.extensions["courier.store"].dispose()
    app.extensions["courier.store"] = sqlite_store
    seed(sqlite_store, [("lab", "a", "accepted", f"k{i}", T0 + timedelta(seconds=i // 2)) for i in range(7)])
    with sqlite_store.session() as s:
        _, plaintext = tokens.create(s, scope="operate", source=None)
    headers, client, seen, cursor = {"Authorization": f"Bearer {plaintext}"}, app.test_client(), [], ""
    while cursor is not None:
        r = client.get(f"/api/v1/messages?limit=3&until=2026-11-02T00:00:00Z{cursor and f'&cursor={cursor}'}",
                       headers=headers)
        assert r.status_code == 200, r.get_json()
        seen += [m["idempotency_key"] for m in r.get_json()["items"]]
        cursor = r.get_json()["next_cursor"]
    assert sorted(seen) == [f"k{i}" for i in range(7)] and len(seen) == 7
