"""GET /api/openapi.json: a valid OpenAPI 3 document that describes every route, matches real
responses key for key, and survives schemathesis against the live app on PostgreSQL."""
from __future__ import annotations

import copy
import os
import re

import pytest
import schemathesis
from schemathesis import GenerationMode
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from courier.app.store import tokens as token_store
from courier.app.web import api
from courier.app.web.openapi import OPERATIONS, openapi_path
from tests.integration.test_operations import accepted

METHODS = {"get", "post", "put", "patch", "delete"}


def _doc(client, headers: dict) -> dict:
    r = client.get("/api/openapi.json", headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


@pytest.fixture
def reader(make_token) -> dict:
    """Headers that read the document: an ingest token, the narrowest scope (any live token will do)."""
    return make_token(scope="ingest", source="lab")


@pytest.fixture
def doc(client, reader) -> dict:
    return _doc(client, reader)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_document_is_openapi_3(doc):
    assert doc["openapi"].startswith("3.0")
    assert doc["info"]["title"] == "Courier" and doc["info"]["version"]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):  # every reference resolves
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for path, item in doc["paths"].items():
        templated = set(re.findall(r"{([^}]+)}", path))
        for method, op in item.items():
            assert method in METHODS, (path, method)
            assert op["responses"] and op["operationId"]
            assert all(re.fullmatch(r"[1-5]\d\d", str(code)) for code in op["responses"]), (path, method)
            path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert path_params == templated, (path, method)
            assert {p["in"] for p in op.get("parameters", [])} <= {"path", "query", "header"}
    # The strict check: the OpenAPI 3.0 meta-schema (schemathesis ships it; openapi-spec-validator
    # agrees, checked by hand, but is not a dependency).
    loaded = schemathesis.openapi.from_dict(doc)
    loaded.validate()
    assert len(list(loaded.get_all_operations())) == sum(len(item) for item in doc["paths"].values())


def test_every_route_of_the_blueprint_is_in_the_document_and_nothing_else(app, doc):
    routes = {(openapi_path(rule.rule), method.lower())
              for rule in app.url_map.iter_rules() if rule.endpoint.startswith(f"{api.bp.name}.")
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == documented
    assert {rule.endpoint.split(".", 1)[1] for rule in app.url_map.iter_rules()
            if rule.endpoint.startswith(f"{api.bp.name}.")} == set(OPERATIONS)


def test_every_api_endpoint_needs_a_token_and_names_its_scopes(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/api/"):
                assert op["security"] == [{"bearer": []}], (path, method)
                assert set(op["x-courier-scopes"]) <= set(token_store.SCOPES) and "admin" in op["x-courier-scopes"]
                assert "401" in op["responses"], (path, method)
                # 403 is documented exactly where some scope is refused.
                assert ("403" in op["responses"]) == (len(op["x-courier-scopes"]) < len(token_store.SCOPES)), (path, method)
            else:
                assert op["security"] == [], (path, method)
    assert doc["paths"]["/api/openapi.json"]["get"]["x-courier-scopes"] == ["ingest", "view", "operate", "admin"]
    assert doc["paths"]["/api/v1/messages"]["post"]["x-courier-scopes"] == ["ingest", "admin"]
    assert doc["paths"]["/api/v1/messages"]["get"]["x-courier-scopes"] == ["view", "operate", "admin"]
    body = doc["paths"]["/api/v1/messages"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/hl7-v2", "x-application/hl7-v2+er7"}
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/Event"}
    assert doc["components"]["schemas"]["Event"]["required"] == ["data", "type"]


def test_the_documented_scopes_are_the_ones_the_api_enforces(client, make_token, doc):
    """Each operation with each scope: refused (403) exactly when x-courier-scopes leaves the scope out."""
    tokens = {scope: make_token(scope=scope) for scope in token_store.SCOPES}
    checked = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if "x-courier-scopes" not in op:
                continue
            url = re.sub(r"{[^}]+}", "x", path)
            for scope, headers in tokens.items():
                r = client.open(url, method=method.upper(), headers=headers)
                assert (r.status_code != 403) == (scope in op["x-courier-scopes"]), (method, path, scope, r.status_code)
                checked += 1
    assert checked == len(token_store.SCOPES) * 13


def test_an_embedded_host_gets_paths_under_its_prefix_and_its_script_root_as_server(app, reader):
    host = Flask("host")
    host.extensions["courier.settings"] = app.extensions["courier.settings"]
    host.extensions["courier.store"] = app.extensions["courier.store"]  # the token check reads it
    api.init_app(host, "/courier", own_app=False)
    client = host.test_client()
    assert client.get("/api/openapi.json", headers=reader).status_code == 404
    assert client.get("/courier/api/openapi.json").status_code == 401
    r = client.get("/courier/api/openapi.json", base_url="http://localhost/hospital",  # SCRIPT_NAME /hospital
                   headers=reader)
    assert r.status_code == 200
    doc = r.get_json()
    assert doc["servers"] == [{"url": "/hospital"}]
    assert "/courier/api/v1/messages/{message_id}" in doc["paths"]
    assert all(path.startswith("/courier/") for path in doc["paths"])


# --- the handlers' dicts and the response schemas agree -------------------

@pytest.fixture
def api_schema(app, reader):
    # from_wsgi passes keyword arguments on to Werkzeug's test client: the document needs a token.
    return schemathesis.openapi.from_wsgi("/api/openapi.json", app, headers=reader)


@pytest.fixture
def steered_schema(app, doc):
    """The document with this test app's source and destination names as enums, so generated
    requests get past "unknown source/destination" and reach the store. (The served document
    leaves them out: names of the hospital's systems are no part of the API's contract.)"""
    doc = copy.deepcopy(doc)
    routing = app.extensions["courier.settings"].routing
    for item in doc["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] == "X-Courier-Source":
                    param.update(required=True, schema={"type": "string", "enum": sorted(routing.sources)})
                elif param["name"] == "name" and param["in"] == "path":
                    param["schema"] = {"type": "string", "enum": sorted(routing.destinations)}
    doc["components"]["schemas"]["ReplayFilter"]["properties"]["destination"]["enum"] = sorted(routing.destinations)
    schema = schemathesis.openapi.from_dict(doc)
    schema.app = app  # as from_wsgi does: requests go to the app in-process
    return schema


def _check(schema, method: str, path: str, response) -> dict:
    """`response` conforms to the document's schema for it (required keys, no extra keys, types)."""
    schema[path][method.upper()].validate_response(response)
    return response.get_json()


def test_real_responses_match_the_documented_schemas_key_for_key(client, app, store, make_token, api_schema):
    ingest, operate = make_token(), make_token(scope="operate")
    ids = accepted(client, ingest, store, app)  # billing dead, erp delivered: attempts, errors, times filled in
    r = client.post(f"/api/v1/deliveries/{ids['billing']}/replay", json={"reason": "fixed"}, headers=operate)
    assert set(_check(api_schema, "post", "/api/v1/deliveries/{delivery_id}/replay", r)["attempt_log"][0]) == {
        "number", "started_at", "duration_ms", "outcome", "status_code", "detail"}
    r = client.post("/api/v1/destinations/billing/pause", json={"reason": "maintenance"}, headers=operate)
    assert _check(api_schema, "post", "/api/v1/destinations/{name}/pause", r)["paused"] is True
    message_id = client.get("/api/v1/messages", headers=operate).get_json()["items"][0]["id"]
    responses = [
        ("get", "/api/v1/messages", client.get("/api/v1/messages?limit=1", headers=operate)),
        ("get", "/api/v1/messages/{message_id}", client.get(f"/api/v1/messages/{message_id}", headers=operate)),
        ("get", "/api/v1/deliveries", client.get("/api/v1/deliveries", headers=operate)),
        ("get", "/api/v1/destinations", client.get("/api/v1/destinations", headers=operate)),
        ("get", "/api/v1/reconciliation", client.get("/api/v1/reconciliation", headers=operate)),
        ("get", "/api/v1/audit", client.get("/api/v1/audit", headers=operate)),
        ("post", "/api/v1/destinations/{name}/resume",
         client.post("/api/v1/destinations/billing/resume", headers=operate)),
        ("post", "/api/v1/deliveries/replay", client.post(
            "/api/v1/deliveries/replay", json={"destination": "erp", "status": "delivered"}, headers=operate)),
        ("post", "/api/v1/messages", client.post("/api/v1/messages", json={"type": "x", "data": {}}, headers=ingest)),
        ("post", "/api/v1/messages", client.post("/api/v1/messages", json={"type": "x"}, headers=ingest)),
        ("get", "/api/v1/messages/{message_id}", client.get("/api/v1/messages/nope", headers=operate)),
        ("get", "/api/v1/audit", client.get("/api/v1/audit", headers=ingest)),
        ("get", "/api/v1/audit", client.get("/api/v1/audit")),
        ("get", "/healthz", client.get("/healthz")),
        ("get", "/readyz", client.get("/readyz")),
    ]
    for method, path, response in responses:
        assert response.status_code < 500, (path, response.get_json())
        _check(api_schema, method, path, response)
    trace = responses[1][2].get_json()
    assert {d["status"] for d in trace["deliveries"]} == {"pending", "delivered"} and trace["deliveries"][0]["attempt_log"]
    assert responses[5][2].get_json()["items"], "the audit list was empty: nothing was checked"


# --- schemathesis against the live app -------------------------------------

@pytest.fixture
def tokens(make_token):
    """One token of each scope; the ingest token is bound to a source, as ingest tokens always are."""
    return [make_token(scope="admin"), make_token(scope="operate"), make_token(scope="ingest", source="lab")]


def _operation(schema, doc: dict, operation_id: str):
    """The schemathesis operation with `operation_id` (paths as the app mounts them)."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if op["operationId"] == operation_id:
                return schema[path][method.upper()]
    raise LookupError(operation_id)


# Operations without parameters or a body: there is nothing to make invalid.
_NO_INPUT = {"healthz", "readyz", "metrics_view", "openapi", "list_destinations"}
_RUNS = [(op, GenerationMode.POSITIVE) for op in sorted(OPERATIONS)] + [
    (op, GenerationMode.NEGATIVE) for op in sorted(set(OPERATIONS) - _NO_INPUT)]
# 25 keeps the run well under a minute and the same on every run (derandomized: CI is not a
# lottery); COURIER_FUZZ_EXAMPLES=500 for a longer hunt with fresh random examples.
EXAMPLES = int(os.environ.get("COURIER_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = "COURIER_FUZZ_EXAMPLES" not in os.environ


# Not schemathesis.pytest.from_fixture: its lazy loader reads a private pytest attribute that
# pytest 9 no longer has. One test per operation and mode, hypothesis driving schemathesis' strategy.
@pytest.mark.parametrize(("operation_id", "mode"), _RUNS, ids=[f"{op}-{mode.value}" for op, mode in _RUNS])
def test_schemathesis_finds_no_server_error(operation_id, mode, steered_schema, doc, tokens):
    """Valid (positive) and invalid (negative) requests, each sent with every scope: admin, operate
    and ingest (refused with a documented 403 where its scope does not reach, posting as its source)."""
    operation = _operation(steered_schema, doc, operation_id)

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    def run(case):
        for headers in tokens:
            case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance])

    run()


# --- what schemathesis found, as regular tests ------------------------------

@pytest.mark.parametrize("url", [
    "/api/v1/messages/a%00b",                 # path parameter
    "/api/v1/audit?action=a%00b",             # query parameters of every list
    "/api/v1/messages?source=a%00b",
    "/api/v1/deliveries?destination=a%00b",
    "/api/v1/deliveries?status=pending&cursor=%C2%BE%2A%07%00&limit=128",  # found by schemathesis as is
])
def test_a_nul_in_a_parameter_is_a_400_not_a_store_error(client, make_token, url):
    r = client.get(url, headers=make_token(scope="operate"))
    assert r.status_code == 400, r.get_json()
    assert r.get_json()["error"]["code"] == "malformed" and "NUL" in r.get_json()["error"]["message"]


def test_a_nul_in_a_delivery_id_to_replay_is_a_400(client, make_token):
    r = client.post("/api/v1/deliveries/a%00b/replay", headers=make_token(scope="operate"))
    assert r.status_code == 400 and r.get_json()["error"]["details"] == {"parameter": "delivery_id"}


@pytest.mark.parametrize(("url", "body"), [
    # Found by schemathesis: a pause reason holding NUL (the rest of its example was noise).
    ("/api/v1/destinations/billing/pause", {"reason": "maintenance\u0000window"}),
    ("/api/v1/destinations/billing/resume", {"reason": "\u0000"}),
    ("/api/v1/deliveries/replay", {"destination": "erp", "status": "dead", "reason": "a\u0000"}),
])
def test_a_nul_in_a_reason_is_a_field_error_and_nothing_changes(client, make_token, store, url, body):
    from courier.app.store.models import AuditRecord, Circuit

    r = client.post(url, json=body, headers=make_token(scope="operate"))  # NUL sent as \u0000 in the JSON
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"]["details"]["fields"] == {"reason": ["must not contain NUL characters"]}
    with store.session() as s:
        assert s.query(AuditRecord).count() == 0 and s.query(Circuit).filter(Circuit.paused_at.isnot(None)).count() == 0


@pytest.mark.parametrize("cursor", ["99999999999999999999999", "0", "-1"])
def test_an_audit_cursor_outside_the_id_range_is_a_400(client, make_token, cursor):
    r = client.get(f"/api/v1/audit?cursor={cursor}", headers=make_token(scope="operate"))
    assert r.status_code == 400 and r.get_json()["error"]["details"] == {"parameter": "cursor"}


def test_an_event_type_with_a_nul_is_refused_as_invalid_not_a_store_error(client, make_token):
    r = client.post("/api/v1/messages", data='{"type": "a\\u0000b", "data": {}}', content_type="application/json",
                    headers=make_token())
    assert r.status_code == 422, r.get_json()


def test_a_message_cursor_hiding_a_nul_is_a_400(client, make_token):
    import base64

    cursor = base64.urlsafe_b64encode(b"2000-01-01T00:00:00+00:00|a\x00b").decode().rstrip("=")
    r = client.get(f"/api/v1/messages?cursor={cursor}", headers=make_token(scope="operate"))
    assert r.status_code == 400, r.get_json()
