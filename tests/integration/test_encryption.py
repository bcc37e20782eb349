"""Encryption at rest (COURIER_ENCRYPTION_KEY): bodies and attempt details are unreadable in the raw tables.

Against the real PostgreSQL store (and SQLite where cheap): ingest through the API, a failed
delivery through the worker's own function, then the tables read with plain SQL.
"""
from __future__ import annotations

import json
import threading

import pytest
import yaml
from cryptography.fernet import Fernet
from sqlalchemy import text

from courier.app import create_app
from courier.app.store import crypto, ordering, outbox, rotation
from courier.app.store.db import Store, make_engine
from courier.app.domain import governance
from courier.app.ingest import ingest
from courier.app.store.models import RETRYING, Attempt, Circuit, Delivery, Message
from courier.app.settings import ConfigError
from courier.app.config import load_routing, load_settings
from courier.tasks.deliver import run_batch
from tests.support.config import settings_for, write_config
from tests.support.data import HL7_SAMPLES
from tests.integration.test_cli import courier
from tests.integration.test_ordering import adt, attempt, claim

HL7 = (HL7_SAMPLES / "microsoft-FHIR-Converter" / "ADT-A01-01.hl7").read_bytes()
HL7_SECRETS = [b"EVERYMAN", b"ADAM", b"PATID1234"]  # the sample's patient name and MRN
PATIENT, MRN = "Zebulon Quixote", "MRN-55501234"
EVENT = {"type": "service.completed", "id": "evt-enc-1", "occurred_at": "2026-11-21T10:00:00Z",
         "data": {"service": "US-ABD", "patient": MRN, "patient_name": PATIENT}}
OLD, NEW, OTHER = (Fernet.generate_key().decode() for _ in range(3))


def use(store, *keys: str) -> None:
    """Give `store` these keys, as a restart with another COURIER_ENCRYPTION_KEY would."""
    crypto.attach(store.engine, crypto.parse_keys(",".join(keys)), replace=True)


def raw(store, sql: str) -> list:
    with store.engine.connect() as conn:
        return [row[0] for row in conn.execute(text(sql))]


def kid(key: str) -> str:
    return crypto.key_id(key)


def accept(store, body: bytes, key: str | None = None, destinations=("billing",)) -> str:
    with store.session() as s:
        stored, _ = outbox.accept(s, outbox.NewMessage("lab", "service.completed", "application/json", body, key),
                                  list(destinations))
    return stored.id


def fail_once(store, settings, detail: str) -> None:
    """Claim what is due and record a temporary failure with `detail` for each (attempt log, last_error, circuit)."""
    destinations = settings.routing.destinations
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=100)
    for c in claimed:
        with store.session() as s:
            ticket = outbox.begin_attempt(s, c.delivery_id, c.dispatch, destinations)
        assert isinstance(ticket, outbox.Ticket), ticket
        with store.session() as s:
            outbox.finish_attempt(s, ticket, outbox.Outcome("temporary", detail, outbox.utcnow(), 3),
                                  destinations[c.destination])


def key_ids(values) -> dict:
    """How many non-empty stored values are under each key id (None: plaintext)."""
    counts: dict = {}
    for v in values:
        if v:
            v = v.removeprefix("waiting: ") if isinstance(v, str) else bytes(v)
            k = crypto.stored_key_id(v)
            counts[k] = counts.get(k, 0) + 1
    return counts


ALL_ENCRYPTED = ("SELECT body FROM courier_messages", "SELECT detail FROM courier_attempts",
                 "SELECT last_error FROM courier_deliveries", "SELECT last_error FROM courier_circuits")


def test_api_and_worker_write_nothing_readable(tmp_path, store, queue_prefix, make_token, closed_port):
    cfg = write_config(tmp_path / "courier.yml", {"billing": f"http://127.0.0.1:{closed_port}/billing"},
                       circuit={"failure_threshold": 1, "open_for": "1h"})
    settings = settings_for(cfg, store.url, queue_prefix, encryption_key=NEW)
    flask_app = create_app(settings, {"TESTING": True})
    assert flask_app.extensions["courier.store"].keys.current_id == kid(NEW)  # the app's store has the key
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    use(store, NEW)
    client, token = flask_app.test_client(), make_token()

    r = client.post("/api/v1/messages", data=json.dumps(EVENT), headers=token, content_type="application/json")
    assert r.status_code == 202, r.get_json()
    json_id = r.get_json()["id"]
    r = client.post("/api/v1/messages", data=HL7, headers=token, content_type="application/hl7-v2")
    assert r.status_code == 202, r.get_json()
    hl7_id = r.get_json()["id"]

    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10)
    statuses = run_batch(settings, store, [(c.delivery_id, c.dispatch) for c in claimed])
    assert RETRYING in statuses.values(), statuses  # the destination refused the connection

    with store.session() as s:
        bodies = {m.id: m.body for m in s.query(Message)}
        details = [a.detail for a in s.query(Attempt)]
        errors = [d.last_error for d in s.query(Delivery) if d.last_error]
        circuit_errors = [c.last_error for c in s.query(Circuit)]
    assert json.loads(bodies[json_id]) == EVENT
    assert all(secret in bodies[hl7_id] for secret in HL7_SECRETS)  # the app reads back the body it received
    assert details and errors and circuit_errors and all(d for d in details), (details, errors, circuit_errors)

    stored_bodies = raw(store, ALL_ENCRYPTED[0])
    assert len(stored_bodies) == 2
    for stored in stored_bodies:
        assert bytes(stored).startswith(f"fernet:{kid(NEW)}:".encode())
        for secret in HL7_SECRETS + [PATIENT.encode(), MRN.encode(), b"US-ABD", b"MSH|"]:
            assert secret not in bytes(stored), secret
    readable = details + errors + circuit_errors
    for sql in ALL_ENCRYPTED[1:]:
        values = raw(store, sql)
        assert values and key_ids(values) == {kid(NEW): len([v for v in values if v])}, (sql, values)
        for value in filter(None, values):
            for plain in readable:
                assert len(plain) >= 16
                assert plain[4:16] not in value, (sql, plain)  # a piece of any detail as the app reads it

    r = client.get(f"/api/v1/messages/{json_id}", headers=make_token("operate"))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["deliveries"][0]["attempt_log"][0]["detail"] in details


def test_plaintext_rows_still_read_and_rotation_moves_everything_to_the_first_key(store, tmp_path, queue_prefix):
    cfg = write_config(tmp_path / "courier.yml", {"billing": "http://127.0.0.1:9/billing",
                                                  "erp": f"file://{tmp_path}/erp"},
                       retry={"max_attempts": 3, "initial": "1h", "max": "2h"})  # a failed delivery stays put
    settings = settings_for(cfg, store.url, queue_prefix)  # no key: plaintext, as before this feature
    plain_id = accept(store, b'{"name": "plain"}')
    fail_once(store, settings, "plain detail: 500 from billing")
    use(store, OLD)
    old_id = accept(store, b'{"name": "old"}')
    fail_once(store, settings, "old detail: 502 from billing")
    accept(store, b'{"name": "held"}', destinations=("erp",))
    with store.session() as s:
        (c,) = outbox.claim_due(s, lease=60, limit=10)
    with store.session() as s:  # paused once claimed: held back, its last_error keeps its clear prefix
        outbox.pause_destination(s, "erp", actor="test", reason="maintenance")
    with store.session() as s:
        assert outbox.begin_attempt(s, c.delivery_id, c.dispatch, settings.routing.destinations) == "waiting"
    assert key_ids(raw(store, ALL_ENCRYPTED[0])) == {None: 1, kid(OLD): 2}

    use(store, NEW, OLD)
    with store.session() as s:
        assert s.get(Message, plain_id).body == b'{"name": "plain"}'
        assert s.get(Message, old_id).body == b'{"name": "old"}'
        before = {sql: sorted(str(v) for v in _read(s, sql)) for sql in ALL_ENCRYPTED}
    dry = rotation.rotate(store, actor="test", batch=2, dry_run=True)
    assert dry.columns["courier_messages.body"].rotated == 3
    result = rotation.rotate(store, actor="test", batch=2)
    assert result.columns["courier_messages.body"].rotated == 3 and result.left == 0, result
    assert result.columns["courier_attempts.detail"].rotated == 2

    for sql in ALL_ENCRYPTED:
        assert set(key_ids(raw(store, sql))) == {kid(NEW)}, sql
    assert any(v.startswith(f"waiting: fernet:{kid(NEW)}:") for v in raw(store, ALL_ENCRYPTED[2]) if v)
    use(store, NEW)  # the old key can go: everything reads with the new one alone, unchanged
    with store.session() as s:
        assert {sql: sorted(str(v) for v in _read(s, sql)) for sql in ALL_ENCRYPTED} == before
        record = s.execute(text("SELECT details FROM courier_audit WHERE action = 'key_rotate'")).scalar_one()
    assert OLD not in record and NEW not in record and kid(NEW) in record
    assert rotation.rotate(store, actor="test").columns["courier_messages.body"].rotated == 0

    with store.session() as s:  # resuming wakes the held delivery: wake still finds it by its clear prefix
        assert outbox.resume_destination(s, "erp", actor="test") == 1


def _read(session, sql: str) -> list:
    """The column of `sql` as the app reads it (decrypted)."""
    table, column = sql.split(" FROM ")[1], sql.split()[1]
    model = {"courier_messages": Message, "courier_attempts": Attempt, "courier_deliveries": Delivery,
             "courier_circuits": Circuit}[table]
    return [getattr(row, column) for row in session.query(model)]


def test_a_value_under_a_missing_key_is_a_clear_error_and_the_worker_waits(store, config_file, queue_prefix):
    settings = settings_for(config_file, store.url, queue_prefix, encryption_key=OTHER)
    use(store, OTHER)
    message_id = accept(store, b'{"secret": 1}')
    use(store, NEW)
    with store.session() as s, pytest.raises(crypto.Unreadable, match=f"key id {kid(OTHER)}") as caught:
        s.get(Message, message_id).body
    assert OTHER not in str(caught.value) and caught.value.key_id == kid(OTHER)

    with store.session() as s:
        (c,) = outbox.claim_due(s, lease=60, limit=10)
        status = outbox.begin_attempt(s, c.delivery_id, c.dispatch, settings.routing.destinations)
    assert status == "waiting"
    with store.session() as s:
        d = s.get(Delivery, c.delivery_id)
        assert (d.status, d.attempts) == (RETRYING, 0)  # no attempt spent, the delivery is not dead
        assert kid(OTHER) in d.last_error and d.due_at > outbox.utcnow()
    rotated = rotation.rotate(store, actor="test")
    assert rotated.columns["courier_messages.body"].unreadable == {kid(OTHER): 1}
    assert rotated.left == 1

    use(store, NEW, OTHER)  # the key is back: the body reads again
    with store.session() as s:
        assert s.get(Message, message_id).body == b'{"secret": 1}'


def test_the_message_list_and_trace_work_without_the_bodys_key(store, client, make_token):
    """They never show a body, so they must not need its key: one unreadable body must not break a page."""
    use(store, OTHER)
    message_id = accept(store, b'{"secret": 1}')
    use(store, NEW)
    admin = make_token("admin")
    page = client.get("/api/v1/messages", headers=admin)
    assert page.status_code == 200, page.get_json()
    assert [m["id"] for m in page.get_json()["items"]] == [message_id]
    assert client.get(f"/api/v1/messages/{message_id}", headers=admin).status_code == 200


def test_an_altered_value_is_an_error_not_garbage(store):
    use(store, NEW)
    message_id = accept(store, b'{"x": 1}')
    (stored,) = raw(store, ALL_ENCRYPTED[0])
    altered = stored[:40] + (b"B" if stored[40:41] == b"A" else b"A") + stored[41:]  # one character of the token
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE courier_messages SET body = :b WHERE id = :id"), {"b": altered, "id": message_id})
    with store.session() as s, pytest.raises(crypto.Unreadable, match="integrity"):
        s.get(Message, message_id).body


def test_rotation_while_ingest_goes_on(store):
    use(store, OLD)
    bodies = {accept(store, f'{{"n": {i}, "name": "Ann Example {i}"}}'.encode(), key=f"o{i}"): i for i in range(120)}
    use(store, NEW, OLD)
    stop, added, errors = threading.Event(), {}, []

    def ingest():
        i = 0
        try:
            while not stop.is_set() or i < 20:
                body = f'{{"n": {1000 + i}, "name": "Bo Example {i}"}}'.encode()
                added[accept(store, body, key=f"n{i}")] = 1000 + i
                i += 1
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        result = rotation.rotate(store, actor="test", batch=7)
    finally:
        stop.set()
        worker.join(30)
    assert not errors, errors
    assert result.columns["courier_messages.body"].rotated == 120 and result.left == 0
    use(store, NEW)
    with store.session() as s:
        read = {m.id: json.loads(m.body)["n"] for m in s.query(Message)}
    assert read == {**bodies, **added}  # none lost, none altered
    assert key_ids(raw(store, ALL_ENCRYPTED[0])) == {kid(NEW): 120 + len(added)}


def test_bad_key_names_its_position_never_the_key(config_file):
    routing = load_routing(config_file, {})
    for value, words in ((f"{NEW},not-a-fernet-key", ["key 2 of 2", "not a Fernet key"]),
                         (f"{NEW},,{OLD}", ["key 2 of 3", "empty"]),
                         (f"{NEW},{NEW}", ["key 2 of 2", "repeats"])):
        with pytest.raises(ConfigError) as caught:
            load_settings(env={"COURIER_ENCRYPTION_KEY": value}, config_path=str(config_file), routing=routing)
        message = str(caught.value)
        assert all(w in message for w in words), message
        assert "not-a-fernet-key" not in message and NEW not in message and OLD not in message


def test_cli_generate_and_rotate(run_env, store):
    generated = courier("keys", "generate", **run_env).stdout.strip()
    use(store, generated)  # a working key
    use(store, OLD)
    accept(store, b'{"cli": 1}')
    result = courier("keys", "rotate", "--batch", "10", **run_env, COURIER_ENCRYPTION_KEY=f"{NEW},{OLD}")
    assert result.returncode == 0, result.stderr
    assert f"courier_messages.body: 1 re-encrypted under key id {kid(NEW)}, 0 left" in result.stdout
    assert key_ids(raw(store, ALL_ENCRYPTED[0])) == {kid(NEW): 1}
    assert NEW not in result.stdout + result.stderr

    missing = courier("keys", "rotate", **run_env, COURIER_ENCRYPTION_KEY=OLD)  # NEW is not there
    assert missing.returncode == 1 and f"1 under key id {kid(NEW)}" in missing.stdout, missing
    bad = courier("keys", "rotate", **run_env, COURIER_ENCRYPTION_KEY="short")
    assert bad.returncode == 1 and "key 1 of 1" in bad.stderr and "Traceback" not in bad.stderr, bad


@pytest.fixture
def run_env(config_file, store):
    return {"config": config_file, "database_url": store.url}


def test_sqlite_store_encrypts_purges_and_rotates(sqlite_store):
    use(sqlite_store, OLD)
    message_id = accept(sqlite_store, b'{"name": "Sqlite Patient"}')
    other_id = accept(sqlite_store, b'{"name": "Purged Patient"}')
    with sqlite_store.session() as s:
        s.get(Message, other_id).body = b""  # what retention writes
    with sqlite_store.engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT id, body FROM courier_messages")).all())
    assert stored[other_id] == b"" and b"Sqlite" not in stored[message_id]
    use(sqlite_store, NEW, OLD)
    assert rotation.rotate(sqlite_store, actor="test").columns["courier_messages.body"].rotated == 1
    use(sqlite_store, NEW)
    with sqlite_store.session() as s:
        assert s.get(Message, message_id).body == b'{"name": "Sqlite Patient"}' and s.get(Message, other_id).body == b""


# --- order keys (ordered_by): keyed pseudonyms under encryption at rest -----------------------------

PSEUDONYM_KEY = "order-key-test-secret-of-at-least-32-characters"
ORDERED = {"sources": {"lab": {}},
           "destinations": {"adt": {"url": "http://127.0.0.1:9/adt", "ordered_by": "PID-3.1", "clearance": "phi"}},
           "routes": [{"match": {"source": "lab"}, "to": ["adt"]}]}


def ordered_routing(tmp_path, env: dict):
    path = tmp_path / "ordered.yml"
    path.write_text(yaml.safe_dump(ORDERED))
    return load_routing(path, env)


def send(store, routing, *messages: str) -> list[str]:
    """Ingest HL7 `messages` (several: one batch); the adt delivery ids in acceptance order."""
    results, _ = ingest(store, routing, source="lab", content_type="application/hl7-v2",
                        body="".join(messages).encode())
    return [r.message.deliveries[0].id for r in results]


def test_order_keys_are_pseudonyms_that_keep_the_line_across_a_key_rotation(store, tmp_path, monkeypatch):
    monkeypatch.setenv(governance.KEY_VARIABLE, PSEUDONYM_KEY)
    use(store, OLD)
    routing = ordered_routing(tmp_path, {"COURIER_ENCRYPTION_KEY": OLD, governance.KEY_VARIABLE: PSEUDONYM_KEY})
    [a1] = send(store, routing, adt("M1", "A01", MRN))
    [b1, a2] = send(store, routing, adt("M2", "A01", "MRN-2"), adt("M3", "A08", MRN))  # a batch: locked up front
    use(store, NEW, OLD)  # an encryption key rotation must not change a key's pseudonym
    [a3] = send(store, routing, adt("M4", "A08", MRN))

    stored = dict(raw_rows(store, "SELECT id, order_key FROM courier_deliveries"))
    assert len(stored) == 4 and all(governance.is_pseudonym(k) for k in stored.values()), stored
    assert not any(MRN in k or "MRN-2" in k for k in stored.values())
    assert stored[a1] == stored[a2] == stored[a3] != stored[b1]
    assert stored[a1] == governance.pseudonym(MRN, ordering.NAMESPACE, PSEUDONYM_KEY.encode())
    assert stored[a1] != governance.pseudonym(MRN, "patient", PSEUDONYM_KEY.encode())  # not what a destination gets

    first = claim(store)
    assert set(first) == {a1, b1}  # a2 and a3 wait for a1 of their patient
    assert attempt(store, first[a1], "delivered") == "delivered"
    assert set(claim(store)) == {a2}
    with store.session() as s:
        assert s.get(Delivery, a3).order_key == stored[a1]


def test_without_encryption_order_keys_are_stored_as_they_are(store, tmp_path, monkeypatch):
    monkeypatch.setenv(governance.KEY_VARIABLE, PSEUDONYM_KEY)  # a pseudonym key alone changes nothing
    use(store)
    [d] = send(store, ordered_routing(tmp_path, {}), adt("M1", "A01", MRN))
    assert raw_rows(store, "SELECT id, order_key FROM courier_deliveries") == [(d, MRN)]
    assert ordering.stored(MRN, store.keys) == MRN and ordering.stored("K" * 400, store.keys) == ordering.fit("K" * 400)


def test_encryption_and_ordered_by_need_a_pseudonym_key(tmp_path, store, monkeypatch):
    with pytest.raises(ConfigError) as caught:
        ordered_routing(tmp_path, {"COURIER_ENCRYPTION_KEY": NEW})
    message = str(caught.value)
    assert "ordered.yml:" in message and "destinations.adt.ordered_by: adt keeps its deliveries in order" in message
    assert "COURIER_PSEUDONYM_KEY is not set" in message and NEW not in message
    ordered_routing(tmp_path, {"COURIER_ENCRYPTION_KEY": NEW, governance.KEY_VARIABLE: PSEUDONYM_KEY})
    routing = ordered_routing(tmp_path, {})  # no encryption: plaintext keys, no pseudonym key needed

    # A destination below phi that passes messages through has an error of its own: both are reported.
    below = {**ORDERED, "destinations": {"adt": {"url": "http://127.0.0.1:9/adt", "ordered_by": "PID-3.1"}}}
    (tmp_path / "below.yml").write_text(yaml.safe_dump(below))
    with pytest.raises(ConfigError) as caught:
        load_routing(tmp_path / "below.yml", {"COURIER_ENCRYPTION_KEY": NEW})
    assert "sends messages as they came" in str(caught.value) and "keeps its deliveries in order" in str(caught.value)

    # Should a process store with encryption on and no pseudonym key all the same, nothing is stored.
    monkeypatch.delenv(governance.KEY_VARIABLE, raising=False)
    use(store, NEW)
    with pytest.raises(governance.MissingKey, match="COURIER_PSEUDONYM_KEY"):
        send(store, routing, adt("M1", "A01", MRN))
    assert raw_rows(store, "SELECT id FROM courier_messages") == []


def raw_rows(store, sql: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def test_an_embedding_hosts_encryption_key_in_app_config_also_needs_a_pseudonym_key(tmp_path, monkeypatch):
    """A host sets Courier's keys in app.config; the check must see that key, not only os.environ's."""
    from courier.app.config import settings_from_config

    monkeypatch.delenv(governance.KEY_VARIABLE, raising=False)
    monkeypatch.delenv("COURIER_ENCRYPTION_KEY", raising=False)
    ordered_routing(tmp_path, {})  # writes ordered.yml
    host = {"COURIER_CONFIG": "ordered.yml", "COURIER_DATABASE_URL": "sqlite:///:memory:", "COURIER_ENCRYPTION_KEY": NEW}
    with pytest.raises(ConfigError, match="COURIER_PSEUDONYM_KEY is not set"):
        settings_from_config(host, root_path=str(tmp_path))
    monkeypatch.setenv(governance.KEY_VARIABLE, PSEUDONYM_KEY)
    assert settings_from_config(host, root_path=str(tmp_path)).encryption_key == NEW


def test_rotate_replaces_order_keys_stored_before_encryption_by_their_pseudonyms(store, tmp_path, monkeypatch):
    """Turned on later, encryption leaves clear MRNs in order_key until `keys rotate` replaces them;
    after that a waiting delivery and a new one of the same patient share a key again."""
    monkeypatch.setenv(governance.KEY_VARIABLE, PSEUDONYM_KEY)
    use(store)  # no encryption yet: keys stored as they are
    [first, waiting] = send(store, ordered_routing(tmp_path, {}), adt("R1", "A01", MRN), adt("R2", "A08", MRN))
    use(store, NEW)
    assert rotation.rotate(store, actor="test", dry_run=True).columns[rotation.ORDER_KEYS].rotated == 2
    done = rotation.rotate(store, actor="test")
    assert (done.columns[rotation.ORDER_KEYS].rotated, done.columns[rotation.ORDER_KEYS].left) == (2, 0)
    [later] = send(store, ordered_routing(tmp_path, {"COURIER_ENCRYPTION_KEY": NEW,
                                                     governance.KEY_VARIABLE: PSEUDONYM_KEY}), adt("R3", "A08", MRN))
    stored = dict(raw_rows(store, "SELECT id, order_key FROM courier_deliveries"))
    assert stored[first] == stored[waiting] == stored[later] == ordering.stored(MRN, store.keys)
    assert set(claim(store)) == {first}  # the line holds: the other two wait for the first


def test_two_apps_in_one_process_keep_their_own_keys(store, config_file, queue_prefix):
    """Loading settings installs nothing: each app's store encrypts and reads with its own settings' keys."""
    first = create_app(settings_for(config_file, store.url, queue_prefix, encryption_key=OLD))
    second = create_app(settings_for(config_file, store.url, queue_prefix, encryption_key=NEW))
    plain = create_app(settings_for(config_file, store.url, queue_prefix))
    one, two = first.extensions["courier.store"], second.extensions["courier.store"]
    try:
        ids = {kid(OLD): accept(one, b'{"app": 1}'), kid(NEW): accept(two, b'{"app": 2}')}
        assert key_ids(raw(store, ALL_ENCRYPTED[0])) == {kid(OLD): 1, kid(NEW): 1}
        with one.session() as s:
            assert s.get(Message, ids[kid(OLD)]).body == b'{"app": 1}'
            with pytest.raises(crypto.Unreadable, match=f"key id {kid(NEW)}"):
                s.get(Message, ids[kid(NEW)]).body
        with two.session() as s:
            assert s.get(Message, ids[kid(NEW)]).body == b'{"app": 2}'
        assert plain.extensions["courier.store"].keys.current_id is None and store.keys.current_id is None
    finally:
        for app in (first, second, plain):
            app.extensions["courier.store"].dispose()


def test_a_shared_engine_refuses_a_second_set_of_keys(store):
    """Two Courier apps on one host engine must agree on the keys (Store attaches its ring to the engine)."""
    host_engine = make_engine(store.url)  # a host's engine (PostgreSQL): shared by the stores, not copied
    try:
        first = Store(host_engine, keys=crypto.parse_keys(OLD))
        Store(host_engine, keys=crypto.parse_keys(OLD))  # the same keys again: fine
        for other in (crypto.parse_keys(NEW), crypto.NO_KEYS):
            with pytest.raises(ValueError, match=f"already carries other COURIER_ENCRYPTION_KEY keys \\(key ids {kid(OLD)}\\)"):
                Store(host_engine, keys=other)
        assert first.keys.current_id == kid(OLD)
    finally:
        host_engine.dispose()
