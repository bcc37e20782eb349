"""The audit log of operator actions (replay, pause, resume, purge, token create/revoke): who did what, to what, when and why.

Append-only: this module is the only writer of `courier_audit`, and it only
inserts; on PostgreSQL a trigger (migration 0003) refuses UPDATE and DELETE. A record
is written in the caller's transaction, so it commits exactly when the action it
describes does (a purge, done in many transactions, records its run once at the end).
"""
from __future__ import annotations

import getpass
import json
import os
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from courier.app.store.models import ApiToken, AuditRecord, utcnow

TARGET_LIMIT = 255  # the column's width
ACTOR_LIMIT = 128


def record(session: Session, *, actor: str, action: str, target: str, reason: str = "",
           details: dict | None = None) -> AuditRecord:
    """Append one record of an operator action; committed with the caller's transaction."""
    row = AuditRecord(at=utcnow(), actor=actor[:ACTOR_LIMIT], action=action, target=target[:TARGET_LIMIT],
                      reason=reason or "", details=json.dumps(details or {}, default=str, sort_keys=True))
    session.add(row)
    session.flush()  # the id, so callers can point at the record
    return row


def listing(session: Session, since: datetime | None = None, action: str | None = None, limit: int = 100,
            cursor: int | None = None) -> tuple[list[AuditRecord], int | None]:
    """Records newest first, and the cursor of the next page (None at the end).

    Paged by id rather than `at`: ids are unique and grow with insertion, so a page
    boundary never skips or repeats a record that shares a timestamp with another.
    """
    query = select(AuditRecord)
    if since is not None:
        query = query.where(AuditRecord.at >= since)
    if action:
        query = query.where(AuditRecord.action == action)
    if cursor is not None:
        query = query.where(AuditRecord.id < cursor)
    rows = list(session.scalars(query.order_by(AuditRecord.id.desc()).limit(limit + 1)))
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_cursor


def details_of(row: AuditRecord) -> dict:
    return json.loads(row.details or "{}")


def token_actor(token: ApiToken) -> str:
    """How an API caller is named in the log: its token id, and the token's label if it has one."""
    return f"token:{token.id}" + (f" ({token.name})" if token.name else "")


def cli_actor() -> str:
    """How a command-line operator is named: the OS user running `courier`."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"cli:uid {os.getuid()}"


__all__ = ["record", "listing", "details_of", "token_actor", "cli_actor"]
