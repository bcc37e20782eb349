"""The legacy-system adapters against real peers on loopback: MLLP (python-hl7's own asyncio
server), SQL (the machine's PostgreSQL and MariaDB), AMQP (the machine's RabbitMQ).

The contract at the top mirrors tests/unit/test_adapters.py for these adapters; the MLLP
peer is left out of the idempotency-key case because MLLP carries no delivery id (its
key is MSH-10, tested below).
"""
from __future__ import annotations

import json
import re
import secrets
import ssl
from dataclasses import replace
from datetime import datetime

import pytest
import sqlalchemy as sa

from courier import adapters
from courier.adapters import PermanentError, Sent, TemporaryError
from courier.adapters.amqp import AmqpAdapter
from courier.adapters.mllp import MllpAdapter
from courier.adapters.sql import SqlAdapter
from tests.support.services import BROKER_URL
from tests.support.mllp_peers import Hl7Server, ack_for
from tests.support.tls_ca import ThrowawayCA
from tests.unit import test_adapters as contract
from tests.unit.test_adapters import HL7, Peer, outgoing

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql://root@127.0.0.1:3306/test"


# --- peers --------------------------------------------------------------------------------

@pytest.fixture
def hl7_server():
    with Hl7Server() as server:
        yield server


def _msh10(body: bytes) -> str:
    return body.split(b"\r")[0].split(b"|")[9].decode()


@pytest.fixture
def mllp_peer(hl7_server, closed_port):
    refused: set[str] = set()

    def behaviour(message):
        return ack_for(message, "AR" if _msh10(message) in refused else "AA", text="unknown patient")

    hl7_server.behaviour = behaviour

    def refusing(out):
        body = out.body.replace(b"MSG0001", b"MSG-REFUSED")
        refused.add("MSG-REFUSED")
        return replace(out, body=body)

    return Peer(
        url=hl7_server.url, down_url=f"mllp://127.0.0.1:{closed_port}",
        keys=lambda: [_msh10(b) for b in hl7_server.received],
        bodies=lambda key: list(hl7_server.received),  # one message per test: every body is this key's
        refusing=refusing, dedups=False,
    )


STAGING_DDL = """CREATE TABLE {name} (
    delivery_id VARCHAR(64) NOT NULL PRIMARY KEY,
    message_id VARCHAR(64), correlation_id VARCHAR(64), message_type VARCHAR(40),
    content_type VARCHAR(100), body TEXT)"""


@pytest.fixture
def staging_table():
    """Make a staging table in a database; dropped afterwards. Returns a factory(url, ddl=...) -> name."""
    made = []

    def make(url: str, ddl: str = STAGING_DDL, name: str | None = None) -> str:
        name = name or f"staging_{secrets.token_hex(4)}"
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://")
                                  .replace("mysql://", "mysql+pymysql://"))
        with engine.begin() as conn:
            conn.exec_driver_sql(ddl.format(name=name))
        made.append((engine, name))
        return name

    yield make
    for engine, name in made:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()


def rows(url: str, table: str, order: str = "delivery_id") -> list[dict]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://")
                              .replace("mysql://", "mysql+pymysql://"))
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {order}")]
    finally:
        engine.dispose()


def _sql_peer(db_url: str, staging_table, closed_port: int) -> Peer:
    table = staging_table(db_url)
    down = db_url.replace(":5432/", f":{closed_port}/").replace(":3306/", f":{closed_port}/")
    return Peer(
        url=f"sql+{db_url}?table={table}", down_url=f"sql+{down}?table={table}",
        keys=lambda: [r["delivery_id"] for r in rows(db_url, table)],
        bodies=lambda key: [r["body"].encode() for r in rows(db_url, table) if r["delivery_id"] == key],
        # message_type is VARCHAR(40): the database itself refuses a longer one, for good.
        refusing=lambda out: replace(out, message_type="HL7v2:" + "X" * 60),
        dedups=True,
    )


@pytest.fixture
def postgres_peer(staging_table, closed_port):
    return _sql_peer(PG_URL, staging_table, closed_port)


@pytest.fixture
def mariadb_peer(staging_table, closed_port):
    return _sql_peer(MARIADB_URL, staging_table, closed_port)


@pytest.fixture
def rabbit():
    """A fresh direct exchange and a queue bound to it with key 'k'; both deleted afterwards."""
    from kombu import Connection

    name = f"courier-test-legacy-{secrets.token_hex(4)}"
    conn = Connection(BROKER_URL)
    channel = conn.channel()
    channel.exchange_declare(name, "direct", durable=False, auto_delete=False)
    channel.queue_declare(name, durable=False, auto_delete=False)
    channel.queue_bind(name, name, "k")
    got: list = []

    def received():
        while (message := channel.basic_get(name, no_ack=True)) is not None:
            got.append(message)
        return got

    yield name, received
    channel.queue_delete(name)
    channel.exchange_delete(name)
    conn.release()


@pytest.fixture
def amqp_peer(rabbit, closed_port):
    exchange, received = rabbit
    base = BROKER_URL.rstrip("/")
    return Peer(
        url=f"{base}//?exchange={exchange}&routing_key=k",
        down_url=f"amqp://guest:guest@127.0.0.1:{closed_port}//?exchange={exchange}&routing_key=k",
        keys=lambda: [m.properties["message_id"] for m in received()],
        bodies=lambda key: [bytes(m.body) for m in received() if m.properties["message_id"] == key],
        # A broker takes any body; the one thing it can never carry is a message id past 255 bytes.
        refusing=lambda out: replace(out, delivery_id="d" * 300),
        dedups=False,
    )


ALL_PEERS = ["mllp_peer", "postgres_peer", "mariadb_peer", "amqp_peer"]


@pytest.fixture(params=ALL_PEERS)
def peer(request) -> Peer:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=[p for p in ALL_PEERS if p != "mllp_peer"])
def keyed_peer(request) -> Peer:
    return request.getfixturevalue(request.param)


# --- contract ----------------------------------------------------------------------------

# The shared adapter contract, run against these peers too (pytest resolves `peer` in this module).
test_contract_send_delivers_exact_body = contract.test_contract_send_delivers_exact_body
test_contract_unreachable_peer_is_temporary = contract.test_contract_unreachable_peer_is_temporary
test_contract_refusal_is_permanent = contract.test_contract_refusal_is_permanent
test_contract_redelivery_keeps_the_idempotency_key = contract.test_contract_redelivery_keeps_the_idempotency_key


@pytest.mark.parametrize("url, cls", [
    ("mllp://10.0.0.5:2575", MllpAdapter), ("mllps://h:2575?ca=/ca.pem", MllpAdapter),
    ("sql+postgresql://u@h/db?table=t", SqlAdapter),
    ("amqp://h//?exchange=x", AmqpAdapter), ("amqps://h//?exchange=x", AmqpAdapter),
])
def test_schemes_resolve(url, cls):
    assert adapters.resolve(url) is cls


@pytest.mark.parametrize("url, message", [
    ("mllp://10.0.0.5", "needs a port"),
    ("mllp://:2575", "needs a host"),
    ("mllp://h:2575/path", "no path"),
    ("mllp://h:2575?x=1", "unknown mllp URL option 'x'; known: charset"),
    ("mllp://h:2575?charset=EBCDIC", "charset 'EBCDIC' is not an HL7 character set"),
    ("mllp://h:2575?charset=windows-1252", "is not an HL7 character set Courier can write"),
    ("mllps://h:2575?charset=8859/1&charset=8859/2", "option charset must be given once"),
    ("mllp://u:p@h:2575", "user info"),
    ("mllp://h:99999", "invalid port"),
    ("mllp://h:2575?ca=/ca.pem", "TLS options such as ?ca= need mllps://"),
    ("mllps://h", "mllps URL needs a port"),
    ("mllps://h:2575/path", "mllps URL takes no path"),
    ("mllps://h:2575?verify=0", "unknown mllps URL option 'verify'"),
    ("mllps://h:2575?ca=/a.pem&ca=/b.pem", "option ca must be given once"),
    ("mllps://h:2575?ca=", "option ca must be given once, with a value"),
    ("mllps://h:2575?key=/k.pem", "option key needs cert"),
    ("mllps://h:2575?ca", "query is not NAME=VALUE"),
    ("sql+postgresql://u@h/db", "needs ?table=NAME"),
    ("sql+postgresql://u@h/db?table=a;drop", "must be NAME or SCHEMA.NAME"),
    ("sql+postgresql://u@h/db?table=t&key=a-b", "must be a column name"),
    ("sql+postgresql://u@h/db?table=t&column.x=nope", "column.x='nope'"),
    ("sql+postgresql://u@h/db?table=t&column.x=hl7:pid-3", "hl7:SEG-N"),
    ("sql+postgresql://u@h/db?table=t&column.x=json:", "json:PATH"),
    ("sql+postgresql://u@h/db?table=t&column.delivery_id=body", "holds the delivery id"),
    ("sql+postgresql://u@h/db?table=t&column.a%20b=body", "column name"),
    ("sql+://u@h/db?table=t", "needs a database URL"),
    ("amqp://h//", "needs ?exchange=NAME"),
    ("amqp://h//?exchange=", "needs routing_key"),
    ("amqp://h//?exchange=x&mandatory=yes", "mandatory must be 0 or 1"),
    ("amqp://h//?exchange=x&routingkey=k", "unknown amqp URL option"),
    ("amqp:///?exchange=x", "needs a host"),
])
def test_check_url_refuses_unusable_urls(url, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        adapters.resolve(url).check_url(url)


# --- MLLP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("code, outcome", [("AA", Sent), ("CA", Sent), ("AE", TemporaryError),
                                           ("CE", TemporaryError), ("AR", PermanentError),
                                           ("CR", PermanentError)])
def test_mllp_ack_codes(hl7_server, code, outcome):
    hl7_server.behaviour = lambda message: ack_for(message, code, text="said the peer")
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        if outcome is Sent:
            assert adapter.send(outgoing()).detail == f"ACK {code}: said the peer"
        else:
            with pytest.raises(outcome, match=f"ACK {code}: said the peer"):
                adapter.send(outgoing())
    assert hl7_server.received == [HL7]


def test_mllp_wrong_msa2_is_an_error_not_a_success(hl7_server):
    hl7_server.behaviour = lambda message: ack_for(message, "AA", control_id="SOMEONE-ELSE")
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="'SOMEONE-ELSE', not the sent 'MSG0001'"):
            adapter.send(outgoing())
        # The connection that carried the stray ACK is dropped; a right answer is then a success.
        hl7_server.behaviour = lambda message: ack_for(message, "AA")
        assert adapter.send(outgoing()).detail == "ACK AA"
    assert hl7_server.connections == 2


def test_mllp_no_answer_is_temporary_within_the_timeout(hl7_server):
    hl7_server.behaviour = lambda message: None
    with MllpAdapter(hl7_server.url, timeout=0.5) as adapter:
        with pytest.raises(TemporaryError, match="no ACK within 0.5s") as err:
            adapter.send(outgoing())
    assert err.value.throttled
    assert len(hl7_server.received) == 1


def test_mllp_answer_that_is_not_an_ack_is_temporary(hl7_server):
    hl7_server.behaviour = lambda message: b"HTTP/1.1 400 Bad Request\r\n"
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="not an HL7 v2 ACK"):
            adapter.send(outgoing())


def test_mllp_keeps_one_connection_and_reconnects_when_the_peer_drops_it(hl7_server):
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        for i in range(3):
            adapter.send(outgoing(body=HL7.replace(b"MSG0001", f"MSG{i}".encode())))
        assert hl7_server.connections == 1
        # The link under the kept-open connection dies: the next send notices and reconnects.
        adapter._sock.shutdown(2)  # noqa: SLF001
        assert adapter.send(outgoing()).detail == "ACK AA"
    assert hl7_server.connections == 2
    assert [_msh10(b) for b in hl7_server.received] == ["MSG0", "MSG1", "MSG2", "MSG0001"]


def test_mllp_reconnects_when_the_server_hangs_up_after_each_ack(hl7_server):
    hl7_server.close_after_ack = True
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        for i in range(3):
            assert adapter.send(outgoing(body=HL7.replace(b"MSG0001", f"MSG{i}".encode()))).detail == "ACK AA"
    assert hl7_server.connections == 3
    assert [_msh10(b) for b in hl7_server.received] == ["MSG0", "MSG1", "MSG2"]


@pytest.mark.parametrize("body, message", [
    (b'{"type": "x"}', "not an HL7 v2 message"),
    (b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01||P|2.5\r", "MSH-10"),
    (b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rNTE|1||a\x1cb\r", "framing byte"),
])
def test_mllp_unsendable_bodies_are_permanent(hl7_server, body, message):
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        with pytest.raises(PermanentError, match=message):
            adapter.send(outgoing(body=body))
    assert hl7_server.received == []


def test_mllp_non_default_delimiters_and_lf_segments(hl7_server):
    body = b"MSH$%~\\&$LAB$HOSP$BILL$HOSP$20240101$$ADT%A01$CTRL-9$P$2.5\nPID$1$$42\r\nPV1$1\n"
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        assert adapter.send(outgoing(body=body)).detail == "ACK AA"
    # Segments end in CR on the wire, as HL7 v2 over MLLP wants; nothing else changes.
    assert hl7_server.received == [b"MSH$%~\\&$LAB$HOSP$BILL$HOSP$20240101$$ADT%A01$CTRL-9$P$2.5\rPID$1$$42\rPV1$1\r"]


@pytest.mark.parametrize("content_type, stored", [
    ("application/hl7-v2; charset=iso8859-1", "MSH|^~\\&|LAB|H|BILL|H|20240101||ADT^A01|C-1|P|2.5||||||8859/1\r"
                                              "PID|||1||M\u00fcller\r".encode("latin-1")),
    ("application/hl7-v2; charset=utf-8", "MSH|^~\\&|LAB|H|BILL|H|20240101||ADT^A01|C-1|P|2.5\r"
                                          "PID|||1||M\u00fcller\r".encode("utf-8")),
    ("application/hl7-v2", "MSH|^~\\&|LAB|H|BILL|H|20240101||ADT^A01|C-1|P|2.5||||||UNICODE UTF-8\r"
                           "PID|||1||M\u00fcller\r".encode("utf-8")),
])
@pytest.mark.parametrize("charset, codec, msh18", [("8859/1", "latin-1", "8859/1"),
                                                   ("UNICODE+UTF-8", "utf-8", "UNICODE UTF-8"),
                                                   ("8859/15", "iso8859-15", "8859/15")])
def test_mllp_charset_option_re_encodes_and_names_it_in_msh18(hl7_server, content_type, stored, charset, codec,
                                                              msh18):
    with MllpAdapter(f"{hl7_server.url}?charset={charset}", timeout=5) as adapter:
        assert adapter.send(outgoing(body=stored, content_type=content_type)).detail == "ACK AA"
    [received] = hl7_server.received
    assert b"M" + "\u00fc".encode(codec) + b"ller" in received
    msh = received.split(b"\r")[0].split(b"|")
    assert (msh[9], msh[17]) == (b"C-1", msh18.encode())
    assert received.split(b"\r")[1:] == [b"PID|||1||M" + "\u00fc".encode(codec) + b"ller", b""]


def test_mllp_without_charset_option_sends_the_bytes_as_stored(hl7_server):
    stored = b"MSH|^~\\&|LAB|H|BILL|H|20240101||ADT^A01|C-1|P|2.5||||||8859/1\rPID|||1||M\xfcller\r"
    with MllpAdapter(hl7_server.url, timeout=5) as adapter:
        adapter.send(outgoing(body=stored, content_type="application/hl7-v2; charset=iso8859-1"))
    assert hl7_server.received == [stored]


def test_mllp_character_the_destination_charset_cannot_hold_is_permanent(hl7_server):
    body = "MSH|^~\\&|LAB|H|BILL|H|20240101||ADT^A01|C-1|P|2.5\rPID|||1||\u0141ukasz\r".encode()
    with MllpAdapter(f"{hl7_server.url}?charset=8859/1", timeout=5) as adapter:
        with pytest.raises(PermanentError, match=r"segment 2 cannot be written in 8859/1"):
            adapter.send(outgoing(body=body, content_type="application/hl7-v2; charset=utf-8"))
    assert hl7_server.received == []


# --- MLLP over TLS (mllps://) ----------------------------------------------------------------

@pytest.fixture
def ca(tmp_path):
    return ThrowawayCA(tmp_path / "ca")


def tls_server(ca: ThrowawayCA, *, hosts=("127.0.0.1", "localhost"), client_ca: bool = False) -> Hl7Server:
    """python-hl7's MLLP server inside TLS, with a certificate from `ca` for `hosts`."""
    issued = ca.server(hosts=hosts)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.cert) if client_ca else None)
    context.load_cert_chain(str(issued.cert), str(issued.key))
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return Hl7Server(ssl_context=context)


def test_mllps_delivers_and_keeps_its_connection(ca):
    with tls_server(ca) as server, MllpAdapter(f"{server.url}?ca={ca.cert}", timeout=5) as adapter:
        for i in range(2):
            assert adapter.send(outgoing(body=HL7.replace(b"MSG0001", f"MSG{i}".encode()))).detail == "ACK AA"
        assert isinstance(adapter._sock, ssl.SSLSocket)  # noqa: SLF001
    assert [_msh10(b) for b in server.received] == ["MSG0", "MSG1"] and server.connections == 1


def test_mllps_receiver_signed_by_another_ca_is_a_temporary_tls_error(ca, tmp_path):
    other = ThrowawayCA(tmp_path / "other", name="Other CA")
    with tls_server(other) as server:
        for url in (f"{server.url}?ca={ca.cert}", server.url):  # our CA; the system's trust store
            with MllpAdapter(url, timeout=5) as adapter:
                with pytest.raises(TemporaryError, match="^TLS: the receiver's certificate is not accepted for "
                                                         "'127.0.0.1': .*(certificate|issuer)") as err:
                    adapter.send(outgoing())
            assert not err.value.throttled
    assert server.received == []  # nothing went out before the certificate was checked


def test_mllps_checks_the_name_and_server_name_overrides_it(ca):
    with tls_server(ca, hosts=("engine.hospital.test",)) as server:
        with MllpAdapter(f"{server.url}?ca={ca.cert}", timeout=5) as adapter:
            with pytest.raises(TemporaryError, match="not accepted for '127.0.0.1'.*(mismatch|not valid)"):
                adapter.send(outgoing())
        with MllpAdapter(f"{server.url}?ca={ca.cert}&server_name=engine.hospital.test", timeout=5) as adapter:
            assert adapter.send(outgoing()).detail == "ACK AA"
    assert [_msh10(b) for b in server.received] == ["MSG0001"]


def test_mllps_client_certificate(ca, tmp_path):
    client = ca.client()
    combined = tmp_path / "client-and-key.pem"  # cert= alone: one file holding both
    combined.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    with tls_server(ca, client_ca=True) as server:
        with MllpAdapter(f"{server.url}?ca={ca.cert}", timeout=5) as adapter:
            # The refusal comes as an alert after the handshake, or (asyncio's server) as a hang-up.
            with pytest.raises(TemporaryError, match="CERTIFICATE_REQUIRED|refuses a missing or untrusted client "
                                                     "certificate"):
                adapter.send(outgoing())
        for query in (f"cert={client.cert}&key={client.key}", f"cert={combined}"):
            with MllpAdapter(f"{server.url}?ca={ca.cert}&{query}", timeout=5) as adapter:
                assert adapter.send(outgoing()).detail == "ACK AA"
    assert len(server.received) == 2


def test_mllps_unusable_files_are_named_before_connecting(ca, tmp_path):
    with tls_server(ca) as server:
        with MllpAdapter(f"{server.url}?ca={tmp_path}/missing.pem", timeout=5) as adapter:
            with pytest.raises(TemporaryError, match=f"^TLS: ca={tmp_path}/missing.pem: not a usable PEM CA file"):
                adapter.send(outgoing())
        stranger = ThrowawayCA(tmp_path / "other", name="Other CA").client()
        url = f"{server.url}?ca={ca.cert}&cert={ca.client().cert}&key={stranger.key}"  # key of another cert
        with MllpAdapter(url, timeout=5) as adapter:
            with pytest.raises(TemporaryError, match="not a usable client certificate and key"):
                adapter.send(outgoing())
    assert server.connections == 0


# --- SQL ----------------------------------------------------------------------------------

@pytest.fixture(params=[PG_URL, MARIADB_URL], ids=["postgresql", "mariadb"])
def db_url(request):
    return request.param


def test_sql_column_mapping_from_json_and_hl7(db_url, staging_table):
    table = staging_table(db_url, """CREATE TABLE {name} (
        courier_id VARCHAR(64) NOT NULL, patient VARCHAR(40), kind VARCHAR(40), total VARCHAR(20),
        payload TEXT, at TIMESTAMP NULL, UNIQUE (courier_id))""")
    url = (f"sql+{db_url}?table={table}&key=courier_id&column.patient=json:data.patient.id"
           f"&column.kind=message_type&column.total=json:data.lines.1.amount&column.payload=body&column.at=sent_at")
    event = json.dumps({"type": "charge", "data": {"patient": {"id": "P-7"}, "lines": [{"amount": 1},
                                                                                      {"amount": 12.5}]}}).encode()
    with adapters.open_adapter(url, timeout=5) as adapter:
        adapter.send(outgoing("dlv-json", body=event, content_type="application/json", message_type="charge"))
    hl7_url = f"sql+{db_url}?table={table}&key=courier_id&column.patient=hl7:PID-3.1&column.kind=hl7:MSH-9"
    with adapters.open_adapter(hl7_url, timeout=5) as adapter:
        adapter.send(outgoing("dlv-hl7"))
    got = {r["courier_id"]: r for r in rows(db_url, table, order="courier_id")}
    assert got["dlv-json"]["patient"] == "P-7" and got["dlv-json"]["kind"] == "charge"
    assert got["dlv-json"]["total"] == "12.5" and got["dlv-json"]["payload"] == event.decode()
    assert isinstance(got["dlv-json"]["at"], datetime)
    assert (got["dlv-hl7"]["patient"], got["dlv-hl7"]["kind"]) == ("12345", "DFT^P03")
    assert got["dlv-hl7"]["payload"] is None


@pytest.mark.parametrize("content_type", ["application/hl7-v2; charset=iso8859-1", "application/hl7-v2"])
def test_sql_hl7_body_in_8859_1_is_stored_as_the_right_text(db_url, staging_table, content_type):
    table = staging_table(db_url, """CREATE TABLE {name} (
        courier_id VARCHAR(64) NOT NULL, family VARCHAR(40), payload TEXT, UNIQUE (courier_id))""")
    url = f"sql+{db_url}?table={table}&key=courier_id&column.family=hl7:PID-5.1&column.payload=body"
    body = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C-1|P|2.5||||||8859/1\rPID|||1||M\u00fcller^Hans\r".encode("latin-1")
    with adapters.open_adapter(url, timeout=5) as adapter:
        adapter.send(outgoing("dlv-latin1", body=body, content_type=content_type))
    [row] = rows(db_url, table, order="courier_id")
    assert (row["family"], row["payload"]) == ("M\u00fcller", body.decode("latin-1"))


def test_sql_redelivery_from_another_adapter_inserts_nothing(db_url, staging_table):
    table = staging_table(db_url)
    url = f"sql+{db_url}?table={table}"
    with adapters.open_adapter(url, timeout=5) as first, adapters.open_adapter(url, timeout=5) as second:
        assert first.send(outgoing("dlv-1")).detail.startswith("inserted")
        assert second.send(outgoing("dlv-1", body=b"changed")).detail.startswith("already in")
    assert [(r["delivery_id"], r["body"]) for r in rows(db_url, table)] == [("dlv-1", HL7.decode())]


def test_sql_table_without_unique_key_is_refused_before_writing(db_url, staging_table):
    table = staging_table(db_url, "CREATE TABLE {name} (delivery_id VARCHAR(64), body TEXT)")
    with adapters.open_adapter(f"sql+{db_url}?table={table}&column.body=body", timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="neither the primary key nor unique"):
            adapter.send(outgoing())
    assert rows(db_url, table) == []


def test_sql_missing_table_and_column_are_temporary(db_url, staging_table):
    with adapters.open_adapter(f"sql+{db_url}?table=no_such_table_here", timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="no_such_table_here does not exist"):
            adapter.send(outgoing())
    table = staging_table(db_url)
    with adapters.open_adapter(f"sql+{db_url}?table={table}&column.ward=hl7:PV1-3", timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="no column"):
            adapter.send(outgoing())


def test_sql_not_null_violation_is_permanent(db_url, staging_table):
    table = staging_table(db_url, """CREATE TABLE {name} (delivery_id VARCHAR(64) PRIMARY KEY,
                                     patient VARCHAR(40) NOT NULL)""")
    with adapters.open_adapter(f"sql+{db_url}?table={table}&column.patient=hl7:PV1-3", timeout=5) as adapter:
        with pytest.raises(PermanentError, match="refused the row"):
            adapter.send(outgoing())
    assert rows(db_url, table) == []


def test_sql_json_source_on_a_non_json_body_is_permanent(staging_table):
    table = staging_table(PG_URL, "CREATE TABLE {name} (delivery_id VARCHAR(64) PRIMARY KEY, p TEXT)")
    with adapters.open_adapter(f"sql+{PG_URL}?table={table}&column.p=json:data.p", timeout=5) as adapter:
        with pytest.raises(PermanentError, match="needs a JSON body"):
            adapter.send(outgoing())


def test_sql_schema_qualified_table(staging_table):
    table = staging_table(PG_URL, STAGING_DDL, name=f"public.staging_{secrets.token_hex(4)}")
    with adapters.open_adapter(f"sql+{PG_URL}?table={table}", timeout=5) as adapter:
        adapter.send(outgoing("dlv-s"))
    assert [r["delivery_id"] for r in rows(PG_URL, table)] == ["dlv-s"]


def test_sql_sqlite_file_urls_keep_their_path(tmp_path, staging_table, monkeypatch):
    """sql+sqlite:////abs.db and sql+sqlite:///rel.db reach the file named (urlunsplit once lost the slashes)."""
    absolute = tmp_path / "inventory.db"
    table = staging_table(f"sqlite:///{absolute}")
    with adapters.open_adapter(f"sql+sqlite:///{absolute}?table={table}&timeout=3", timeout=5) as adapter:
        assert adapter.database_url == f"sqlite:///{absolute}?timeout=3"
        adapter.send(outgoing("dlv-abs"))
    assert [r["delivery_id"] for r in rows(f"sqlite:///{absolute}", table)] == ["dlv-abs"]
    monkeypatch.chdir(tmp_path)
    with adapters.open_adapter(f"sql+sqlite:///inventory.db?table={table}", timeout=5) as adapter:
        assert adapter.database_url == "sqlite:///inventory.db"
        adapter.send(outgoing("dlv-rel"))
    assert [r["delivery_id"] for r in rows(f"sqlite:///{absolute}", table)] == ["dlv-abs", "dlv-rel"]


# --- AMQP ---------------------------------------------------------------------------------

def _amqp_url(exchange: str, **options) -> str:
    base = BROKER_URL.rstrip("/")
    query = "&".join(f"{k}={v}" for k, v in {"exchange": exchange, **options}.items())
    return f"{base}//?{query}"


def test_amqp_message_properties(rabbit):
    exchange, received = rabbit
    with adapters.open_adapter(_amqp_url(exchange, routing_key="k"), timeout=5) as adapter:
        detail = adapter.send(outgoing("dlv-p")).detail
    assert detail.startswith("confirmed by the broker")
    [message] = received()
    props = message.properties
    assert (props["message_id"], props["correlation_id"], props["type"]) == ("dlv-p", "corr-1", "HL7v2:DFT^P03")
    assert props["delivery_mode"] == 2 and props["content_type"] == "application/hl7-v2"
    assert props["application_headers"]["x-courier-delivery-id"] == "dlv-p"
    assert bytes(message.body) == HL7


def test_amqp_default_exchange_routes_to_a_queue(rabbit):
    queue, received = rabbit
    with adapters.open_adapter(_amqp_url("", routing_key=queue), timeout=5) as adapter:
        adapter.send(outgoing("dlv-q"))
    assert [m.properties["message_id"] for m in received()] == ["dlv-q"]


def test_amqp_missing_exchange_is_temporary_and_the_adapter_recovers(rabbit):
    exchange, received = rabbit
    missing = f"{exchange}-missing"
    with AmqpAdapter(_amqp_url(missing, routing_key="k"), timeout=5) as adapter:
        with pytest.raises(TemporaryError, match=f"exchange '{missing}' does not exist"):
            adapter.send(outgoing())
        adapter.exchange = exchange  # the operator fixes the exchange: same instance, fresh channel
        adapter.send(outgoing("dlv-after"))
    assert [m.properties["message_id"] for m in received()] == ["dlv-after"]


def test_amqp_mandatory_unroutable_is_temporary(rabbit):
    exchange, received = rabbit
    with adapters.open_adapter(_amqp_url(exchange, routing_key="nobody", mandatory=1), timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="unroutable"):
            adapter.send(outgoing())
    with adapters.open_adapter(_amqp_url(exchange, routing_key="nobody"), timeout=5) as adapter:
        adapter.send(outgoing())  # without mandatory the broker drops it, as AMQP says
    assert received() == []
