"""The console's pure parts (no server): HL7 field names, the SVG charts, the patient search key, ages,
the login redirect target, the alert thresholds, the `view` scope's grants, and the packaged assets.

The views themselves, on PostgreSQL, are tests/integration/test_console.py; in chromium,
tests/integration/test_console_browser.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from courier.app.hl7 import fields
from courier.app.store import alerts, search, tokens
from courier.app.store.models import ApiToken
from courier.app.web import charts, console

ROOT = Path(__file__).resolve().parents[2]
KEY = b"k" * 40


def test_segments_are_numbered_and_named_as_hl7_numbers_them():
    text = "MSH|^~\\&|LAB|GH|||20261121||ADT^A01|C1|P|2.5\rPID|1||MRN1^^^GH^MR||DOE^JANE\rZXY|1|odd\r"
    msh, pid, z = fields.segments(text)
    assert [(f.position, f.name, f.value) for f in msh.fields[:3]] == [
        ("MSH-1", "Field Separator", "|"), ("MSH-2", "Encoding Characters", "^~\\&"),
        ("MSH-3", "Sending Application", "LAB")]
    assert ("MSH-10", "Message Control ID", "C1") in [(f.position, f.name, f.value) for f in msh.fields]
    assert [(f.position, f.name) for f in pid.fields] == [("PID-1", "Set ID"), ("PID-3", "Patient Identifier List"),
                                                          ("PID-5", "Patient Name")]
    assert z.name == "ZXY" and [f.name for f in z.fields] == ["", ""]  # unknown segments: positions only


def test_segments_accept_newlines_and_another_field_separator():
    msh, pid = fields.segments("MSH#^~\\&#LAB\nPID#1##X\n")
    assert msh.fields[0].value == "#" and pid.fields[1].position == "PID-3"


def test_bars_scale_to_the_tallest_hour():
    chart = charts.bars([0, 5, 10], [0, 0, 10], width=30, height=22)
    assert [(b.kind, b.count, b.height) for b in chart.bars] == [("ok", 5, 5.0), ("ok", 10, 10.0), ("dead", 10, 10.0)]
    assert chart.bars[2].y == 22 - 10 - 10  # dead stacked on delivered
    assert charts.bars([0] * 24, [0] * 24).bars == []


def test_the_chart_template_draws_each_bar_and_escapes_nothing_it_should_not():
    app = Flask(__name__)
    app.register_blueprint(console.bp)
    with app.app_context():
        svg = app.jinja_env.from_string('{% from "console/_chart.html" import chart %}{{ chart(c) }}').render(
            c=charts.bars([1, 0], [0, 2], width=20, height=10))
    assert svg.startswith("<svg") and svg.count('class="bar-ok"') == 1 and svg.count('class="bar-dead"') == 1
    assert "<title>2 dead</title>" in svg


@pytest.mark.parametrize("document, expected", [
    ({"data": {"patient": "P123"}}, "P123"),
    ({"data": {"patient": {"mrn": "M9", "name": "x"}}}, "M9"),
    ({"data": {"patient": {"id": 42}}}, "42"),
    ({"data": {"service": "US"}}, None),
    ({"data": {"patient": True}}, None),
    ({"data": "x"}, None),
])
def test_patient_identifier_of_json_events(document, expected):
    assert search.patient_identifier(document) == expected


def test_patient_identifier_of_hl7_is_pid_3_1():
    from courier.app.hl7 import er7

    msg = er7.parse("MSH|^~\\&|LAB|GH|||20261121||ADT^A01|C1|P|2.5\rPID|1||MRN1^^^GH^MR~OTHER^^^X||DOE\r")
    assert search.patient_identifier(msg) == "MRN1"
    assert search.patient_identifier(er7.parse("MSH|^~\\&|LAB|GH|||20261121||ADT^A01|C2|P|2.5\r")) is None


def test_search_key_is_keyed_stable_and_never_the_identifier(monkeypatch):
    a = search.search_key("MRN1", KEY)
    assert a == search.search_key(" MRN1 ", KEY) and "MRN1" not in a
    assert a != search.search_key("MRN1", b"j" * 40) and a != search.search_key("MRN2", KEY)
    monkeypatch.delenv("COURIER_PSEUDONYM_KEY", raising=False)
    assert search.search_key("MRN1") is None  # no key: no unkeyed hash of an MRN


@pytest.mark.parametrize("seconds, shown", [(None, "-"), (0, "0s"), (59, "59s"), (61, "1m 1s"), (3720, "1h 2m"),
                                            (90000, "1d 1h")])
def test_age(seconds, shown):
    assert console.age(seconds) == shown


@pytest.mark.parametrize("target, expected", [
    ("/console/messages?x=1", "/console/messages?x=1"), ("//evil.example/", "/console/"),
    ("https://evil.example/console/", "/console/"), ("/console/\\evil", "/console/"), ("", "/console/"),
    ("/api/v1/messages", "/console/")])
def test_login_redirects_only_within_the_console(target, expected):
    app = Flask(__name__)
    app.register_blueprint(console.bp)
    with app.test_request_context():
        assert console._safe_next(target) == expected


def test_the_view_scope_reads_but_never_sees_bodies_or_acts():
    view, operate = ApiToken(scope="view"), ApiToken(scope="operate")
    assert "view" in tokens.SCOPES
    assert tokens.allows(view, "read")
    assert not any(tokens.allows(view, a) for a in ("body", "replay", "admin", "ingest"))
    assert tokens.allows(operate, "body") and not tokens.allows(operate, "admin")
    assert tokens.allows(ApiToken(scope="admin"), "body")


def test_alert_thresholds_from_the_environment():
    limits = alerts.thresholds({"COURIER_ALERT_BACKLOG": "5", "COURIER_ALERT_OLDEST": "2m"})
    assert limits["backlog"] == 5 and limits["oldest_open"] == 120 and limits["window"] == 900
    with pytest.raises(ValueError, match="COURIER_ALERT_ERROR_RATE"):
        alerts.thresholds({"COURIER_ALERT_ERROR_RATE": "lots"})
    assert alerts.webhook_url({"COURIER_ALERT_WEBHOOK": "  "}) is None


def test_every_template_and_asset_is_in_the_package_data():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["courier.app.web"].split(",")]
    web = ROOT / "app" / "web"
    files = {p.relative_to(web).as_posix() for p in (web / "templates").rglob("*") if p.is_file()} | {
        p.relative_to(web).as_posix() for p in (web / "static").rglob("*") if p.is_file()}
    assert files and all(any(Path(f).match(g) for g in globs) for f in files), files


def test_no_template_has_inline_script_or_style():
    # The CSP allows neither: an inline one would silently not run in the browser.
    for page in (ROOT / "app" / "web" / "templates" / "console").glob("*.html"):
        html = page.read_text()
        assert "<style" not in html and " style=" not in html and " on" + "click=" not in html, page
        assert all("src=" in tag for tag in html.split("<script")[1:]), page


def test_the_alert_task_joins_the_beat_schedule_and_routes_that_retention_set(monkeypatch):
    from celery import Celery
    from kombu import Queue

    from courier.tasks import alerts as alert_task

    monkeypatch.setenv("COURIER_ALERT_INTERVAL", "30s")
    celery = Celery("t", set_as_current=False)
    celery.conf.task_queues = [Queue("p.housekeeping")]
    celery.conf.task_routes = {"courier.purge": {"queue": "p.housekeeping"}}
    celery.conf.beat_schedule = {"courier-retention": {"task": "courier.purge", "schedule": 3600}}
    alert_task.configure(celery, type("S", (), {"queue_prefix": "p"})())
    assert [q.name for q in celery.conf.task_queues] == ["p.housekeeping"]
    assert celery.conf.task_routes == {"courier.purge": {"queue": "p.housekeeping"},
                                       "courier.alerts": {"queue": "p.housekeeping"}}
    assert celery.conf.beat_schedule["courier-alerts"] == {"task": "courier.alerts", "schedule": 30.0}
    assert "courier-retention" in celery.conf.beat_schedule


def test_indexing_never_fails_an_ingest_on_a_bad_key(monkeypatch):
    class Session:
        def execute(self, statement):
            raise AssertionError("nothing is written without a usable key")

    monkeypatch.setenv("COURIER_PSEUDONYM_KEY", "short")
    search.index_patient(Session(), type("M", (), {"id": "m1"})(), True, {"data": {"patient": "P1"}})
    monkeypatch.delenv("COURIER_PSEUDONYM_KEY")
    search.index_patient(Session(), type("M", (), {"id": "m1"})(), True, {"data": {"patient": "P1"}})
    monkeypatch.setenv("COURIER_PSEUDONYM_KEY", "k" * 40)
    search.index_patient(Session(), type("M", (), {"id": "m1"})(), False, {"data": {"patient": "P1"}})  # duplicate


def test_the_console_on_a_sqlite_store(tmp_path, monkeypatch):
    """`make run`'s default store is SQLite: log in, the dashboard's hourly counts, a search by a rare delivery
    status (a MATERIALIZED CTE), a message's detail, a replay and the alert check, all on SQLite."""
    import re

    from alembic import command

    from courier.app import create_app
    from courier.app.store import alerts as alert_rules
    from courier.app.store import outbox
    from courier.app.store.db import Store
    from courier.app.store.models import Delivery
    from courier.app.store.schema import alembic_config
    from tests.support.config import settings_for, write_config

    monkeypatch.setenv("COURIER_PSEUDONYM_KEY", "k" * 40)
    url = f"sqlite:///{tmp_path}/courier.db"
    command.upgrade(alembic_config(url), "head")
    config = write_config(tmp_path / "courier.yml", {"billing": "http://127.0.0.1:9/b", "erp": f"file://{tmp_path}"})
    app = create_app(settings_for(config, url, "unused"), {"TESTING": True})
    store: Store = app.extensions["courier.store"]
    with store.session() as s:
        _, ingest = tokens.create(s, scope="ingest", source="lab")
        _, operate = tokens.create(s, scope="operate", source=None, name="ops")
    client = app.test_client()
    r = client.post("/api/v1/messages", headers={"Authorization": f"Bearer {ingest}"},
                    content_type="application/hl7-v2",
                    data="MSH|^~\\&|LAB|GH|||20261121||ADT^A01|SQ1|P|2.5\rPID|1||MRN5^^^GH^MR||DOE^ANN\r")
    assert r.status_code == 202, r.get_json()
    message_id = r.get_json()["id"]
    billing = next(d["id"] for d in r.get_json()["deliveries"] if d["destination"] == "billing")
    with store.session() as s:
        s.get(Delivery, billing).status = "dead"
        s.get(Delivery, billing).last_error = "HTTP 400"
    login = client.get("/console/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', login).group(1)
    assert client.post("/console/login", data={"token": operate, "csrf": csrf}).status_code == 303
    dashboard = client.get("/console/").get_data(as_text=True)
    assert re.search(r'data-destination="billing">.*?1 / 1.*?class="bar-dead"', dashboard, re.S)
    for query in ("delivery_status=dead", "patient=MRN5", "idempotency_key=SQ1", "destination=erp"):
        page = client.get(f"/console/messages?{query}").get_data(as_text=True)
        assert f'href="/console/messages/{message_id}"' in page, query
    assert "Patient Name" in client.get(f"/console/messages/{message_id}").get_data(as_text=True)
    session_csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/dead").get_data(as_text=True))
    client.post("/console/dead/replay", data={"csrf": session_csrf.group(1), "ids": billing})
    with store.session() as s:
        assert s.get(Delivery, billing).status == "pending"
        assert alert_rules.evaluate(s, app.extensions["courier.settings"]) == []
        assert outbox.destination_summary(s)["billing"]["backlog"] == 1
    store.dispose()
