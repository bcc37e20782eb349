"""The OpenAPI 3 document of the HTTP API (`GET /api/openapi.json`), built by apispec from marshmallow schemas.

Request bodies are the schemas the handlers load with (courier.app.ingest.EventSchema, courier.app.web.api's
operator schemas); responses that the handlers build as dicts are described by the response
schemas below, and tests/test_openapi.py checks real responses against them (every key, no
extra key), so the two cannot drift apart silently.
"""
from __future__ import annotations

import copy
import re

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import current_app, request
from marshmallow import Schema, fields, validate

from courier.app.ingest import HL7_TYPES, EventSchema
from courier.app.store import outbox
from courier.app.web.schemas import PauseSchema, ReasonSchema, ReplayFilterSchema

# Statuses as docs/api.md names them; documentation only, the handlers decide what they accept.
DELIVERY_STATUSES = ["pending", "in_flight", "retrying", "delivered", "dead"]
MESSAGE_STATUSES = ["accepted", "unrouted"]


# --- response schemas: one per dict the handlers build ----------------------
# Every key is required (the handlers always write it) and None is spelled out with
# allow_none, so the document says exactly what a client receives.

def _s(**kw):
    return fields.String(required=True, **kw)


def _t(**kw):
    return fields.String(required=True, allow_none=True, metadata={"format": "date-time"}, **kw)


class ErrorDetailSchema(Schema):
    code = _s(metadata={"description": "stable, machine-readable, e.g. malformed, invalid, unauthorized"})
    message = _s(metadata={"description": "what went wrong and where, for a person"})
    details = fields.Raw(required=True, metadata={"description": "structured details, e.g. field errors under "
                                                                 "`fields`; `{}` when there are none"})


class ErrorSchema(Schema):
    error = fields.Nested(ErrorDetailSchema, required=True)


class DeliveryRefSchema(Schema):
    id = _s()
    destination = _s()
    status = _s(validate=validate.OneOf(DELIVERY_STATUSES))


class AcceptedSchema(Schema):
    id = _s()
    status = _s(validate=validate.OneOf(["accepted"]))
    duplicate = fields.Boolean(required=True, metadata={"description": "true: a duplicate, nothing new queued"})
    routed = fields.Boolean(required=True, metadata={"description": "false: no route matched (stored, unrouted)"})
    type = _s()
    deliveries = fields.List(fields.Nested(DeliveryRefSchema), required=True)


class AcceptedBatchSchema(Schema):
    messages = fields.List(fields.Nested(AcceptedSchema), required=True)


class AttemptSchema(Schema):
    number = fields.Integer(required=True)
    started_at = _t()
    duration_ms = fields.Integer(required=True, allow_none=True)
    outcome = fields.String(required=True, allow_none=True)
    status_code = fields.Integer(required=True, allow_none=True)
    detail = fields.String(required=True, allow_none=True)


class DeliverySchema(Schema):
    id = _s()
    message_id = _s()
    destination = _s()
    status = _s(validate=validate.OneOf(DELIVERY_STATUSES))
    attempts = fields.Integer(required=True)
    last_error = fields.String(required=True, allow_none=True)
    next_attempt_at = _t()
    lease_expires_at = _t()
    delivered_at = _t()
    created_at = _t()
    updated_at = _t()


class DeliveryTraceSchema(DeliverySchema):
    attempt_log = fields.List(fields.Nested(AttemptSchema), required=True)


class MessageSchema(Schema):
    id = _s()
    source = _s()
    type = _s()
    status = _s()
    content_type = _s()
    size = fields.Integer(required=True)
    idempotency_key = fields.String(required=True, allow_none=True)
    correlation_id = fields.String(required=True, allow_none=True)
    received_at = _t()
    body_purged = fields.Boolean(required=True)
    purged_at = _t()


class MessageTraceSchema(MessageSchema):
    deliveries = fields.List(fields.Nested(DeliveryTraceSchema), required=True)


class MessagePageSchema(Schema):
    items = fields.List(fields.Nested(MessageSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class DeliveryPageSchema(Schema):
    items = fields.List(fields.Nested(DeliverySchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class DestinationSchema(Schema):
    name = _s()
    owner = fields.String(required=True, allow_none=True)
    clearance = fields.String(required=True, allow_none=True)
    backlog = fields.Integer(required=True)
    dead = fields.Integer(required=True)
    last_success_at = _t()
    circuit = _s(validate=validate.OneOf(["closed", "open", "half_open"]))
    circuit_open_until = _t()
    circuit_changed_at = _t()
    consecutive_failures = fields.Integer(required=True)
    paused = fields.Boolean(required=True)
    paused_at = _t()
    paused_by = fields.String(required=True, allow_none=True)
    pause_reason = fields.String(required=True, allow_none=True)


class DestinationListSchema(Schema):
    items = fields.List(fields.Nested(DestinationSchema), required=True)


class CountsSchema(Schema):
    accepted = fields.Integer(required=True)
    delivered = fields.Integer(required=True)
    pending = fields.Integer(required=True, metadata={"description": "pending, in flight or retrying"})
    dead = fields.Integer(required=True)


class ReconciliationSchema(Schema):
    since = _t()
    destinations = fields.Dict(keys=fields.String(), values=fields.Nested(CountsSchema), required=True,
                               metadata={"description": "by destination name: accepted = delivered + pending + dead"})


class ReplayResultSchema(Schema):
    replayed = fields.Integer(required=True)
    ids = fields.List(fields.String(), required=True, metadata={"description": f"the first {outbox.AUDIT_IDS}"})
    limit_reached = fields.Boolean(required=True, metadata={"description": "true: send the same request again"})


class AuditSchema(Schema):
    id = _s()
    at = _t()
    actor = _s()
    action = _s()
    target = fields.String(required=True, allow_none=True)
    reason = fields.String(required=True, allow_none=True)
    details = fields.Dict(required=True)


class AuditPageSchema(Schema):
    items = fields.List(fields.Nested(AuditSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class HealthSchema(Schema):
    status = _s()


class ReadySchema(Schema):
    status = _s(validate=validate.OneOf(["ready", "not_ready"]))
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


# --- query parameters -----------------------------------------------------

class _PageQuery(Schema):
    cursor = fields.String(metadata={"description": "`next_cursor` of the previous page"})
    limit = fields.Integer(validate=validate.Range(min=1, max=1000), metadata={"description": "default 100"})


class MessageQuerySchema(_PageQuery):
    status = fields.String(validate=validate.OneOf(MESSAGE_STATUSES))
    source = fields.String()
    type = fields.String()
    idempotency_key = fields.String()
    since = fields.AwareDateTime(metadata={"description": "received at or after (with a time zone)"})
    until = fields.AwareDateTime(metadata={"description": "received before (with a time zone)"})


class DeliveryQuerySchema(_PageQuery):
    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    destination = fields.String()


class SinceQuerySchema(Schema):
    since = fields.AwareDateTime(metadata={"description": "messages received at or after (with a time zone)"})


class AuditQuerySchema(_PageQuery):
    since = fields.AwareDateTime()
    action = fields.String(metadata={"description": "e.g. replay, pause, resume, token.create, purge"})


# --- operations -----------------------------------------------------------

def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: str | dict, description: str, **extra) -> dict:
    schema = _ref(schema) if isinstance(schema, str) else schema
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


_ERRORS = {
    400: "malformed: a path or query parameter (e.g. a NUL character), the JSON or the HL7 (what and where)",
    401: "no token, or an unknown or revoked one",
    403: "the token's scope does not allow this",
    404: "no such message, delivery or destination",
    409: "the delivery's status does not allow this",
    413: "the body is larger than COURIER_MAX_MESSAGE_BYTES",
    415: "a Content-Type that is not accepted",
    422: "field errors in `details.fields`",
    429: "the source's rate limit (its `rate_limit` in COURIER_CONFIG): nothing stored; retry after `Retry-After` s",
    503: "the store is unreachable; nothing changed, try again",
}
_AUTH = (401, 403, 503)
_RETRY_AFTER = {"headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                            "description": "seconds until the source may send again"}}}
# Which token scopes may call an operation, by the action `require(action)` checks (courier.app.store.tokens.GRANTS).
# "any" is courier.app.web.api.ANY_SCOPE: any live token (the document itself).
_SCOPES = {"ingest": ["ingest", "admin"], "read": ["view", "operate", "admin"], "replay": ["operate", "admin"],
           "any": ["ingest", "view", "operate", "admin"]}


def _op(summary: str, ok: dict, errors: tuple[int, ...] = (), *, action: str | None = None, **extra) -> dict:
    responses = dict(ok)
    auth = set(_AUTH) - ({403} if action == "any" else set())  # any live token: no scope to refuse
    for status in sorted(set(errors) | (auth if action else set())):
        responses[status] = _json("Error", _ERRORS[status], **(_RETRY_AFTER if status == 429 else {}))
    op = {"summary": summary, "responses": responses, **extra}
    if action:
        scopes = _SCOPES[action]
        op["security"] = [{"bearer": []}]
        op["x-courier-scopes"] = scopes  # a bearer scheme has no scopes in OpenAPI 3.0: said here and below
        op["description"] = (op.get("description", "") + f"\n\nToken scope: {' or '.join(scopes)}.").strip()
    else:
        op["security"] = []
    return op


def _reason_body(required: bool, schema: str) -> dict:
    return {"required": required, "content": {"application/json": {"schema": _ref(schema)}}}


_ACCEPTED = {"oneOf": [_ref("Accepted"), _ref("AcceptedBatch")]}

OPERATIONS: dict[str, dict[str, dict]] = {
    "post_message": {"post": _op(
        "Ingest a JSON event or HL7 v2 message (or batch)",
        {202: _json(_ACCEPTED, "stored with its deliveries (committed); an HL7 batch answers {messages: [...]}",
                    headers={"Location": {"schema": {"type": "string"}, "description": "the message's trace"}}),
         200: _json(_ACCEPTED, "a duplicate (same source and Idempotency-Key, event id or MSH-10): nothing queued")},
        (400, 413, 415, 422, 429), action="ingest",
        description="An admin token names the source in X-Courier-Source; an ingest token posts as its own source.",
        parameters=[
            {"in": "header", "name": "Idempotency-Key", "required": False,
             "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._:@/+=-]{1,255}$"}},
            {"in": "header", "name": "X-Courier-Source", "required": False, "schema": {"type": "string"},
             "description": "admin tokens only: the source to post as"},
            {"in": "header", "name": "X-Correlation-ID", "required": False, "schema": {"type": "string"}},
        ],
        requestBody={"required": True, "content": {
            "application/json": {"schema": _ref("Event")},
            **{kind: {"schema": {"type": "string", "description": "HL7 v2 ER7 text"}} for kind in sorted(HL7_TYPES)},
        }})},
    "list_messages": {"get": _op(
        "Search messages, newest first", {200: _json("MessagePage", "a page; next_cursor gives the next")},
        (400,), action="read", parameters=[{"in": "query", "schema": MessageQuerySchema}])},
    "get_message": {"get": _op(
        "A message's trace: its deliveries and their attempt logs",
        {200: _json("MessageTrace", "the message and its deliveries")}, (400, 404), action="read")},
    "list_deliveries": {"get": _op(
        "Search deliveries, newest first", {200: _json("DeliveryPage", "a page; next_cursor gives the next")},
        (400,), action="read", parameters=[{"in": "query", "schema": DeliveryQuerySchema}])},
    "list_destinations": {"get": _op(
        "Each destination's backlog, dead count, circuit and pause switch",
        {200: _json("DestinationList", "every destination of the routing file")}, action="read")},
    "reconciliation": {"get": _op(
        "Per destination: accepted = delivered + pending + dead",
        {200: _json("Reconciliation", "counts by destination")}, (400,), action="read",
        parameters=[{"in": "query", "schema": SinceQuerySchema}])},
    "replay_delivery": {"post": _op(
        "Replay one dead or delivered delivery (pending again, same id, fresh attempt budget)",
        {200: _json("DeliveryTrace", "the delivery and its attempt log")}, (400, 404, 409, 413, 422),
        action="replay", requestBody=_reason_body(False, "Reason"))},
    "replay_deliveries": {"post": _op(
        "Replay a destination's dead (or delivered) deliveries created in [since, until)",
        {200: _json("ReplayResult", "how many were replayed")}, (400, 413, 422), action="replay",
        requestBody=_reason_body(True, "ReplayFilter"))},
    "pause_destination": {"post": _op(
        "Pause deliveries to a destination (reason required)", {200: _json("Destination", "the destination")},
        (400, 404, 413, 422), action="replay", requestBody=_reason_body(True, "Pause"))},
    "resume_destination": {"post": _op(
        "Resume deliveries to a destination", {200: _json("Destination", "the destination")},
        (400, 404, 413, 422), action="replay", requestBody=_reason_body(False, "Reason"))},
    "reset_circuit": {"post": _op(
        "Close a destination's circuit breaker by hand; the deliveries it held are due at once",
        {200: _json("Destination", "the destination")}, (400, 404, 413, 422), action="replay",
        requestBody=_reason_body(False, "Reason"))},
    "list_audit": {"get": _op(
        "Operator actions, newest first", {200: _json("AuditPage", "a page; next_cursor gives the next")},
        (400,), action="read", parameters=[{"in": "query", "schema": AuditQuerySchema}])},
    "healthz": {"get": _op("The process is alive", {200: _json("Health", "alive")})},
    "readyz": {"get": _op("The store and the broker are reachable", {
        200: _json("Ready", "ready"), 503: _json("Ready", "not ready: `checks` says which")})},
    "metrics_view": {"get": _op("Prometheus metrics of every process (text format)", {200: {
        "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})},
    "openapi": {"get": _op("This document", {200: {
        "description": "OpenAPI 3", "content": {"application/json": {"schema": {"type": "object"}}}}},
        action="any")},
}

_COMPONENTS = {
    "Error": ErrorSchema, "Event": EventSchema, "Accepted": AcceptedSchema, "AcceptedBatch": AcceptedBatchSchema,
    "DeliveryRef": DeliveryRefSchema, "Attempt": AttemptSchema, "Delivery": DeliverySchema,
    "DeliveryTrace": DeliveryTraceSchema, "Message": MessageSchema, "MessageTrace": MessageTraceSchema,
    "MessagePage": MessagePageSchema, "DeliveryPage": DeliveryPageSchema, "Destination": DestinationSchema,
    "DestinationList": DestinationListSchema, "Counts": CountsSchema, "Reconciliation": ReconciliationSchema,
    "ReplayResult": ReplayResultSchema, "Audit": AuditSchema, "AuditPage": AuditPageSchema,
    "Health": HealthSchema, "Ready": ReadySchema,
}

_PATH_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def openapi_path(rule: str) -> str:
    """Flask's `/a/<x>` or `/a/<int:x>` as OpenAPI's `/a/{x}`."""
    return _PATH_PARAM.sub(r"{\1}", rule)


def document(blueprint_name: str = "courier") -> dict:
    """The document for the app serving this request: paths as mounted (blueprint prefix), server = script root."""
    spec = APISpec(title="Courier", version="1", openapi_version="3.0.3", plugins=[MarshmallowPlugin()],
                   info={"description": "Durable message broker for hospital messages. Errors are always "
                                        '{"error": {"code", "message", "details"}}. Scopes: ingest (post '
                                        "messages as its source), view (read statuses, counts, attempts and errors, "
                                        "never a body), operate (read, replay, pause, resume), admin (all)."},
                   servers=[{"url": request.script_root or "/"}])
    spec.components.security_scheme("bearer", {
        "type": "http", "scheme": "bearer",
        "description": "`courier tokens create`; scopes ingest, view, operate, admin "
                       "(each operation's x-courier-scopes)"})
    for name, schema in {**_COMPONENTS, "Reason": ReasonSchema, "Pause": PauseSchema,
                         "ReplayFilter": ReplayFilterSchema}.items():
        # Nested schemas register themselves under their class name less "Schema" (apispec's
        # default resolver), which is the name given here too: register each name once.
        if name not in spec.components.schemas:
            spec.components.schema(name, schema=schema)
    paths: dict[str, dict] = {}
    for rule in current_app.url_map.iter_rules():
        bp_name, _, endpoint = rule.endpoint.partition(".")
        if bp_name != blueprint_name or endpoint not in OPERATIONS:
            continue  # a route without a description is caught by tests/test_openapi.py
        path = openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            # A copy: apispec's plugin rewrites parameters and schemas in place.
            op = dict(copy.deepcopy(OPERATIONS[endpoint][method.lower()]), operationId=endpoint)
            params = [{"in": "path", "name": arg, "required": True, "schema": {"type": "string"}}
                      for arg in sorted(rule.arguments)]
            if params:
                op["parameters"] = params + op.get("parameters", [])
            paths.setdefault(path, {})[method.lower()] = op
    for path, operations in sorted(paths.items()):
        spec.path(path=path, operations=operations)
    return _ecma_patterns(spec.to_dict())


def _ecma_patterns(node):
    """marshmallow's Regexp matches at the start (re.match) and our patterns end in \\Z, which
    ECMA-262 regexes (what OpenAPI patterns are) lack: written as ^...$ for the document."""
    if isinstance(node, dict):
        out = {k: _ecma_patterns(v) for k, v in node.items()}
        pattern = out.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("\\Z"):
            out["pattern"] = ("" if pattern.startswith("^") else "^") + pattern[:-2] + "$"
        return out
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node
