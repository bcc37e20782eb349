"""Per-source rate limits (courier.app.store.ratelimit): the GCRA's exact counts, the config checks, the HTTP
429 with Retry-After, and one limit shared by real gunicorn workers and a real MLLP listener.

Limits here are per minute or per hour, so nothing depends on how fast the tests run: the
GCRA unit tests pass the clock in, and the others never wait long enough to earn a message back.
"""
from __future__ import annotations

import http.client
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from sqlalchemy import func, select, text

from courier.app import create_app
from courier.app.store import ratelimit, tokens
from courier.app.store.models import Message
from courier.app.settings import ConfigError, RateLimit
from courier.app.config import load_routing
from tests.support.config import settings_for, write_config
from tests.support.mllp_peers import Client
from tests.support.processes import VENV_BIN, running_courier
from tests.integration.test_metrics import http_get, parse, total, value, web_and_mllp

T0 = 1_800_000_000.0  # a fixed "now" in seconds since the epoch for the GCRA unit tests


def adt(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20261121100000||ADT^A01|{control_id}|P|2.5\r"
            "PID|1||12345\r").encode()


@pytest.fixture(autouse=True)
def no_limit_rows(pg_url):
    """conftest's store fixture truncates its own tables; the rate-limit rows are ours to clear."""
    yield
    from courier.app.store.db import Store

    s = Store(pg_url)
    with s.engine.begin() as conn:
        conn.execute(text("DELETE FROM courier_rate_limits"))
    s.dispose()


def stored(store, source: str) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Message).where(Message.source == source))


# --- the algorithm, on both stores ----------------------------------------------------------

@pytest.fixture(params=["postgresql", "sqlite"])
def any_store(request):
    return request.getfixturevalue("store" if request.param == "postgresql" else "sqlite_store")


def test_gcra_lets_the_burst_in_then_one_per_interval(any_store):
    limit = RateLimit(count=5, period=60.0, burst=5)  # one message every 12 s, 5 at once
    assert [ratelimit.take(any_store, "lab", limit, now=T0) for _ in range(5)] == [None] * 5
    assert ratelimit.take(any_store, "lab", limit, now=T0) == 12
    # A refusal changes nothing: asking again early gets the same answer, not a later one.
    assert ratelimit.take(any_store, "lab", limit, now=T0 + 0.5) == 12  # 11.5 s, rounded up to whole seconds
    assert ratelimit.take(any_store, "lab", limit, now=T0 + 11.9) == 1  # never 0
    assert ratelimit.take(any_store, "other", limit, now=T0) is None  # each source has its own allowance
    assert ratelimit.take(any_store, "lab", limit, now=T0 + 12) is None  # one message earned back
    assert ratelimit.take(any_store, "lab", limit, now=T0 + 12) == 12


def test_gcra_counts_a_batch_as_its_messages_and_refills_to_the_burst_only(any_store):
    limit = RateLimit(count=5, period=60.0, burst=5)
    assert ratelimit.take(any_store, "lab", limit, 3, now=T0) is None
    assert ratelimit.take(any_store, "lab", limit, 3, now=T0) == 12  # 2 left: 3 need one more interval
    assert ratelimit.take(any_store, "lab", limit, 2, now=T0) is None
    # An hour idle earns the burst back, not an hour's worth.
    assert ratelimit.take(any_store, "lab", limit, 5, now=T0 + 3600) is None
    assert ratelimit.take(any_store, "lab", limit, 1, now=T0 + 3600) == 12
    with pytest.raises(ValueError, match="burst of 5"):
        ratelimit.take(any_store, "lab", limit, 6, now=T0)


def test_charge_skips_the_flush_wait_only_for_itself(pg_url):
    """synchronous_commit off is the charge's alone: the next transaction on the same pooled
    connection (an ingest's) must still wait for its commit to be durable."""
    from courier.app.store.db import Store

    one = Store(pg_url, pool_size=1, max_overflow=0)  # one connection: the ingest gets the charge's
    try:
        assert ratelimit.take(one, "lab", RateLimit(10, 60.0, 10)) is None
        with one.session() as session:
            assert session.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
    finally:
        one.dispose()


def test_store_down_during_the_check_is_503(tmp_path):
    from courier.app.store.db import Store
    from courier.app.ingest import IngestError, ingest

    _, routing = routing_with(tmp_path, {"rate_limit": "10/min"})
    down = Store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    with pytest.raises(IngestError) as err:
        ingest(down, routing, source="lab", content_type="application/json",
               body=b'{"type": "lab.result", "data": {}}')
    assert err.value.status == 503 and "rate limit" in err.value.message
    down.dispose()


def test_gcra_on_the_stores_clock(any_store):
    limit = RateLimit(count=1, period=3600.0, burst=1)
    assert ratelimit.take(any_store, "lab", limit) is None
    wait = ratelimit.take(any_store, "lab", limit)
    assert wait is not None and 3000 < wait <= 3600  # an hour less the moments this test took


# --- configuration ---------------------------------------------------------------------------

def routing_with(tmp_path, lab: dict):
    path = write_config(tmp_path / "courier.yml", {"billing": "http://127.0.0.1:9/billing"})
    doc = yaml.safe_load(path.read_text())
    doc["sources"]["lab"].update(lab)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, load_routing(path, {})


def test_config_reads_rates_and_defaults_burst_to_the_count(tmp_path):
    _, routing = routing_with(tmp_path, {"rate_limit": "600/min"})
    assert routing.sources["lab"].rate_limit == RateLimit(600, 60.0, 600)
    assert routing.sources["other"].rate_limit is None  # off unless set
    _, routing = routing_with(tmp_path, {"rate_limit": "30 / 10s", "burst": 3})
    assert routing.sources["lab"].rate_limit == RateLimit(30, 10.0, 3)
    assert routing.sources["lab"].rate_limit.interval == pytest.approx(1 / 3)
    for text_, expected in (("100/s", (100, 1.0)), ("5000/hour", (5000, 3600.0)), ("2/day", (2, 86400.0))):
        _, routing = routing_with(tmp_path, {"rate_limit": text_})
        limit = routing.sources["lab"].rate_limit
        assert (limit.count, limit.period) == expected


@pytest.mark.parametrize("lab, key, message", [
    ({"rate_limit": "lots"}, "rate_limit", "not a rate: 'lots' (use COUNT/PERIOD, e.g. 100/s, 600/min, 5000/h)"),
    ({"rate_limit": "0/min"}, "rate_limit", "not a rate: '0/min': count and period must be above zero"),
    ({"rate_limit": "5/fortnight"}, "rate_limit", "period 'fortnight' is not s, min, h, day or a duration"),
    ({"rate_limit": 100}, "rate_limit", "not a rate: 100"),
    ({"burst": 10}, "burst", "burst needs rate_limit (e.g. rate_limit: 600/min)"),
    ({"rate_limit": "10/s", "burst": 0}, "burst", "Must be greater than or equal to 1"),
])
def test_config_errors_name_the_line(tmp_path, lab, key, message):
    with pytest.raises(ConfigError) as err:
        routing_with(tmp_path, lab)
    path = tmp_path / "courier.yml"
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if row.strip().startswith(key + ":"))
    [problem] = err.value.problems
    assert problem.startswith(f"{path}:{line}: sources.lab.{key}: ") and message in problem, problem


# --- HTTP, in process ---------------------------------------------------------------------

@pytest.fixture
def limited(tmp_path, store, queue_prefix):
    """A test client whose source `lab` may send 3 messages an hour, all at once; `other` is unlimited."""
    path, _ = routing_with(tmp_path, {"rate_limit": "3/h"})
    flask_app = create_app(settings_for(path, store.url, queue_prefix), {"TESTING": True})
    flask_app.extensions["courier.store"].dispose()
    flask_app.extensions["courier.store"] = store
    return flask_app.test_client()


def post(client, headers, n: int):
    return client.post("/api/v1/messages", headers=headers, content_type="application/json",
                       data=json.dumps({"type": "lab.result", "id": f"r-{n}", "data": {"n": n}}))


def test_http_429_with_retry_after_and_nothing_stored(limited, make_token, store):
    lab, other = make_token(source="lab"), make_token(source="other")
    before = total(parse(limited.get("/metrics").get_data(as_text=True)), "courier_rate_limited_total",
                   source="lab")
    batch = b"".join(adt(f"b-{i}") for i in range(2))  # an HL7 batch of 2 costs 2
    assert limited.post("/api/v1/messages", headers=lab, content_type="application/hl7-v2",
                        data=batch).status_code == 202
    assert post(limited, lab, 1).status_code == 202
    refused = post(limited, lab, 2)
    assert refused.status_code == 429
    err = refused.get_json()["error"]
    assert set(err) == {"code", "message", "details"} and err["code"] == "rate_limited"
    assert err["details"]["retry_after"] == int(refused.headers["Retry-After"])
    assert 1000 < err["details"]["retry_after"] <= 1200  # one message is earned back every 20 minutes
    assert "source 'lab' sent more than 3 per hour (burst 3)" in err["message"]
    assert f"retry after {err['details']['retry_after']} s" in err["message"]
    assert stored(store, "lab") == 3  # the refused one was not stored
    # The other source is not limited by lab's traffic.
    assert [post(limited, other, n).status_code for n in range(5)] == [202] * 5
    after = parse(limited.get("/metrics").get_data(as_text=True))
    assert total(after, "courier_rate_limited_total", source="lab") == before + 1
    assert value(after, "courier_rate_limited_total", source="other") == 0


def test_batch_larger_than_the_burst_is_413_not_429(limited, make_token, store):
    batch = b"".join(adt(f"big-{i}") for i in range(4))
    r = limited.post("/api/v1/messages", headers=make_token(), content_type="application/hl7-v2", data=batch)
    assert r.status_code == 413 and "Retry-After" not in r.headers
    assert r.get_json()["error"]["details"] == {"messages": 4, "burst": 3}
    assert stored(store, "lab") == 0
    assert post(limited, make_token(), 1).status_code == 202  # it cost nothing


# --- across processes: gunicorn workers and the MLLP listener share one limit ---------------------

def test_one_limit_across_gunicorn_workers_and_the_mllp_listener(tmp_path, store, queue_prefix):
    """6 an hour for `lab`: 2 over HTTP and 2 over MLLP use 4; of a flood of 10 on both at once
    exactly 2 get in; then both refuse. The web and the listener are separate processes."""
    burst, flood = 6, 5
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with running_courier(tmp_path, store, queue_prefix, {"erp": f"file://{tmp_path}/erp"},
                         env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                              "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}) as c:
        doc = yaml.safe_load(c.config.read_text())
        doc["sources"]["lab"].update({"mllp_allow": ["127.0.0.1/32"], "rate_limit": f"{burst}/h"})
        c.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        with store.session() as s:
            _, other_token = tokens.create(s, scope="ingest", source="other")
        with web_and_mllp(c, tmp_path) as (port, mllp_port):
            def over_http(i: int) -> tuple[int, str | None]:
                return http_post(port, c.headers, {"type": "lab.result", "id": f"h-{i}", "data": {}})

            def over_mllp(i: int) -> str:
                with Client(mllp_port) as client:
                    ack = client.exchange(adt(f"m-{i}")).decode()
                code = ack.split("MSA|", 1)[1][:2]
                assert code == "AA" or (code == "AE" and "retry after" in ack), ack
                return code

            assert [over_http(i)[0] for i in range(2)] == [202, 202]
            assert [over_mllp(i) for i in range(2)] == ["AA", "AA"]
            with ThreadPoolExecutor(2 * flood) as pool:  # every request on its own connection, at once
                http_futures = [pool.submit(over_http, i) for i in range(2, 2 + flood)]
                mllp_futures = [pool.submit(over_mllp, i) for i in range(2, 2 + flood)]
                answers = [f.result() for f in http_futures]
                codes = [f.result() for f in mllp_futures]
            statuses = [status for status, _ in answers]
            assert set(statuses) <= {202, 429}, answers
            assert statuses.count(202) + codes.count("AA") == burst - 4, (answers, codes, c.procs.logs())
            refused_http = over_http(99)
            assert refused_http[0] == 429 and 500 < int(refused_http[1]) <= 600, refused_http  # 1 per 10 min
            assert all(1 <= int(retry) <= 600 for status, retry in answers if status == 429), answers
            assert over_mllp(99) == "AE"
            assert stored(store, "lab") == burst
            # The other source is not held back by lab's limit.
            other = {"Authorization": f"Bearer {other_token}"}
            assert [http_post(port, other, {"type": "x", "id": f"o-{i}", "data": {}})[0]
                    for i in range(3)] == [202] * 3
            m = parse(http_get(port, "/metrics")[2])  # summed over the web workers and the listener
            assert value(m, "courier_rate_limited_total", source="lab") == 2 * flood + 2 - (burst - 4)
            print(f"\nflood: HTTP {statuses}; MLLP {codes}")


def http_post(port: int, headers: dict, doc: dict) -> tuple[int, str | None]:
    """POST one event on a new connection; (status, Retry-After)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/api/v1/messages", body=json.dumps(doc),
                     headers={**headers, "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("Retry-After")
    finally:
        conn.close()

