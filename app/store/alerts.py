"""Alert rules on each destination, and their state in the store, so each rule notifies once when it
starts firing and once when it clears, never on every check (docs/console.md, "Alerts").

Rules, per configured destination, with thresholds from the environment:

    backlog        open deliveries above COURIER_ALERT_BACKLOG (default 1000)
    oldest_open    the oldest open delivery older than COURIER_ALERT_OLDEST (default 15m)
    error_rate     over the last COURIER_ALERT_WINDOW (default 15m), the share of attempts that failed
                   above COURIER_ALERT_ERROR_RATE (default 0.5), counted once there are 10 attempts
    circuit_open   the circuit breaker open or half-open
    dead_growth    more than COURIER_ALERT_DEAD (default 0) deliveries went dead in the window

`evaluate` compares each rule with its row in courier_alerts under a row lock and returns the
notices of the rules whose state changed; the caller sends them (courier.tasks.alerts posts them to
COURIER_ALERT_WEBHOOK) before the transaction commits, so a notice that could not be sent is sent at
the next check, and two checkers never both send one. The console shows the same rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Mapping

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from courier.app.settings import Settings, parse_duration
from courier.app.store import circuits, reports
from courier.app.store.models import DEAD, AlertState, Attempt, Delivery, utcnow

WEBHOOK_VARIABLE = "COURIER_ALERT_WEBHOOK"
MIN_ATTEMPTS = 10  # an error rate over fewer attempts is noise


@dataclass(frozen=True)
class Rule:
    destination: str
    kind: str
    threshold: float

    @property
    def name(self) -> str:
        return f"{self.destination}:{self.kind}"


def _env(env: Mapping[str, str], name: str, default: str, duration: bool = False) -> float:
    raw = env.get(name, default)
    try:
        return parse_duration(raw) if duration else float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {'duration' if duration else 'number'}") from None


def thresholds(env: Mapping[str, str] | None = None) -> dict[str, float]:
    env = os.environ if env is None else env
    return {"backlog": _env(env, "COURIER_ALERT_BACKLOG", "1000"),
            "oldest_open": _env(env, "COURIER_ALERT_OLDEST", "15m", duration=True),
            "error_rate": _env(env, "COURIER_ALERT_ERROR_RATE", "0.5"),
            "circuit_open": 0.0,
            "dead_growth": _env(env, "COURIER_ALERT_DEAD", "0"),
            "window": _env(env, "COURIER_ALERT_WINDOW", "15m", duration=True)}


def webhook_url(env: Mapping[str, str] | None = None) -> str | None:
    return ((os.environ if env is None else env).get(WEBHOOK_VARIABLE) or "").strip() or None


def rules_of(settings: Settings, env: Mapping[str, str] | None = None) -> list[Rule]:
    limits = thresholds(env)
    return [Rule(name, kind, limits[kind]) for name in settings.routing.destinations
            for kind in ("backlog", "oldest_open", "error_rate", "circuit_open", "dead_growth")]


def _measure(session: Session, window: float, now: datetime) -> dict[tuple[str, str], float]:
    """Each (destination, kind)'s current value."""
    since = now - timedelta(seconds=window)
    values: dict[tuple[str, str], float] = {}
    for name, act in reports.activity(session, now).items():
        values[(name, "backlog")] = act["open"]
        values[(name, "oldest_open")] = act["oldest_open_seconds"] or 0
    for name, row in circuits.states(session).items():
        values[(name, "circuit_open")] = 1.0 if circuits.shown_state(row, now) != circuits.CLOSED else 0.0
    for name, total, failed in session.execute(
            select(Delivery.destination, func.count(),
                   func.count().filter(Attempt.outcome != "delivered"))
            .join(Delivery, Delivery.id == Attempt.delivery_id)
            .where(Attempt.started_at >= since).group_by(Delivery.destination)):
        values[(name, "error_rate")] = failed / total if total >= MIN_ATTEMPTS else 0.0
    for name, n in session.execute(
            select(Delivery.destination, func.count())
            .where(Delivery.status == DEAD, Delivery.updated_at >= since).group_by(Delivery.destination)):
        values[(name, "dead_growth")] = n
    return values


SUMMARY = {"backlog": "{v:g} deliveries open (threshold {t:g})",
           "oldest_open": "oldest open delivery {v:g}s old (threshold {t:g}s)",
           "error_rate": "{v:.0%} of recent attempts failed (threshold {t:.0%})",
           "circuit_open": "circuit breaker open",
           "dead_growth": "{v:g} deliveries went dead recently (threshold {t:g})"}


def evaluate(session: Session, settings: Settings, now: datetime | None = None,
             env: Mapping[str, str] | None = None) -> list[dict]:
    """Check every rule; update its row; return one notice per rule that started firing or cleared."""
    now = now or utcnow()
    limits = thresholds(env)
    values = _measure(session, limits["window"], now)
    rules = rules_of(settings, env)
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    if not rules:
        return []
    session.execute(insert(AlertState).values([{"rule": r.name, "firing": False, "summary": ""} for r in rules])
                    .on_conflict_do_nothing())
    rows = {a.rule: a for a in session.scalars(select(AlertState).where(AlertState.rule.in_([r.name for r in rules]))
                                               .with_for_update())}
    notices = []
    for rule in rules:
        value = float(values.get((rule.destination, rule.kind), 0.0))
        firing = value > rule.threshold
        row = rows[rule.name]
        row.value, row.checked_at = value, now
        if firing == row.firing:
            continue
        row.firing, row.since, row.notified_at = firing, now, now
        row.summary = SUMMARY[rule.kind].format(v=value, t=rule.threshold)
        notices.append({"rule": rule.name, "destination": rule.destination, "kind": rule.kind,
                        "state": "firing" if firing else "cleared", "value": value, "threshold": rule.threshold,
                        "summary": row.summary, "at": now.isoformat()})
    return notices


def states(session: Session) -> list[AlertState]:
    """Every rule's row, firing first."""
    return list(session.scalars(select(AlertState).order_by(AlertState.firing.desc(), AlertState.rule)))


def firing(session: Session) -> list[AlertState]:
    return list(session.scalars(select(AlertState).where(AlertState.firing.is_(True)).order_by(AlertState.rule)))


__all__ = ["Rule", "evaluate", "states", "firing", "rules_of", "thresholds", "webhook_url", "WEBHOOK_VARIABLE"]
