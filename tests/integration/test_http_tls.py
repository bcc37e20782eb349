"""End to end over mutual TLS: a routing file's `tls` block -> the worker's run_batch -> the HTTPS
server of tests/unit/test_http_tls.py, with the message stored in PostgreSQL."""
from __future__ import annotations

import pytest

from courier.app import create_app
from courier.app.store import outbox
from courier.tasks.deliver import run_batch
from tests.support.config import settings_for, write_config
from tests.support.tls_ca import ThrowawayCA
from tests.unit.test_http_tls import BODY, MutualTlsServer

pytestmark = pytest.mark.postgres


@pytest.fixture
def ca(tmp_path):
    return ThrowawayCA(tmp_path / "ca")


@pytest.fixture
def server(ca):
    with MutualTlsServer(ca.server(), ca.cert) as s:
        yield s


def test_run_batch_delivers_over_mutual_tls_from_the_config(tmp_path, ca, server, store, queue_prefix, make_token):
    client_cert = ca.client("courier-worker")
    cfg = write_config(tmp_path / "courier.yml", {"billing": server.url},
                       tls={"ca": str(ca.cert), "cert": str(client_cert.cert), "key": str(client_cert.key)})
    flask_app = create_app(settings_for(cfg, store.url, queue_prefix), {"TESTING": True})
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    r = flask_app.test_client().post("/api/v1/messages", data=BODY, content_type="application/json",
                                     headers=make_token())
    assert r.status_code == 202, r.get_json()
    with store.session() as s:
        claimed = outbox.claim_due(s, lease=60, limit=10)
    statuses = run_batch(flask_app.extensions["courier.settings"], store, [(c.delivery_id, c.dispatch) for c in claimed])
    assert list(statuses.values()) == ["delivered"], statuses
    assert [cn for _, cn in server.received] == ["courier-worker"]
