"""JSON logs with one correlation id from the API through the worker to the destination, and
Sentry events (received by a local stand-in for Sentry) that carry the error but no PHI."""
from __future__ import annotations

import gzip
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from courier.app import create_app, observability
from courier.app.store import outbox, tokens
from courier.app.store.models import Message
from tests.support.config import settings_for, write_config
from tests.support.sinks import HttpSink

PATIENT, MRN, SEGMENT = "ZZTESTPATIENT^JANE", "MRN-0042-XYZ", "PID|1||MRN-0042-XYZ^^^HOSP||ZZTESTPATIENT^JANE"
SECRETS = ("ZZTESTPATIENT", MRN, "PID|1")
BODY = json.dumps({"type": "service.completed", "id": "svc-obs-1",
                   "data": {"patient": {"name": PATIENT, "mrn": MRN}, "segment": SEGMENT}})


class Lines(logging.Handler):
    """Root handler keeping each record as the JSON line production would write."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(observability.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def lines():
    handler, root = Lines(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
def courier(tmp_path, store, queue_prefix):
    with HttpSink() as sink:
        cfg = write_config(tmp_path / "courier.yml", {"billing": sink.url})
        flask_app = create_app(settings_for(cfg, store.url, queue_prefix))
        with store.session() as s:
            _, token = tokens.create(s, scope="ingest", source="lab")
        yield flask_app, sink, {"Authorization": f"Bearer {token}"}
        flask_app.extensions["courier.store"].dispose()


def deliver_due(flask_app, store):
    """What the relay and a worker do, in-process (as in tests/integration/test_worker.py)."""
    from courier.tasks.celery_app import celery_init_app
    from courier.tasks.deliver import deliver

    celery_init_app(flask_app)
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10)
    assert claimed
    with flask_app.app_context():
        return {c.delivery_id: deliver.run(c.destination, [[c.delivery_id, c.dispatch]])[c.delivery_id]
                for c in claimed}


def test_one_correlation_id_from_the_request_through_the_worker_to_the_destination(courier, store, lines):
    flask_app, sink, headers = courier
    cid = "corr-obs-7f3a"
    r = flask_app.test_client().post("/api/v1/messages", data=BODY, content_type="application/json",
                                     headers={**headers, "X-Correlation-ID": cid})
    assert r.status_code == 202, r.get_json()
    assert r.headers["X-Correlation-ID"] == cid
    assert set(deliver_due(flask_app, store).values()) == {"delivered"}

    assert sink.received[0].headers["x-correlation-id"] == cid  # the destination's request
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message", "process", "correlation_id"} <= d.keys() for d in docs)
    web = [d for d in docs if d["logger"] == "courier.web" and d["correlation_id"] == cid]
    worker = [d for d in docs if d["logger"] == "courier.deliver" and d["correlation_id"] == cid]
    assert web and web[0]["path"] == "/api/v1/messages" and web[0]["status"] == 202, docs
    assert worker and worker[0]["destination"] == "billing" and worker[0]["message_id"] == r.get_json()["id"], docs
    for line in lines:  # no PHI in any line
        assert not any(secret in line for secret in SECRETS), line


def test_a_made_up_correlation_id_is_stored_with_the_message_and_echoed(courier, store, lines):
    flask_app, sink, headers = courier
    r = flask_app.test_client().post("/api/v1/messages", data=BODY, content_type="application/json",
                                     headers={**headers, "X-Correlation-ID": "bad id with spaces"})
    assert r.status_code == 202
    cid = r.headers["X-Correlation-ID"]
    assert cid != "bad id with spaces"
    with store.session() as s:
        assert s.get(Message, r.get_json()["id"]).correlation_id == cid
    deliver_due(flask_app, store)
    assert sink.received[0].headers["x-correlation-id"] == cid
    assert any(json.loads(line)["correlation_id"] == cid and json.loads(line)["logger"] == "courier.deliver"
               for line in lines)


def test_text_format_for_development_still_carries_the_correlation_id():
    formatter = observability._TextFormatter("%(courier_process)s [%(courier_cid)s] %(message)s")
    with observability.correlation("c-1"):
        record = logging.LogRecord("x", logging.INFO, "f", 1, "hello %s", ("world",), None)
        assert formatter.format(record).endswith("[c-1] hello world")


def test_each_mllp_frame_gets_its_own_correlation_id_and_the_previous_one_comes_back():
    seen = []
    process = observability.with_new_correlation(lambda: seen.append(observability.current_correlation_id()))
    with observability.correlation("outer"):
        process()
        process()
        assert observability.current_correlation_id() == "outer"
    assert len(set(seen)) == 2 and "outer" not in seen


def test_scrub_keeps_templates_and_ids_and_drops_values():
    event = {"level": "error", "logentry": {"message": "bad %s", "params": [PATIENT]}, "message": f"bad {PATIENT}",
             "extra": {"delivery_id": "d1", "body": BODY, "celery-job": {"task_name": "courier.deliver",
                                                                         "args": [SEGMENT]}},
             "request": {"method": "POST", "url": f"http://x/api/v1/messages?mrn={MRN}", "data": BODY,
                         "headers": {"Authorization": "Bearer t"}, "cookies": "c"},
             "user": {"ip_address": "10.0.0.1"}, "contexts": {"runtime": {"name": "CPython"}, "flask": {"b": BODY}},
             "breadcrumbs": {"values": [{"category": "query", "message": "SELECT :p", "data": {"params": MRN}},
                                        {"category": "somelib", "message": f"got {PATIENT}"}]}}
    out = observability.scrub_event(event)
    assert out["logentry"] == {"message": "bad %s"} and out["extra"] == {"delivery_id": "d1",
                                                                         "task_name": "courier.deliver"}
    assert out["request"] == {"method": "POST", "url": "http://x/api/v1/messages"} and "user" not in out
    assert out["contexts"] == {"runtime": {"name": "CPython"}}
    assert not any(secret in json.dumps(out) for secret in SECRETS), out


# --- Sentry ---------------------------------------------------------------------------------

class SentryStandIn:
    """An HTTP server taking Sentry envelopes (gzip, brotli or plain) and keeping their items."""

    def __init__(self):
        self.items: list[dict] = []
        self.raw: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    data = gzip.decompress(data)
                elif encoding == "br":
                    import brotli
                    data = brotli.decompress(data)
                outer.raw.append(data)
                lines = data.split(b"\n")
                for i in range(1, len(lines) - 1, 2):  # envelope header, then (item header, payload) pairs
                    header = json.loads(lines[i])
                    if header.get("type") in ("event", "transaction"):
                        outer.items.append(json.loads(lines[i + 1]))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sentry():
    import sentry_sdk

    stand_in = SentryStandIn()
    yield stand_in
    sentry_sdk.flush(timeout=5)
    sentry_sdk.init()  # no DSN: a client that sends nothing, for the tests that follow
    observability._sentry_dsn = None
    stand_in.close()


def test_sentry_gets_the_errors_but_no_body_segment_phi_or_local_variable(tmp_path, store, queue_prefix,
                                                                        sentry, monkeypatch, lines):
    import sentry_sdk

    from courier.tasks import deliver as deliver_module

    with HttpSink() as sink:
        cfg = write_config(tmp_path / "courier.yml", {"billing": sink.url})
        flask_app = create_app(settings_for(cfg, store.url, queue_prefix, sentry_dsn=sentry.dsn))
        with store.session() as s:
            _, token = tokens.create(s, scope="ingest", source="lab")
        headers = {"Authorization": f"Bearer {token}", "X-Correlation-ID": "corr-sentry-1"}
        client = flask_app.test_client()

        # 1. The web: a bug in ingest whose message and locals hold the body; a library logs the segment first.
        def buggy_ingest(store_, routing, *, body, **kw):
            segment = json.loads(body)["data"]["segment"]
            logging.getLogger("somelib").warning("parsing %s", segment)  # becomes a breadcrumb
            raise ValueError(f"cannot parse patient {PATIENT} ({MRN}): {segment}")

        monkeypatch.setattr("courier.app.web.api.ingest", buggy_ingest)
        r = client.post("/api/v1/messages", data=BODY, content_type="application/json", headers=headers)
        assert r.status_code == 500
        monkeypatch.undo()

        # 2. The worker: an adapter bug whose exception carries the body, logged with log.exception.
        r = client.post("/api/v1/messages", data=BODY, content_type="application/json", headers=headers)
        assert r.status_code == 202

        class BuggyAdapter:
            def send(self, out):
                raise RuntimeError(f"adapter bug on {out.body.decode()}")

        monkeypatch.setattr(deliver_module, "adapter_for", lambda destination: BuggyAdapter())
        assert set(deliver_due(flask_app, store).values()) == {"retrying"}
        sentry_sdk.flush(timeout=10)
        flask_app.extensions["courier.store"].dispose()

    events = sentry.items
    types = [v["type"] for e in events for v in (e.get("exception") or {}).get("values", [])]
    assert "ValueError" in types and "RuntimeError" in types, events
    assert all(e.get("tags", {}).get("correlation_id") == "corr-sentry-1" for e in events), events
    web = next(e for e in events if "ValueError" in json.dumps(e.get("exception")))
    assert web["request"]["url"].endswith("/api/v1/messages") and "data" not in web["request"]
    everything = b"\n".join(sentry.raw).decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in everything, secret
    assert '"vars"' not in everything  # no local variables anywhere
    # The same errors in the logs: the traceback's frames, the exception's type, not its message.
    logged = [json.loads(line) for line in lines if json.loads(line).get("exc_type")]
    assert {d["exc_type"] for d in logged} >= {"ValueError", "RuntimeError"}
    assert all("[message not logged]" in d["exc"] and "buggy_ingest" in "".join(x["exc"] for x in logged)
               for d in logged)
    for line in lines:  # (the test's own "somelib" logs the segment on purpose, for the breadcrumb)
        assert json.loads(line)["logger"] == "somelib" or not any(secret in line for secret in SECRETS), line
