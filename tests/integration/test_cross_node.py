"""Issue 21: Courier's guarantees hold across several Courier nodes (docs/scaling.md, "Several Courier nodes").

A node here is one full set of Courier's OS processes as the Procfile runs them: gunicorn (web), `courier relay`,
a Celery worker and `courier mllp`, on ports of its own (tests/support/nodes.py). Two nodes, A and B, share what
production nodes share: one PostgreSQL database (a scratch one), the RabbitMQ broker, one routing file and one
queue prefix. They are started once for the module; each test uses destinations and sources of its own.

- Idempotency: one Idempotency-Key sent to A's web, then to B's, is one message (202, then a 200 duplicate with
  the same id) delivered once; the same with many keys sent to both nodes at the same instant.
- MLLP: one MSH-10 sent to A's listener and to B's is one message (both AA, B's a duplicate), delivered once.
- Per-key order: messages of two keys posted alternately to A and B arrive at a flaky, slow destination in the
  order they were accepted, while both nodes' relays and workers run (and both workers send some).
- Circuit breaker: a destination that is down, both nodes' workers sending to it: after the breaker opens,
  each half-open window lets exactly one probe through across both nodes; when it is back, every delivery is
  made once.
- Rate limit: both webs flooded at once accept about the limit in total (burst + rate x time), not twice it.

The store-level mechanisms under each are tested on one node elsewhere (test_outbox.py, test_ordering.py,
test_circuits.py, test_rate_limit.py, test_mllp_listener.py); here they are checked end to end, through
what the destinations received and what the store says.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import yaml
from alembic import command
from sqlalchemy import func, select

from courier.app.store import tokens
from courier.app.store.db import Store
from courier.app.store.models import Attempt, Circuit, Delivery, Message
from courier.app.store.schema import alembic_config
from tests.support.mllp_peers import Client
from tests.support.nodes import Node, delete_queues
from tests.support.services import BROKER_URL, fresh_database
from tests.support.sinks import HttpSink

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.slow]

DESTINATIONS = ("idem", "ordered", "down")
RATE, BURST = 20, 20  # source `limited`: 20 a second, 20 at once
OPEN_FOR = 2.0  # destination `down`'s breaker: open for 2 s after each trip (max_open_for keeps it at 2 s)


def routing(sinks: dict[str, HttpSink]) -> dict:
    """One routing file for every test: each has its own destination (and `limited` its own source)."""
    quick_retry = {"max_attempts": 20, "initial": "100ms", "max": "500ms"}
    return {
        "sources": {"lab": {"mllp_allow": ["127.0.0.1/32"]},
                    "limited": {"rate_limit": f"{RATE}/s", "burst": BURST}},  # no route: stored as unrouted
        "destinations": {
            "idem": {"url": sinks["idem"].url, "clearance": "phi", "timeout": "2s", "retry": quick_retry},
            # The breaker left out of the way (failures are spread, never 50 in a row): this test is about order.
            "ordered": {"url": sinks["ordered"].url, "clearance": "phi", "timeout": "2s", "retry": quick_retry,
                        "ordered_by": "data.patient_id", "circuit": {"failure_threshold": 50}},
            "down": {"url": sinks["down"].url, "clearance": "phi", "timeout": "2s",
                     "retry": {"max_attempts": 100, "initial": "100ms", "max": "500ms"},
                     "circuit": {"failure_threshold": 3, "open_for": f"{OPEN_FOR:g}s",
                                 "max_open_for": f"{OPEN_FOR:g}s"}},
        },
        "routes": [{"match": {"source": "lab", "type": "idem.*"}, "to": ["idem"]},
                   {"match": {"source": "lab", "type": "HL7v2:*"}, "to": ["idem"]},
                   {"match": {"source": "lab", "type": "patient.*"}, "to": ["ordered"]},
                   {"match": {"source": "lab", "type": "down.*"}, "to": ["down"]}],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Nodes A and B on one scratch database, the broker and one routing file; the destinations' sinks."""
    tmp = tmp_path_factory.mktemp("cross-node")
    prefix = f"courier-xnode-{secrets.token_hex(4)}"  # this run's queues: parallel runs never share a task
    with ExitStack() as stack:
        sinks = {name: stack.enter_context(HttpSink()) for name in DESTINATIONS}
        url = stack.enter_context(fresh_database("courier_xnode"))
        command.upgrade(alembic_config(url), "head")
        store = Store(url)
        stack.callback(store.dispose)
        config = tmp / "courier.yml"
        config.write_text(yaml.safe_dump(routing(sinks), sort_keys=False))
        with store.session() as session:
            _, lab = tokens.create(session, scope="ingest", source="lab")
            _, limited = tokens.create(session, scope="ingest", source="limited")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("COURIER_")},
               "DATABASE_URL": url, "BROKER_URL": BROKER_URL, "COURIER_CONFIG": str(config),
               "COURIER_QUEUE_PREFIX": prefix, "PYTHONUNBUFFERED": "1",
               # A short lease as in the other real-process tests; a short poll so that a key's next delivery
               # and a retry that fell due are claimed quickly (the per-key test sends one at a time).
               "COURIER_RELAY_LEASE": "5s", "COURIER_RELAY_POLL": "200ms",
               # One delivery per task: what one relay claims is spread over both nodes' workers, so the
               # breaker's half-open probe is contended by both nodes, not decided inside one batch.
               "COURIER_RELAY_TASK_SIZE": "1"}
        nodes = [Node(name, env, tmp / name) for name in ("a", "b")]
        stack.callback(delete_queues, BROKER_URL, prefix, DESTINATIONS)
        for node in nodes:
            stack.callback(node.stop)
            node.start()
        for node in nodes:
            node.wait_ready()
        yield SimpleNamespace(nodes=nodes, store=store, sinks=sinks,
                              lab={"Authorization": f"Bearer {lab}"},
                              limited={"Authorization": f"Bearer {limited}"},
                              logs=lambda: "\n".join(node.logs() for node in nodes))


@pytest.fixture
def c(cluster):
    """The cluster, checked after each test: every process of both nodes still runs."""
    yield cluster
    for node in cluster.nodes:
        assert node.running() == list(node.procs), f"node {node.name}: a process exited\n{cluster.logs()}"


def wait_for(predicate, what: str, c, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} within {timeout:g}s\n{c.logs()}"
        time.sleep(0.1)
    return value


def messages_with(store, source: str, dedup_keys) -> Counter:
    """How many stored messages of `source` carry each of `dedup_keys` (their Idempotency-Key)."""
    with store.session() as s:
        rows = s.scalars(select(Message.dedup_key).where(Message.source == source,
                                                         Message.dedup_key.in_(list(dedup_keys))))
        return Counter(rows)


def all_delivered(store, message_ids) -> list[Delivery] | None:
    """The deliveries of these messages once every one is delivered, else None."""
    with store.session() as s:
        rows = list(s.scalars(select(Delivery).where(Delivery.message_id.in_(list(message_ids)))))
    return rows if rows and all(d.status == "delivered" for d in rows) else None


# --- idempotency -------------------------------------------------------------------------------------

def test_one_idempotency_key_sent_to_both_nodes_is_one_message_delivered_once(c):
    a, b = c.nodes
    sink = c.sinks["idem"]
    # No envelope id: the Idempotency-Key header is the only thing that makes the two posts one message.
    doc = {"type": "idem.created", "data": {"case": "sequential"}}
    headers = {**c.lab, "Idempotency-Key": "xnode-seq-1"}
    status, first, _ = a.post(headers, doc)
    assert status == 202 and first["duplicate"] is False, first
    status, second, _ = b.post(headers, doc)
    assert status == 200, second  # api.py: 202 only when something was created
    assert second["duplicate"] is True and second["id"] == first["id"], second
    assert messages_with(c.store, "lab", ["xnode-seq-1"]) == {"xnode-seq-1": 1}

    [delivery] = wait_for(lambda: all_delivered(c.store, [first["id"]]), "the message is delivered", c)
    assert sink.count_by_key()[delivery.id] == 1
    assert sum(b'"sequential"' in r.body for r in sink.received) == 1

    # Both nodes at the same instant, for many keys: each key is still one message, one 202, one delivery.
    keys = [f"xnode-par-{i}" for i in range(10)]
    start = threading.Barrier(2 * len(keys))

    def post(node: Node, key: str):
        start.wait(timeout=30)
        return node.post({**c.lab, "Idempotency-Key": key}, {"type": "idem.created", "data": {"par": key}})

    with ThreadPoolExecutor(2 * len(keys)) as pool:
        # Half the keys go to A first, half to B first, so neither web is always the first to be asked.
        futures = {(node.name, key): pool.submit(post, node, key)
                   for i, key in enumerate(keys) for node in (c.nodes if i % 2 else c.nodes[::-1])}
        answers = {k: f.result() for k, f in futures.items()}
    for key in keys:
        (sa, ba, _), (sb, bb, _) = answers[("a", key)], answers[("b", key)]
        assert sorted([sa, sb]) == [200, 202], (key, ba, bb)
        assert ba["id"] == bb["id"] and sorted([ba["duplicate"], bb["duplicate"]]) == [False, True], (ba, bb)
    # Which node won each key's race (informative: either may win, so nothing is asserted on it).
    winners = Counter(name for (name, _), (status, _, _) in answers.items() if status == 202)
    print(f"\nconcurrent keys created by node: {dict(winners)}")
    assert messages_with(c.store, "lab", keys) == {key: 1 for key in keys}

    ids = {answers[("a", key)][1]["id"] for key in keys}
    delivered = wait_for(lambda: all_delivered(c.store, ids), "every message is delivered", c)
    assert len(delivered) == len(keys)
    counts = sink.count_by_key()
    assert {d.id: counts[d.id] for d in delivered} == {d.id: 1 for d in delivered}
    assert sum(b'"par"' in r.body for r in sink.received) == len(keys)


# --- MLLP ---------------------------------------------------------------------------------------------

def adt(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20261121100000||ADT^A01|{control_id}|P|2.5\r"
            f"PID|1||{control_id}^^^HOSP^MR||DOE^JANE\r").encode()


def mllp_ack(node: Node, control_id: str) -> str:
    """MSA-1 of the node's listener's answer to one ADT^A01."""
    with Client(node.mllp_port, timeout=30) as client:
        answer = client.exchange(adt(control_id)).decode()
    msa = next(seg for seg in answer.split("\r") if seg.startswith("MSA|"))
    assert msa.split("|")[2] == control_id, answer
    return msa.split("|")[1]


def stored_control_ids(store) -> Counter:
    """How many stored HL7 messages carry each MSH-10, read from the bodies (not from the key Courier kept)."""
    with store.session() as s:
        bodies = s.scalars(select(Message.body).where(Message.type.startswith("HL7v2:")))
        return Counter(body.split(b"\r")[0].split(b"|")[9].decode() for body in bodies)


def test_one_msh10_sent_to_both_listeners_is_one_message_delivered_once(c):
    a, b = c.nodes
    sink = c.sinks["idem"]
    assert mllp_ack(a, "XNODE-MLLP-1") == "AA"
    assert mllp_ack(b, "XNODE-MLLP-1") == "AA"  # a duplicate is acknowledged: the sender must not resend
    assert stored_control_ids(c.store) == {"XNODE-MLLP-1": 1}
    wait_for(lambda: "XNODE-MLLP-1 from lab (0 new, 1 duplicate)" in b.log("mllp"), "B's listener logs a duplicate",
             c, timeout=10)
    assert "XNODE-MLLP-1 from lab (1 new, 0 duplicate)" in a.log("mllp"), a.log("mllp")[-2000:]

    control_ids = [f"XNODE-MLLP-PAR-{i}" for i in range(6)]
    start = threading.Barrier(2 * len(control_ids))

    def send(node: Node, control_id: str) -> str:
        start.wait(timeout=30)
        return mllp_ack(node, control_id)

    with ThreadPoolExecutor(2 * len(control_ids)) as pool:
        codes = [pool.submit(send, node, cid) for cid in control_ids for node in c.nodes]
        assert [f.result() for f in codes] == ["AA"] * len(codes)
    every = ["XNODE-MLLP-1", *control_ids]
    assert stored_control_ids(c.store) == {cid: 1 for cid in every}

    with c.store.session() as s:
        ids = set(s.scalars(select(Message.id).where(Message.dedup_key.in_(every))))
    wait_for(lambda: all_delivered(c.store, ids), "every MLLP message is delivered", c)
    received = Counter(cid for r in sink.received for cid in every if f"|{cid}|".encode() in r.body)
    assert received == {cid: 1 for cid in every}


# --- per-key order -----------------------------------------------------------------------------------

def test_per_key_order_holds_with_both_nodes_relaying_and_delivering(c):
    """Two keys, 20 messages each, posted alternately to A and B (each after the previous 202); the destination
    is slow (30 ms an answer) and refuses every third request (503, retried in 50-100 ms). Without the claim's
    per-key line, a refused message's retry lands after later ones of its key (unordered, this fails)."""
    sink = c.sinks["ordered"]
    n = 40
    plan = [(503, {}, b"busy") if i % 3 == 2 else (200, {}, b"") for i in range(3 * n)]
    sink.respond(*plan)
    sink.delay = 0.03
    accepted: dict[str, list[int]] = {"P1": [], "P2": []}
    ids = []
    for seq in range(n):
        node = c.nodes[seq % 2]  # A, B, A, B, ...
        key = ("P1", "P2")[(seq // 2) % 2]  # P1, P1, P2, P2, ...: each key goes through both nodes
        status, body, _ = node.post(c.lab, {"type": "patient.updated", "id": f"xnode-order-{seq}",
                                            "data": {"patient_id": key, "seq": seq}})
        assert status == 202, body
        accepted[key].append(seq)
        ids.append(body["id"])

    wait_for(lambda: all_delivered(c.store, ids), "every ordered message is delivered", c, timeout=90)
    received = sink.received
    # The sink gives the planned answers in the order it records requests (one lock for both), so the i-th
    # request got plan[i]. A message arrived when a request carrying it was answered 200.
    arrived: dict[str, list[int]] = {"P1": [], "P2": []}
    for i, request in enumerate(received):
        if i >= len(plan) or plan[i][0] == 200:
            data = json.loads(request.body)["data"]
            arrived[data["patient_id"]].append(data["seq"])
    refused = sum(1 for i in range(len(received)) if i < len(plan) and plan[i][0] != 200)
    print(f"\n{len(received)} requests, {refused} refused; arrival order {arrived}")
    assert refused >= 5, "the destination refused too few requests for a retry to overtake anything"
    assert arrived == accepted
    # Both nodes' workers sent some: the line held across nodes, not inside one of them.
    for node in c.nodes:
        assert "to ordered attempt" in node.log("worker"), f"node {node.name}'s worker sent nothing\n{c.logs()}"


# --- rate limit --------------------------------------------------------------------------------------

def test_a_rate_limit_is_one_limit_across_both_webs(c):
    """Both webs flooded for 3 s by 4 clients each: the total accepted stays within what one limit allows
    (burst + rate x elapsed), although each web alone was sent more than that."""
    window = 3.0
    answers: dict[str, list[int]] = {"a": [], "b": []}
    lock = threading.Lock()
    start = threading.Barrier(8)
    t0 = 0.0

    def flood(node: Node, worker: int) -> None:
        nonlocal t0
        start.wait(timeout=30)
        with lock:
            t0 = t0 or time.monotonic()
        i = 0
        while time.monotonic() - t0 < window:
            status, body, _ = node.post(c.limited, {"type": "limited.reading", "id": f"{node.name}-{worker}-{i}",
                                                    "data": {}})
            assert status in (202, 429), body
            with lock:
                answers[node.name].append(status)
            i += 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(flood, node, w) for node in c.nodes for w in range(4)]
        for f in futures:
            f.result()
    t1 = time.monotonic()
    elapsed = t1 - t0
    allowed = BURST + RATE * elapsed  # GCRA: at most this many in any interval this long
    accepted = {name: statuses.count(202) for name, statuses in answers.items()}
    sent = {name: len(statuses) for name, statuses in answers.items()}
    total = sum(accepted.values())
    print(f"\n{elapsed:.2f} s: sent {sent}, accepted {accepted}; one limit allows {allowed:.0f}")
    # The test can tell one limit from two only if each web alone was pushed past what one limit allows.
    assert min(sent.values()) > allowed * 1.2, f"too few requests to test the limit: {sent}"
    assert all(accepted.values()), f"one web accepted nothing: {accepted}"
    assert total <= allowed + 2, f"accepted {total}, more than one limit allows ({allowed:.0f}): {accepted}"
    assert total >= BURST + RATE * window / 2, f"accepted only {total}: the limit let less through than it should"
    with c.store.session() as s:
        stored = s.scalar(select(func.count()).select_from(Message).where(Message.source == "limited"))
    assert stored == total  # a 429 stored nothing


# --- circuit breaker ---------------------------------------------------------------------------------

def test_the_breaker_lets_one_probe_per_half_open_window_across_both_nodes(c):
    """A destination answering 503, fed a message every 0.2 s through both webs: once its breaker has opened,
    the requests that reach it are spaced at least OPEN_FOR apart (one probe per window), though each window
    wakes several due deliveries on both nodes' workers. Then it comes back: every delivery is made once."""
    sink = c.sinks["down"]
    sink.status = 503
    observe = 11.0  # seconds after the breaker first opened: four or five windows
    stop = threading.Event()
    posted: list[tuple[int, dict]] = []

    def feed() -> None:
        i = 0
        while not stop.is_set():
            status, body, _ = c.nodes[i % 2].post(c.lab, {"type": "down.event", "id": f"xnode-down-{i}",
                                                          "data": {"n": i}})
            posted.append((status, body))
            i += 1
            stop.wait(0.2)

    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    feeder.start()
    try:
        def opened() -> Circuit | None:
            with c.store.session() as s:
                row = s.get(Circuit, "down")
            return row if row is not None and row.state == "open" else None

        row = wait_for(opened, "the breaker opens", c, timeout=30)
        opened_at = row.open_until.timestamp() - OPEN_FOR  # when this trip began (the worker's clock)
        time.sleep(max(0.0, opened_at + observe - time.time()))
        received = [r.time for r in sink.received]
    finally:
        stop.set()
        feeder.join(10)
    assert all(status == 202 for status, _ in posted), posted

    # Requests within half a window of the opening were let in while the breaker was still closed (several
    # workers sent at once); every later one was a probe.
    probes = [t - opened_at for t in received if opened_at + OPEN_FOR / 2 < t <= opened_at + observe]
    gaps = [later - earlier for earlier, later in zip(probes, probes[1:])]
    print(f"\nprobes at {[round(p, 2) for p in probes]} s after the breaker opened; gaps {[round(g, 2) for g in gaps]}")
    assert len(probes) >= 3, f"too few half-open windows to judge: {probes}\n{c.logs()}"
    assert probes[0] >= OPEN_FOR - 0.1, f"a request went through while the breaker was open: {probes}"
    assert min(gaps) >= OPEN_FOR - 0.1, f"two probes in one half-open window: {probes}\n{c.logs()}"
    # The windows were contended: deliveries that fell due with the probe were told to wait for it.
    with c.store.session() as s:
        waited = s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.destination == "down", Delivery.last_error.startswith("waiting: circuit half-open")))
    assert waited >= len(probes), f"only {waited} deliveries waited for a probe: the windows were not contended"
    probed = {node.name: node.log("worker").count("circuit down: open -> half_open") for node in c.nodes}
    print(f"half-open transitions by node: {probed}; {waited} deliveries waiting for a probe")

    # The destination comes back: the next probe closes the breaker and the held deliveries all go, once each.
    sink.status = 200
    ids = [body["id"] for _, body in posted]
    delivered = wait_for(lambda: all_delivered(c.store, ids), "every held delivery is delivered", c, timeout=60)
    with c.store.session() as s:
        assert s.get(Circuit, "down").state == "closed"
        made = Counter(s.scalars(select(Attempt.delivery_id).where(
            Attempt.delivery_id.in_([d.id for d in delivered]), Attempt.outcome == "delivered")))
    assert made == {d.id: 1 for d in delivered}
    # Both nodes' workers take the destination's tasks (one delivery each, COURIER_RELAY_TASK_SIZE=1), so each
    # window's due deliveries were spread over both nodes: the probe was decided between nodes, not inside one.
    for node in c.nodes:
        assert "to down attempt" in node.log("worker"), f"node {node.name}'s worker sent nothing\n{c.logs()}"
