"""POST /api/v1/messages and the read API, against the real PostgreSQL store."""
from __future__ import annotations

import dataclasses
import json
import threading

from sqlalchemy import func, select

from courier.app.store.models import Delivery, Message

EVENT = {"type": "service.completed", "id": "evt-1", "occurred_at": "2026-11-21T10:00:00Z",
         "data": {"service": "US-ABD", "patient": "P1"}}
ADT = ("MSH|^~\\&|LAB|HOSP|ERP|HOSP|20261121100000||ADT^A01^ADT_A01|MSG0001|P|2.5\r"
       "EVN|A01|20261121100000\rPID|1||123456^^^HOSP^MR||DOE^JANE\r")


def post_json(client, headers, doc, **extra):
    return client.post("/api/v1/messages", data=json.dumps(doc), headers={**headers, **extra},
                       content_type="application/json")


def counts(store):
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Message)), s.scalar(select(func.count()).select_from(Delivery))


def test_json_event_is_stored_with_a_delivery_per_route(client, make_token, store):
    r = post_json(client, make_token(), EVENT)
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert body["status"] == "accepted"
    assert sorted(d["destination"] for d in body["deliveries"]) == ["billing", "erp"]
    assert all(d["status"] == "pending" for d in body["deliveries"])
    assert r.headers["Location"].endswith(f"/api/v1/messages/{body['id']}")
    assert counts(store) == (1, 2)


def test_duplicate_event_id_gets_200_and_the_same_message(client, make_token, store):
    h = make_token()
    first = post_json(client, h, EVENT).get_json()
    again = post_json(client, h, EVENT)
    assert again.status_code == 200
    assert again.get_json()["id"] == first["id"]
    assert [d["id"] for d in again.get_json()["deliveries"]] == [d["id"] for d in first["deliveries"]]
    assert counts(store) == (1, 2)


def test_idempotency_key_header_wins_over_event_id(client, make_token, store):
    h = make_token()
    a = post_json(client, h, EVENT, **{"Idempotency-Key": "k-1"})
    b = post_json(client, h, {**EVENT, "id": "evt-2"}, **{"Idempotency-Key": "k-1"})
    assert (a.status_code, b.status_code) == (202, 200)
    assert counts(store) == (1, 2)


def test_same_id_from_another_source_is_not_a_duplicate(client, make_token, store, app):
    # "other" may send anything but has no routes: stored as unrouted.
    r1 = post_json(client, make_token(), EVENT)
    r2 = post_json(client, make_token(source="other"), EVENT)
    assert (r1.status_code, r2.status_code) == (202, 202)
    assert r2.get_json()["deliveries"] == [] and r2.get_json()["routed"] is False
    assert counts(store) == (2, 2)


def test_concurrent_duplicates_store_one_message(app, make_token, store):
    h = make_token()
    statuses, ids = [], []
    barrier = threading.Barrier(8)

    def send():
        c = app.test_client()
        barrier.wait()
        r = post_json(c, h, {**EVENT, "id": "race-1"})
        statuses.append(r.status_code)
        ids.append(r.get_json()["id"])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 7 + [202]
    assert len(set(ids)) == 1
    assert counts(store) == (1, 2)


def test_hl7_message_is_typed_and_deduplicated_by_msh10(client, make_token, store):
    h = make_token()
    r = client.post("/api/v1/messages", data=ADT.encode(), headers=h, content_type="application/hl7-v2")
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["type"] == "HL7v2:ADT^A01"
    again = client.post("/api/v1/messages", data=ADT.replace("\r", "\r\n").encode(), headers=h,
                        content_type="x-application/hl7-v2+er7")
    assert again.status_code == 200 and again.get_json()["id"] == r.get_json()["id"]


def test_hl7_with_bom_and_lf_endings(client, make_token):
    body = b"\xef\xbb\xbf" + ADT.replace("MSG0001", "MSG0002").replace("\r", "\n").encode()
    r = client.post("/api/v1/messages", data=body, headers=make_token(), content_type="application/hl7-v2")
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["type"] == "HL7v2:ADT^A01"


def test_hl7_batch_is_accepted_as_several_messages(client, make_token, store):
    second = ADT.replace("MSG0001", "MSG0003").replace("ADT^A01^ADT_A01", "ADT^A08^ADT_A01")
    batch = "BHS|^~\\&|LAB|HOSP\r" + ADT + second + "BTS|2\r"
    r = client.post("/api/v1/messages", data=batch.encode(), headers=make_token(), content_type="application/hl7-v2")
    assert r.status_code == 202, r.get_json()
    assert [m["type"] for m in r.get_json()["messages"]] == ["HL7v2:ADT^A01", "HL7v2:ADT^A08"]
    assert counts(store) == (2, 4)


def test_type_not_allowed_for_source_is_422_and_stores_nothing(tmp_path, store, queue_prefix):
    from courier.app import create_app
    from tests.support.config import settings_for, write_config

    cfg = write_config(tmp_path / "c.yml", {"erp": f"file://{tmp_path}"}, allowed_types=["HL7v2:ADT^*"])
    flask_app = create_app(settings_for(cfg, store.url, queue_prefix))
    from courier.app.store import tokens
    with store.session() as s:
        _, tok = tokens.create(s, scope="ingest", source="lab")
    r = post_json(flask_app.test_client(), {"Authorization": f"Bearer {tok}"}, EVENT)
    assert r.status_code == 422
    err = r.get_json()["error"]
    assert err["code"] == "type_not_allowed" and "service.completed" in err["message"]
    assert counts(store) == (0, 0)


def test_error_statuses_say_what_and_where(client, make_token, app, store):
    h = make_token()
    bad_json = client.post("/api/v1/messages", data=b'{"type": "x", "data": {', headers=h,
                           content_type="application/json")
    assert bad_json.status_code == 400
    assert "line 1 column" in bad_json.get_json()["error"]["message"]

    schema = post_json(client, h, {"type": "", "data": "nope", "extra": 1})
    assert schema.status_code == 422
    fields = schema.get_json()["error"]["details"]["fields"]
    assert set(fields) == {"type", "data", "extra"}

    hl7 = client.post("/api/v1/messages", data=b"MSH|^~\\&|A|B\rPID|1", headers=h, content_type="application/hl7-v2")
    assert hl7.status_code == 400
    assert hl7.get_json()["error"]["details"]["where"]

    media = client.post("/api/v1/messages", data=b"x", headers=h, content_type="text/plain")
    assert media.status_code == 415

    app.extensions["courier.settings"] = dataclasses.replace(app.extensions["courier.settings"], max_message_bytes=100)
    big = post_json(client, h, {**EVENT, "data": {"x": "y" * 200}})
    assert big.status_code == 413 and big.get_json()["error"]["code"] == "too_large"
    assert counts(store) == (0, 0)


def test_tokens_are_required_scoped_and_revocable(client, make_token, store):
    from courier.app.store import tokens
    from courier.app.store.models import ApiToken

    assert post_json(client, {}, EVENT).status_code == 401
    assert post_json(client, {"Authorization": "Bearer courier_nope"}, EVENT).status_code == 401
    operate = make_token(scope="operate")
    assert post_json(client, operate, EVENT).status_code == 403
    ingest = make_token()
    assert client.get("/api/v1/messages", headers=ingest).status_code == 403
    with store.session() as s:
        row = s.scalars(select(ApiToken).where(ApiToken.scope == "ingest")).one()
        assert len(row.token_hash) == 64 and ingest["Authorization"].split()[1] not in row.token_hash
        tokens.revoke(s, row.id)
    assert post_json(client, ingest, EVENT).status_code == 401


def test_trace_lists_deliveries_and_paging_works(client, make_token):
    h, op = make_token(), make_token(scope="operate")
    ids = [post_json(client, h, {**EVENT, "id": f"e{i}"}).get_json()["id"] for i in range(5)]
    trace = client.get(f"/api/v1/messages/{ids[0]}", headers=op).get_json()
    assert {d["destination"] for d in trace["deliveries"]} == {"billing", "erp"}
    assert all(d["attempts"] == 0 and d["attempt_log"] == [] for d in trace["deliveries"])
    page1 = client.get("/api/v1/messages?limit=3", headers=op).get_json()
    page2 = client.get(f"/api/v1/messages?limit=3&cursor={page1['next_cursor']}", headers=op).get_json()
    assert [m["id"] for m in page1["items"] + page2["items"]] == ids[::-1]
    assert page2["next_cursor"] is None
    assert client.get("/api/v1/messages/nope", headers=op).status_code == 404
    rec = client.get("/api/v1/reconciliation", headers=op).get_json()["destinations"]
    assert rec["billing"] == {"accepted": 5, "delivered": 0, "pending": 5, "dead": 0}


def test_503_when_the_store_cannot_commit(app, make_token):
    from courier.app.store.db import Store

    h = make_token()
    app.extensions["courier.store"] = Store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    # The token check itself needs the store: the answer must still be a clean 503, not a 500.
    r = post_json(app.test_client(), h, EVENT)
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "store_unavailable"


def test_health_endpoints(client):
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["checks"] == {"store": "ok", "broker": "ok"}
