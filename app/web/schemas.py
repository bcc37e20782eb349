"""Request bodies of the operator actions (replay, pause, resume), loaded by the API and documented by openapi."""
from __future__ import annotations

from flask import current_app
from marshmallow import ValidationError, fields, validate, validates, validates_schema

from courier.app.config import StrictSchema
from courier.app.store import outbox

# PostgreSQL text cannot hold NUL: refused here (422) rather than by the store (a DataError, 503).
_NO_NUL = validate.Regexp(r"[^\x00]*\Z", error="must not contain NUL characters")


class ReasonSchema(StrictSchema):
    reason = fields.String(load_default="", validate=[validate.Length(max=2000), _NO_NUL])


class PauseSchema(StrictSchema):
    # Pausing stops deliveries to a clinical system: the log must say why.
    reason = fields.String(required=True, validate=[validate.Length(min=1, max=2000), _NO_NUL])


class ReplayFilterSchema(StrictSchema):
    destination = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(outbox.REPLAYABLE))
    since = fields.AwareDateTime(load_default=None, allow_none=True)
    until = fields.AwareDateTime(load_default=None, allow_none=True)
    reason = fields.String(load_default="", validate=[validate.Length(max=2000), _NO_NUL])
    limit = fields.Integer(load_default=outbox.REPLAY_LIMIT, validate=validate.Range(min=1, max=outbox.REPLAY_LIMIT))

    @validates("destination")
    def _known(self, value, **_):
        if value not in current_app.extensions["courier.settings"].routing.destinations:
            raise ValidationError(f"unknown destination {value!r}")

    @validates_schema
    def _window(self, data, **_):
        if data.get("since") and data.get("until") and data["since"] >= data["until"]:
            raise ValidationError("must be later than since", "until")
