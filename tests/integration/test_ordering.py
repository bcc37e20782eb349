"""Ordered delivery (`ordered_by`): the relay's per-key line, ids in commit order (key extraction,
which needs no store: tests/unit/test_ordering.py)."""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from datetime import datetime, timezone

import pytest
import yaml
from freezegun import freeze_time
from sqlalchemy import event, select

from courier.app.store import outbox
from courier.app.store.db import Store
from courier.app.ingest import ingest
from courier.app.store.models import Delivery
from courier.app.settings import Destination, RetryPolicy
from courier.app.config import load_routing
from tests.support.config import settings_for

pytestmark = pytest.mark.postgres

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)  # after any real "now": everything accepted is due
POLICY = RetryPolicy(max_attempts=3, initial=10.0, max=60.0)
DESTS = {"adt": Destination("adt", "http://x", timeout=10.0, retry=POLICY, ordered_by="data.patient_id"),
         "archive": Destination("archive", "file:///tmp", retry=POLICY)}


# --- the relay's line, on PostgreSQL ----------------------------------------------------------

def accept(store, key, n=1, destination="adt"):
    """n messages with one key, each in its own transaction; returns the delivery ids in acceptance order."""
    ids = []
    for _ in range(n):
        with store.session() as s:
            message, _ = outbox.accept(s, outbox.NewMessage("lab", "patient.updated", "application/json", b"{}",
                                                            None), [destination], {destination: key})
            ids.append(message.deliveries[0].id)
    return ids


def claim(store, now=T0, limit=10):
    with store.session() as s:
        return {c.delivery_id: c for c in outbox.claim_due(s, lease=60, limit=limit, now=now)}


def attempt(store, c, result, now=T0):
    with store.session() as s:
        ticket = outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS, now=now)
    assert isinstance(ticket, outbox.Ticket)
    with store.session() as s:
        return outbox.finish_attempt(s, ticket, outbox.Outcome(result, "x", now, 5), DESTS["adt"], now=now)


def delivery(store, delivery_id):
    with store.session() as s:
        return s.get(Delivery, delivery_id)


def test_a_key_waits_for_its_earlier_delivery_and_other_keys_do_not(store):
    a1, a2 = accept(store, "A", 2)
    [b1] = accept(store, "B")
    [u1, u2] = accept(store, None, 2)  # unordered deliveries of the same destination
    assert delivery(store, a1).order_key == "A" and delivery(store, u1).order_key is None
    first = claim(store)
    assert set(first) == {a1, b1, u1, u2}
    assert claim(store) == {}  # A2 waits while A1 is in flight
    assert attempt(store, first[a1], "delivered") == "delivered"
    assert set(claim(store)) == {a2}


def test_a_retrying_delivery_still_holds_back_its_key_only(store):
    a1, a2 = accept(store, "A", 2)
    [b1] = accept(store, "B")
    first = claim(store)
    assert set(first) == {a1, b1}
    assert attempt(store, first[a1], "temporary") == "retrying"
    assert attempt(store, first[b1], "delivered") == "delivered"
    [b2] = accept(store, "B")
    assert set(claim(store)) == {b2}  # B goes on; A2 is held behind the failing A1
    retry_at = delivery(store, a1).due_at
    assert set(claim(store, now=retry_at)) == {a1}  # A1 goes first again when its retry is due
    assert claim(store, now=retry_at) == {}


def test_a_dead_delivery_lets_the_rest_of_its_key_go(store):
    a1, a2, a3 = accept(store, "A", 3)
    first = claim(store)
    assert set(first) == {a1}
    assert attempt(store, first[a1], "permanent") == "dead"
    assert set(claim(store)) == {a2}


def test_ids_follow_acceptance_order_within_one_transaction(store):
    """new_id() orders only to the millisecond; a batch of one key must not come out shuffled."""
    with freeze_time(T0), store.session() as s:  # every id made in the same millisecond
        ids = []
        for _ in range(40):
            message, _ = outbox.accept(s, outbox.NewMessage("lab", "t", "application/json", b"{}", None),
                                       ["adt"], {"adt": "A"})
            ids.append(message.deliveries[0].id)
    assert ids == sorted(ids) and len(set(ids)) == 40
    ms = f"{int(T0.timestamp() * 1000):012x}"
    assert {i[:13] for i in ids} == {f"{ms[:8]}-{ms[8:]}"}  # the case under test: one millisecond


def test_a_key_too_long_for_the_column_is_stored_hashed(store):
    [d] = accept(store, "K" * 400)
    assert delivery(store, d).order_key == hashlib.sha256(b"K" * 400).hexdigest()


def test_concurrent_ingests_of_one_key_are_claimed_in_commit_order(store, pg_url, tmp_path):
    """docs/design.md, pitfall 8: an id made before a slow commit must never let a later id of its key go first.

    Two threads ingest 50 messages each with the same patient while a relay claims and
    delivers one at a time. Commits are slowed after the rows are written (up to 20 ms):
    that is the window in which, without the lock, a later id commits first and is sent
    before the earlier one is visible (about 10 of 100 out of order on this machine).
    """
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "sources": {"lab": {}},
        "destinations": {"adt": {"url": "http://127.0.0.1:9/adt", "ordered_by": "data.patient_id",
                                 "clearance": "phi"}},
        "routes": [{"match": {"source": "lab"}, "to": ["adt"]}]}))
    routing = load_routing(cfg, {})
    ingest_store = Store(pg_url)
    event.listen(ingest_store.sessions, "before_commit", lambda session: time.sleep(random.uniform(0, 0.02)))
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def producer(name):
        try:
            start.wait()
            for i in range(50):
                body = json.dumps({"type": "adt", "id": f"{name}-{i}", "data": {"patient_id": "P7"}}).encode()
                ingest(ingest_store, routing, source="lab", content_type="application/json", body=body)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    producers = [threading.Thread(target=producer, args=(n,)) for n in ("a", "b")]
    for t in producers:
        t.start()
    start.wait()
    claimed: list[str] = []
    most_at_once = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not errors:
            with store.session() as s:
                got = outbox.claim_due(s, lease=60, limit=10)
            most_at_once = max(most_at_once, len(got))
            if not got:
                if not any(t.is_alive() for t in producers) and len(claimed) >= 100:
                    break
                continue
            for c in got:
                claimed.append(c.delivery_id)
                with store.session() as s:
                    ticket = outbox.begin_attempt(s, c.delivery_id, c.dispatch, DESTS)
                with store.session() as s:
                    outbox.finish_attempt(s, ticket, outbox.Outcome("delivered", "ok", T0, 1), DESTS["adt"])
    finally:
        for t in producers:
            t.join()
        ingest_store.dispose()
    assert not errors, errors
    assert most_at_once == 1, "only one delivery of a key may be out at a time"
    with store.session() as s:
        stored = s.scalars(select(Delivery.id).order_by(Delivery.id)).all()
    assert len(stored) == 100
    assert claimed == stored, "deliveries were claimed out of id order (or some never)"


def adt(control_id, event, patient):
    return (f"MSH|^~\\&|LAB|HOSP|ADT|HOSP|20261121100000||ADT^{event}^ADT_{event}|{control_id}|P|2.5\r"
            f"EVN|{event}|20261121100000\rPID|1||{patient}^^^HOSP^MR~SSN{patient}^^^USSSA^SS||DOE^JANE\r")


def test_batches_with_the_same_patients_in_opposite_order_do_not_deadlock(store, pg_url, tmp_path):
    """Each batch takes all its keys' locks up front, sorted; one by one, these two would deadlock."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "sources": {"lab": {}},
        "destinations": {"adt": {"url": "http://127.0.0.1:9/adt", "ordered_by": "PID-3.1", "clearance": "phi"}},
        "routes": [{"match": {"source": "lab"}, "to": ["adt"]}]}))
    routing = load_routing(cfg, {})
    ingest_store = Store(pg_url)
    event.listen(ingest_store.sessions, "before_commit", lambda session: time.sleep(0.002))
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def producer(name, patients):
        try:
            start.wait()
            for i in range(20):
                body = "".join(adt(f"{name}{i}-{p}", "A08", p) for p in patients).encode()
                ingest(ingest_store, routing, source="lab", content_type="application/hl7-v2", body=body)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    producers = [threading.Thread(target=producer, args=("x", ["P1", "P2"])),
                 threading.Thread(target=producer, args=("y", ["P2", "P1"]))]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    ingest_store.dispose()
    assert not errors, [getattr(e, "__cause__", e) for e in errors][:1]
    with store.session() as s:
        keys = s.scalars(select(Delivery.order_key)).all()
    assert sorted(keys) == ["P1"] * 40 + ["P2"] * 40


def test_end_to_end_hl7_adt_for_two_patients(tmp_path, store, queue_prefix):
    from courier.app import create_app
    from courier.app.store import tokens

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "sources": {"lab": {"allowed_types": ["HL7v2:ADT^*"]}},
        "destinations": {
            "adt": {"url": f"file://{tmp_path}/adt", "ordered_by": "PID-3.1", "clearance": "phi"},
            "chart": {"url": f"file://{tmp_path}/chart", "ordered_by": "PID-3", "clearance": "phi"},
            "archive": {"url": f"file://{tmp_path}/archive", "clearance": "phi"},
        },
        "routes": [{"match": {"source": "lab"}, "to": ["adt", "chart", "archive"]}]}))
    flask_app = create_app(settings_for(cfg, store.url, queue_prefix), {"TESTING": True})
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    client = flask_app.test_client()
    with store.session() as s:
        _, tok = tokens.create(s, scope="ingest", source="lab")

    def post(body):
        r = client.post("/api/v1/messages", data=body.encode(), content_type="application/hl7-v2",
                        headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 202, r.get_json()
        return r.get_json()

    first = [post(adt("M1", "A01", "P100")), post(adt("M2", "A01", "P200")), post(adt("M3", "A08", "P100"))]
    batch = post(adt("M4", "A08", "P200") + adt("M5", "A03", "P100"))["messages"]
    messages = first + batch
    assert all(set(d) == {"id", "destination", "status"} for m in messages for d in m["deliveries"])

    patients = ["P100", "P200", "P100", "P200", "P100"]
    with store.session() as s:
        rows = {d.id: d for d in s.scalars(select(Delivery))}
    by_destination: dict[str, list[Delivery]] = {}
    for message, patient in zip(messages, patients):
        got = {d["destination"]: rows[d["id"]] for d in message["deliveries"]}
        assert got["adt"].order_key == patient
        assert got["chart"].order_key == f"{patient}^^^HOSP^MR~SSN{patient}^^^USSSA^SS"
        assert got["archive"].order_key is None
        for name, d in got.items():
            by_destination.setdefault(name, []).append(d)
    for name in ("adt", "chart"):  # acceptance order is id order, per destination
        ids = [d.id for d in by_destination[name]]
        assert ids == sorted(ids)

    claimed: dict[str, set[str]] = {}
    with store.session() as s:
        for c in outbox.claim_due(s, lease=60, limit=100, now=T0):
            claimed.setdefault(c.destination, set()).add(c.delivery_id)
    heads = {by_destination[n][0].id for n in ("adt", "chart")} | {by_destination[n][1].id for n in ("adt", "chart")}
    assert claimed["adt"] | claimed["chart"] == heads  # M1 (P100) and M2 (P200) only
    assert claimed["archive"] == {d.id for d in by_destination["archive"]}  # unordered: all at once


# --- SQLite --------------------------------------------------------------------------------------

def test_sqlite_keeps_the_same_line(sqlite_store):
    with freeze_time(T0), sqlite_store.session() as s:  # one transaction, one millisecond: ids still in order
        ids = [outbox.accept(s, outbox.NewMessage("lab", "t", "application/json", b"{}", None),
                             ["adt"], {"adt": "A"})[0].deliveries[0].id for _ in range(20)]
    [b1] = accept(sqlite_store, "B")
    assert ids == sorted(ids)
    first = claim(sqlite_store)
    assert set(first) == {ids[0], b1}
    assert attempt(sqlite_store, first[ids[0]], "delivered") == "delivered"
    assert set(claim(sqlite_store)) == {ids[1]}
