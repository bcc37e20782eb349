"""Least privilege (issue 9, item 1): every /api/ route with no token, a malformed header, an unknown
token, a revoked token and each scope; the table is checked against the app's URL map (a new route
without a row fails) and against the OpenAPI document's x-courier-scopes. Then tokens themselves:
random, stored as hashes, last-used time, bound to their source and its allowed types."""
from __future__ import annotations

import re
import string
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from courier.app.store import tokens
from courier.app.store.models import ApiToken, Message
from courier.app.web.openapi import openapi_path
from tests.support.config import settings_for, write_config

OK, UNAUTH, FORBIDDEN = "allowed", 401, 403
# What each credential gets. "allowed" = any status but 401 and 403 (404, 400, 422 are fine: the
# placeholder ids and empty bodies are wrong on purpose, so nothing is changed).
CREDENTIALS = ("none", "malformed", "unknown", "revoked", "ingest", "view", "operate", "admin")
_DENIED = {"none": UNAUTH, "malformed": UNAUTH, "unknown": UNAUTH, "revoked": UNAUTH}
INGEST = {**_DENIED, "ingest": OK, "view": FORBIDDEN, "operate": FORBIDDEN, "admin": OK}
READ = {**_DENIED, "ingest": FORBIDDEN, "view": OK, "operate": OK, "admin": OK}
# Acting: `view` reads statuses, counts, attempts and errors, and does nothing else (issue 20).
REPLAY = {**READ, "view": FORBIDDEN}
# The OpenAPI document: every /api/ route needs credentials (issue 9), but any live token reads it.
ANY = {**_DENIED, "ingest": OK, "view": OK, "operate": OK, "admin": OK}

TABLE = {
    ("POST", "/api/v1/messages"): INGEST,
    ("GET", "/api/v1/messages"): READ,
    ("GET", "/api/v1/messages/<message_id>"): READ,
    ("GET", "/api/v1/deliveries"): READ,
    ("GET", "/api/v1/destinations"): READ,
    ("GET", "/api/v1/reconciliation"): READ,
    ("GET", "/api/v1/audit"): READ,
    ("POST", "/api/v1/deliveries/<delivery_id>/replay"): REPLAY,
    ("POST", "/api/v1/deliveries/replay"): REPLAY,
    ("POST", "/api/v1/destinations/<name>/pause"): REPLAY,
    ("POST", "/api/v1/destinations/<name>/resume"): REPLAY,
    ("POST", "/api/v1/destinations/<name>/reset"): REPLAY,
    ("GET", "/api/openapi.json"): ANY,
}
# The scopes x-courier-scopes must name for each expectation.
_DOCUMENTED = {id(INGEST): ["ingest", "admin"], id(READ): ["view", "operate", "admin"], id(REPLAY): ["operate", "admin"],
               id(ANY): ["ingest", "view", "operate", "admin"]}


def _api_routes(app) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in app.url_map.iter_rules() if rule.rule.startswith("/api/")
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def _url(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?[^>]+>", "nope", rule)


@pytest.fixture
def credentials(store, make_token):
    revoked = make_token(scope="admin")
    with store.session() as session:
        row = session.scalars(select(ApiToken).where(
            ApiToken.token_hash == tokens._hash(revoked["Authorization"].split(" ", 1)[1]))).one()
        token_id = row.id
    return {
        "none": {},
        "malformed": {"Authorization": "Token " + make_token(scope="admin")["Authorization"].split(" ", 1)[1]},
        "unknown": {"Authorization": "Bearer " + tokens.PREFIX + "x" * 43},
        "revoked": (revoked, token_id),
        "ingest": make_token(scope="ingest", source="lab"),
        "view": make_token(scope="view"),
        "operate": make_token(scope="operate"),
        "admin": make_token(scope="admin"),
    }


def test_the_table_has_a_row_for_every_api_route_and_nothing_else(app):
    assert _api_routes(app) == set(TABLE)
    for row in TABLE.values():
        assert set(row) == set(CREDENTIALS)


def test_the_table_agrees_with_the_documented_scopes(app, client, make_token):
    doc = client.get("/api/openapi.json", headers=make_token(scope="operate")).get_json()
    for (method, rule), row in TABLE.items():
        op = doc["paths"][openapi_path(rule)][method.lower()]
        assert op["security"] == [{"bearer": []}], rule
        assert op["x-courier-scopes"] == _DOCUMENTED[id(row)], (method, rule)
        assert op["x-courier-scopes"] == [s for s in tokens.SCOPES if row[s] == OK], (method, rule)


def test_each_route_with_each_credential(app, client, store, credentials):
    revoked, revoked_id = credentials["revoked"]
    # The revoked token worked once (so it sits in this process's 5 s cache), then is revoked.
    assert client.get("/api/v1/destinations", headers=revoked).status_code == 200
    with store.session() as session:
        tokens.revoke(session, revoked_id)
    headers = {**credentials, "revoked": revoked}
    checked = 0
    for (method, rule), row in sorted(TABLE.items()):
        for credential in CREDENTIALS:
            r = client.open(_url(rule), method=method, headers=headers[credential])
            expected = row[credential]
            if expected == OK:
                assert r.status_code not in (401, 403), (method, rule, credential, r.status_code, r.get_data(True))
                assert r.status_code < 500, (method, rule, credential, r.status_code, r.get_data(True))
            else:
                assert r.status_code == expected, (method, rule, credential, r.status_code, r.get_data(True))
                assert r.get_json()["error"]["code"] == ("unauthorized" if expected == 401 else "forbidden")
            checked += 1
    assert checked == len(TABLE) * len(CREDENTIALS)


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "bearer  ", "Basic dXNlcjpwYXNz",
                                    "Bearer courier_", "Bearer " + "x" * 300, "Bearer courier_" + "a" * 300])
def test_malformed_authorization_headers_are_401(client, header):
    r = client.get("/api/v1/messages", headers={"Authorization": header})
    assert r.status_code == 401


def test_an_ingest_token_posts_as_its_own_source_whatever_the_header_says(client, store, make_token):
    headers = {**make_token(scope="ingest", source="lab"), "X-Courier-Source": "other"}
    r = client.post("/api/v1/messages", json={"type": "lab.result", "data": {"v": 1}}, headers=headers)
    assert r.status_code == 202, r.get_data(as_text=True)
    with store.session() as session:
        assert session.get(Message, r.get_json()["id"]).source == "lab"
        assert session.scalars(select(Message).where(Message.source == "other")).first() is None


def test_an_ingest_token_cannot_post_a_type_its_source_is_not_allowed(tmp_path, store, queue_prefix, make_token):
    from courier.app import create_app

    config = write_config(tmp_path / "courier.yml", {"erp": f"file://{tmp_path}/erp"},
                          allowed_types=["lab.result"])
    flask_app = create_app(settings_for(config, store.url, queue_prefix), {"TESTING": True})
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    client = flask_app.test_client()
    headers = make_token(scope="ingest", source="lab")
    r = client.post("/api/v1/messages", json={"type": "adt.admit", "data": {}}, headers=headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "type_not_allowed"
    with store.session() as session:
        assert session.scalars(select(Message).where(Message.type == "adt.admit")).first() is None
    assert client.post("/api/v1/messages", json={"type": "lab.result", "data": {}}, headers=headers).status_code == 202


def test_tokens_are_random_stored_only_as_hashes_and_record_their_last_use(client, store):
    with store.session() as session:
        row, plaintext = tokens.create(session, scope="operate", source=None)
        token_id = row.id
    secret = plaintext[len(tokens.PREFIX):]
    # token_urlsafe(32): 43 characters of a 64-character alphabet = 258 bits, at least 256.
    assert plaintext.startswith(tokens.PREFIX) and len(secret) >= 43
    assert set(secret) <= set(string.ascii_letters + string.digits + "-_")
    with store.session() as session:
        assert tokens.create(session, scope="operate", source=None)[1] != plaintext  # not derived from anything
        row = session.get(ApiToken, token_id)
        assert row.last_used_at is None
        stored = [str(v) for v in (row.id, row.name, row.source, row.scope, row.token_hash)]
        assert not any(secret in v or plaintext in v for v in stored)
        assert row.token_hash == tokens._hash(plaintext) and len(row.token_hash) == 64
    assert client.get("/api/v1/destinations", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200
    with store.session() as session:
        assert session.get(ApiToken, token_id).last_used_at is not None


def test_a_token_is_used_again_after_its_last_use_was_recorded_on_sqlite(sqlite_store):
    """SQLite (`make run`'s store) gives times back without a zone: the second use of a token
    compared them with an aware now and answered 500 (found in the hospital tour with two workers)."""
    from freezegun import freeze_time

    with sqlite_store.session() as session:
        token, plaintext = tokens.create(session, scope="operate", source=None)
    with freeze_time("2026-11-21 10:00:00"), sqlite_store.session() as session:
        assert tokens.authenticate(session, plaintext).id == token.id  # first use: last_used_at written
    with freeze_time("2026-11-21 10:05:00"), sqlite_store.session() as session:
        assert tokens.authenticate(session, plaintext).id == token.id  # read back, compared, written again
    with sqlite_store.session() as session:
        assert session.get(ApiToken, token.id).last_used_at == datetime(2026, 11, 21, 10, 5, tzinfo=timezone.utc)


def test_the_comparison_is_a_lookup_by_hash_not_of_the_secret():
    """No string comparison against a stored secret exists to leak timing: the presented token is hashed
    (SHA-256) and looked up by hash in a unique index; an attacker controls the hash's input, not its
    bytes, so any timing of the index lookup tells them nothing of a stored token's plaintext."""
    import inspect

    source = inspect.getsource(tokens.authenticate)
    assert "token_hash == _hash(plaintext)" in source
