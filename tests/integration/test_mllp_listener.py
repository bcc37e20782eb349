"""The MLLP listener against real clients on loopback and the real PostgreSQL store.

Clients: python-hl7's `mllp_send` console script (a blocking socket client), python-hl7's
asyncio client (`hl7.mllp.open_hl7_connection`), and a raw socket client (tests/support/mllp_peers.py)
for what well-behaved clients never do. Samples: every valid, batch and malformed file in
tests/data/hl7, with the per-file decisions of tests/unit/test_hl7v2.py.
"""
from __future__ import annotations

import asyncio
import csv
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from courier.app.hl7 import er7
from courier.app.store.db import Store
from courier.app.hl7.listener import END_BLOCK, START_BLOCK, Deframer, FrameTooLarge, frame
from courier.app.store.models import Message
from tests.support.config import settings_for
from tests.support.data import HL7_SAMPLES
from tests.support.mllp_peers import Client, listener_thread
from tests.support.processes import VENV_BIN
from tests.unit.test_hl7v2 import BATCH_MEMBERS_REFUSED, BATCH_REFUSED, MALFORMED_BUT_ACCEPTED, VALID_BUT_REFUSED

ROWS = list(csv.DictReader((HL7_SAMPLES / "SOURCES.tsv").open(encoding="utf-8"), delimiter="\t"))
MALFORMED_FILES = [r["file"] for r in ROWS if r["kind"] == "malformed"]
# labelled good, refused (why: test_hl7v2)
REFUSED_GOOD = set(VALID_BUT_REFUSED) | set(BATCH_MEMBERS_REFUSED) | set(BATCH_REFUSED)


def _unanswered(name: str) -> bool:
    """Whether every message of a good file asks for no answer on success (enhanced mode, MSH-15 NE or ER)."""
    if name in REFUSED_GOOD:
        return False
    return all(er7.ack_code(m, "AA") is None for m in er7.parse_all((HL7_SAMPLES / name).read_bytes()))


# Good files a sender waits for an answer to, and those whose MSH-15 asks for none when accepted.
ALL_GOOD = [r["file"] for r in ROWS if r["kind"] in ("valid", "batch")]
SILENT_FILES = [name for name in ALL_GOOD if _unanswered(name)]
GOOD_FILES = [name for name in ALL_GOOD if name not in SILENT_FILES]

ADT = (b"MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20240101120000||ADT^A01|{id}|P|2.5\r"
       b"PID|1||12345^^^HOSP^MR||M\xc3\xbcller^J\xc3\xbcrgen\r")
RDE = b"MSH|^~\\&|PHARM|HOSP|COURIER|HOSP|20240101120000||RDE^O11|{id}|P|2.5\rPID|1||777\r"


def adt(control_id: str) -> bytes:
    return ADT.replace(b"{id}", control_id.encode())


def sample(name: str) -> bytes:
    return (HL7_SAMPLES / name).read_bytes()


def write_mllp_config(path: Path, tmp_path: Path) -> Path:
    """lab: any sender from 127.0.0.1; pharmacy: sender PHARM from 127.0.0.1 or 127.0.0.2, RDE only."""
    (tmp_path / "out").mkdir(exist_ok=True)
    doc = {
        "sources": {
            "lab": {"mllp_allow": ["127.0.0.1/32"]},
            "pharmacy": {"mllp_allow": ["127.0.0.1/32", "127.0.0.2/32"], "mllp_senders": ["PHARM^*"],
                         "allowed_types": ["HL7v2:RDE^*"]},
        },
        "destinations": {"archive": {"url": (tmp_path / "out").as_uri(), "clearance": "phi"}},
        "routes": [{"match": {"source": "*"}, "to": ["archive"]}],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def mllp_settings(tmp_path, store, queue_prefix):
    return settings_for(write_mllp_config(tmp_path / "courier.yml", tmp_path), store.url, queue_prefix)


@pytest.fixture
def listener(mllp_settings, store):
    with listener_thread(mllp_settings, store, idle_timeout=30, frame_timeout=10) as running:
        yield running


def stored(store, **where) -> list[Message]:
    with store.session() as session:
        query = select(Message)
        for name, value in where.items():
            query = query.where(getattr(Message, name) == value)
        return list(session.scalars(query))


def count(store) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(Message))


def acks(payload: bytes) -> list[tuple[str, str, str]]:
    """(code, MSA-2, text) of each ACK in an answer (one ACK, or a BHS ... BTS batch of them)."""
    return [er7.parse_ack(part) for part in er7.split(er7.decode(payload))]


def expected_ids(name: str) -> list[str]:
    return [m.control_id for m in er7.parse_all(sample(name))]


def check_answers(answers: dict[str, bytes], store, every: list[str] = GOOD_FILES) -> None:
    """Each good file's answer: AA per message with MSA-2 = MSH-10 (AR for the known refusals);
    the store holds each control id accepted from `every` exactly once."""
    accepted = {i for name in every if name not in REFUSED_GOOD for i in expected_ids(name)}
    for name, answer in answers.items():
        got = acks(answer)
        if name in REFUSED_GOOD:
            assert {code for code, _, _ in got} <= {"AR", "CR"} and got, (name, got)
            assert all(text for _, _, text in got), (name, got)
            continue
        wanted = [(er7.ack_code(m, "AA"), m.control_id) for m in er7.parse_all(sample(name))]
        assert [(code, msa2) for code, msa2, _ in got] == [w for w in wanted if w[0] is not None], name
    keys = [m.dedup_key for m in stored(store)]
    assert sorted(keys) == sorted(accepted)  # stored once: no control id twice, none missing


# --- proof with clients written by others ---------------------------------------------------

def test_mllp_send_delivers_every_good_sample(listener, store, tmp_path):
    # mllp_send reads pre-framed input (<VT>...<FS><CR>; unframed input raises "buffer not
    # terminated"), sends each frame and prints the one recv() that follows. --loose would frame
    # for us but needs 'MSH|^~\&|' at every message start, which batches and non-default
    # delimiters do not have. So every file becomes one frame of one stream; then the first 20
    # files are sent again, and must all be duplicates (AA, nothing new stored).
    for names in (GOOD_FILES, GOOD_FILES[:20]):
        stream = tmp_path / "samples.mllp"
        stream.write_bytes(b"".join(frame(sample(name)) for name in names))
        out = subprocess.run([str(VENV_BIN / "mllp_send"), "-p", str(listener.port), "-f", str(stream),
                              "127.0.0.1"], capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        # Each answer is printed as <VT>ACK<FS><CR> plus a newline.
        printed = out.stdout.split(END_BLOCK + b"\r\n")
        assert printed[-1] == b"" and len(printed) - 1 == len(names)
        answers = {name: answer.removeprefix(START_BLOCK) for name, answer in zip(names, printed)}
        check_answers(answers, store, every=GOOD_FILES)
    assert len(GOOD_FILES) > 150


def test_messages_whose_msh15_asks_for_no_answer_are_stored_and_not_answered(listener, store):
    """MSH-15 NE (and ER on success): stored, no frame back. Proved without waiting: a message in
    original mode follows on the same connection, and the first answer is that message's ACK."""
    assert len(SILENT_FILES) >= 15
    with Client(listener.port) as client:
        for number, name in enumerate(SILENT_FILES):
            client.send(sample(name))
            assert acks(client.exchange(adt(f"PROBE-{number}"))) == [("AA", f"PROBE-{number}", "")], name
    keys = sorted(m.dedup_key for m in stored(store))
    assert keys == sorted({i for name in SILENT_FILES for i in expected_ids(name)}
                          | {f"PROBE-{n}" for n in range(len(SILENT_FILES))})


def test_python_hl7_asyncio_client_concurrently(listener, store):
    """python-hl7's asyncio MLLP client, four connections at once, each sending a share of the files."""
    import hl7.mllp

    async def one_connection(names: list[str]) -> dict[str, bytes]:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", listener.port)
        got = {}
        for name in names:
            writer.writeblock(sample(name))
            await writer.drain()
            got[name] = await asyncio.wait_for(reader.readblock(), 30)
        writer.close()
        return got

    async def main():
        shares = [GOOD_FILES[i::4] for i in range(4)]
        answers: dict[str, bytes] = {}
        for part in await asyncio.gather(*(one_connection(s) for s in shares)):
            answers.update(part)
        return answers

    check_answers(asyncio.run(main()), store)


def test_every_malformed_sample_gets_ar_with_a_reason_and_the_listener_keeps_serving(listener, store):
    with Client(listener.port) as client:
        for name in MALFORMED_FILES:
            got = acks(client.exchange(sample(name)))
            if name in MALFORMED_BUT_ACCEPTED:
                assert [code for code, _, _ in got] == [er7.ack_code(er7.parse_all(sample(name))[0], "AA")], name
                continue
            assert [code for code, _, _ in got] in (["AR"], ["CR"]), (name, got)
            assert got[0][2], f"{name}: AR without a reason"
        # The same connection still works.
        assert acks(client.exchange(adt("AFTER-BAD")))[0][:2] == ("AA", "AFTER-BAD")
    keys = sorted(m.dedup_key for m in stored(store))
    accepted = [i for name in MALFORMED_BUT_ACCEPTED for i in expected_ids(name)]
    assert keys == sorted(accepted + ["AFTER-BAD"])


# --- ACK contents -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "elixir-hl7/examples.ex__wikipedia_sample_hl7_alt_delimiters.hl7",  # component separator '*'
    "nHapi/segmentfinder_a24.hl7",                                    # field separator '^'
    "hl7apy/test_parser.py__rsp_k21_27.hl7",                          # 5 encoding characters, v2.7
    "microsoft-FHIR-Converter/ADT-A01-01.hl7",                        # v2.8, LF
])
def test_ack_uses_the_messages_delimiters_version_and_swaps_sender_and_receiver(listener, name):
    message = er7.parse_all(sample(name))[0]
    with Client(listener.port) as client:
        answer = client.exchange(sample(name)).decode()
    msh, msa = answer.split("\r")[:2]
    sep = msh[3]
    fields = msh.split(sep)
    raw = message.text.split("\r")[0].split(sep)
    assert sep == message.field_separator and fields[1] == message.encoding_characters
    assert fields[2:4] == raw[4:6] and fields[4:6] == raw[2:4]  # MSH-3/4 <-> MSH-5/6, byte for byte
    assert fields[11] == message.version
    assert msa.split(sep)[:3] == ["MSA", er7.ack_code(message, "AA"), message.control_id]


def test_refusal_carries_reason_in_msa3_and_err(listener, store):
    with Client(listener.port) as client:
        answer = client.exchange(b"MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20240101||ADT^A01||P|2.5\rPID|1\r").decode()
    segments = answer.split("\r")
    assert segments[1].startswith("MSA|AR||segment 1 (MSH), field 10: MSH-10")
    assert segments[2] == ("ERR||MSH^1^10|101^Required field missing^HL70357|E||||segment 1 (MSH), field 10: "
                           "MSH-10 (message control id) is empty")
    assert count(store) == 0


def test_duplicate_control_id_is_acknowledged_and_stored_once(listener, store):
    with Client(listener.port) as client:
        assert acks(client.exchange(adt("DUP-1")))[0][:2] == ("AA", "DUP-1")
        assert acks(client.exchange(adt("DUP-1")))[0][:2] == ("AA", "DUP-1")
    assert [m.dedup_key for m in stored(store)] == ["DUP-1"]


def test_batch_is_all_or_nothing_with_one_ack_per_message(listener, store):
    good = b"BHS|^~\\&|LAB|HOSP\r" + adt("B-1") + adt("B-2") + b"BTS|2\r"
    bad = b"BHS|^~\\&|LAB|HOSP\r" + adt("C-1") + adt("") + b"BTS|2\r"  # message 2 has no MSH-10
    with Client(listener.port) as client:
        answer = client.exchange(good)
        assert answer.startswith(b"BHS|") and answer.endswith(b"BTS|2\r")
        assert [a[:2] for a in acks(answer)] == [("AA", "B-1"), ("AA", "B-2")]
        refused = acks(client.exchange(bad))
        assert [code for code, _, _ in refused] == ["AR", "AR"]
        assert "message 2" in refused[0][2]
    assert sorted(m.dedup_key for m in stored(store)) == ["B-1", "B-2"]


# --- sources: peer address and MSH-3/4 ----------------------------------------------------

def connect_from(address: str, port: int) -> Client:
    client = Client.__new__(Client)
    client.sock = socket.socket()
    client.sock.settimeout(10)
    client.sock.bind((address, 0))
    client.sock.connect(("127.0.0.1", port))
    client.buffer = b""
    return client


def test_source_is_chosen_by_peer_address_and_sending_application(listener, store):
    with Client(listener.port) as client:
        assert acks(client.exchange(RDE.replace(b"{id}", b"RX-1")))[0][0] == "AA"
        assert acks(client.exchange(adt("LAB-1")))[0][0] == "AA"
        # PHARM may only send RDE: its ADT is refused as a type it may not send (ERR-3 200).
        answer = client.exchange(RDE.replace(b"{id}", b"RX-2").replace(b"RDE^O11", b"ADT^A01"))
        code, _, text = acks(answer)[0]
        assert code == "AR" and "may not send 'HL7v2:ADT^A01'" in text
        assert b"|200^Unsupported message type^HL70357|" in answer
    with connect_from("127.0.0.2", listener.port) as client:  # only pharmacy is allowed from here
        assert acks(client.exchange(RDE.replace(b"{id}", b"RX-3")))[0][0] == "AA"
        code, _, text = acks(client.exchange(adt("LAB-2")))[0]
        assert code == "AR" and "sender LAB^HOSP" in text
    sources = {m.dedup_key: m.source for m in stored(store)}
    assert sources == {"RX-1": "pharmacy", "LAB-1": "lab", "RX-3": "pharmacy"}


def test_peer_outside_mllp_allow_is_disconnected_with_a_log_line(listener, store, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with connect_from("127.0.0.3", listener.port) as client:
        try:
            client.send(adt("NOPE"))
        except OSError:
            pass  # the listener may have closed before our send
        assert client.closed_by_server()
    assert count(store) == 0
    assert any("127.0.0.3" in r.getMessage() and "mllp_allow" in r.getMessage() for r in caplog.records)


def test_connections_over_the_per_peer_limit_are_closed_and_the_earlier_ones_still_work(mllp_settings, store,
                                                                                         caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with listener_thread(mllp_settings, store, max_per_peer=2) as running:
        with Client(running.port) as first, Client(running.port) as second:
            assert acks(first.exchange(adt("PEER-1")))[0][0] == "AA"
            assert acks(second.exchange(adt("PEER-2")))[0][0] == "AA"  # both are counted now
            with Client(running.port) as extra:
                assert extra.closed_by_server()
            # Another address has its own count.
            with connect_from("127.0.0.2", running.port) as pharmacy:
                assert acks(pharmacy.exchange(RDE.replace(b"{id}", b"RX-PEER")))[0][0] == "AA"
            assert acks(first.exchange(adt("PEER-3")))[0][0] == "AA"
            assert acks(second.exchange(adt("PEER-4")))[0][0] == "AA"
        # Both closed: their slots come back (once the listener has seen them go).
        answered = None
        for _ in range(100):
            with Client(running.port) as again:
                try:
                    answered = acks(again.exchange(adt("PEER-5")))[0][0]
                    break
                except (EOFError, ConnectionResetError, BrokenPipeError):
                    threading.Event().wait(0.1)
        assert answered == "AA"
    assert sorted(m.dedup_key for m in stored(store)) == ["PEER-1", "PEER-2", "PEER-3", "PEER-4", "PEER-5",
                                                          "RX-PEER"]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all("127.0.0.1" in m and "COURIER_MLLP_MAX_PER_PEER" in m for m in refused)


def test_connections_over_the_listener_limit_are_closed_whatever_their_address(mllp_settings, store, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with listener_thread(mllp_settings, store, max_connections=2, max_per_peer=2) as running:
        with Client(running.port) as first, connect_from("127.0.0.2", running.port) as second:
            assert acks(first.exchange(adt("ALL-1")))[0][0] == "AA"
            assert acks(second.exchange(RDE.replace(b"{id}", b"ALL-2")))[0][0] == "AA"
            with connect_from("127.0.0.2", running.port) as extra:
                assert extra.closed_by_server()
            assert acks(first.exchange(adt("ALL-3")))[0][0] == "AA"
    assert sorted(m.dedup_key for m in stored(store)) == ["ALL-1", "ALL-2", "ALL-3"]
    assert any("127.0.0.2" in r.getMessage() and "COURIER_MLLP_MAX_CONNECTIONS" in r.getMessage()
               for r in caplog.records)


# --- framing and misbehaving peers ----------------------------------------------------------

def test_frame_split_into_single_bytes_and_several_frames_in_one_write(listener, store):
    with Client(listener.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in frame(adt("SPLIT-1")):
            client.send_raw(bytes([byte]))
        assert acks(client.read_frame())[0][:2] == ("AA", "SPLIT-1")
        client.send_raw(b"".join(frame(adt(f"MANY-{i}")) for i in range(5)))
        assert [acks(client.read_frame())[0][:2] for _ in range(5)] == [("AA", f"MANY-{i}") for i in range(5)]
    assert len(stored(store)) == 6


def test_junk_between_frames_is_skipped_and_logged(listener, store, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with Client(listener.port) as client:
        client.send_raw(b"hello?\r\n" + frame(adt("J-1")))
        assert acks(client.read_frame())[0][:2] == ("AA", "J-1")
    assert any("outside a frame" in r.getMessage() for r in caplog.records)


def test_garbage_without_any_frame_closes_the_connection(listener, store):
    with Client(listener.port) as client:
        client.send_raw(b"GET / HTTP/1.1\r\n" + b"X" * 10_000)
        assert client.closed_by_server()
    with Client(listener.port) as client:  # the listener itself is fine
        assert acks(client.exchange(adt("G-1")))[0][0] == "AA"


def test_oversized_frame_gets_ar_and_is_closed(tmp_path, store, queue_prefix):
    small = settings_for(write_mllp_config(tmp_path / "c.yml", tmp_path), store.url, queue_prefix,
                         max_message_bytes=2000)
    with listener_thread(small, store) as running:
        with Client(running.port) as client:
            client.send_raw(START_BLOCK + adt("BIG") + b"NTE|1||" + b"x" * 5000)
            code, _, text = acks(client.read_frame())[0]
            assert code == "AR" and "larger than 2000 bytes" in text
            assert client.closed_by_server()
        with Client(running.port) as client:
            assert acks(client.exchange(adt("SMALL")))[0][0] == "AA"
    assert [m.dedup_key for m in stored(store)] == ["SMALL"]


def test_connection_closed_inside_a_frame_stores_nothing(listener, store, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with Client(listener.port) as client:
        client.send_raw(START_BLOCK + adt("HALF"))  # no end block
        client.sock.shutdown(socket.SHUT_WR)
        assert client.closed_by_server()
    with Client(listener.port) as client:
        assert acks(client.exchange(adt("WHOLE")))[0][0] == "AA"
    assert [m.dedup_key for m in stored(store)] == ["WHOLE"]
    assert any("closed inside a frame" in r.getMessage() for r in caplog.records)


def test_slow_loris_frame_gets_ar_and_idle_connection_is_closed(mllp_settings, store):
    with listener_thread(mllp_settings, store, idle_timeout=0.5, frame_timeout=1.0) as running:
        with Client(running.port) as loris:
            loris.send_raw(START_BLOCK + b"MSH|^~\\&|")
            stop = threading.Event()

            def trickle():  # one byte every 100 ms keeps the connection busy but never ends the frame
                while not stop.wait(0.1):
                    try:
                        loris.sock.send(b"x")
                    except OSError:
                        return

            threading.Thread(target=trickle, daemon=True).start()
            try:
                code, _, text = acks(loris.read_frame())[0]
            finally:
                stop.set()
            assert code == "AR" and "no end block" in text
            assert loris.closed_by_server()
        with Client(running.port) as idle:
            assert idle.closed_by_server(timeout=10)
        with Client(running.port) as client:
            assert acks(client.exchange(adt("AFTER-LORIS")))[0][0] == "AA"
    assert [m.dedup_key for m in stored(store)] == ["AFTER-LORIS"]


def test_store_down_gets_ae_and_nothing_is_lost(mllp_settings):
    down = Store("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    try:
        with listener_thread(mllp_settings, down) as running, Client(running.port) as client:
            code, msa2, text = acks(client.exchange(adt("DOWN-1")))[0]
            assert (code, msa2) == ("AE", "DOWN-1") and "send again" in text
            code, msa2, _ = acks(client.exchange(adt("DOWN-2")))[0]  # still serving
            assert (code, msa2) == ("AE", "DOWN-2")
    finally:
        down.dispose()


INSERT_HELD = ("INSERT INTO courier_messages (id, source, type, content_type, body, size, dedup_key, correlation_id, "
               "status, received_at) VALUES ('held-row', 'lab', 'x', 'x', '', 0, 'HELD', 'c', 'accepted', now())")


@contextmanager
def holding_msh10_held(store):
    """An open transaction that has inserted MSH-10 'HELD' for `lab`: an ingest of 'HELD' waits on its unique
    key until the yielded transaction is rolled back."""
    from sqlalchemy import text

    holder = store.engine.connect()
    blocking = holder.begin()
    holder.execute(text(INSERT_HELD))
    try:
        yield blocking
    finally:
        holder.close()


def test_slow_commit_does_not_stall_other_connections(listener, store):
    """A transaction holding MSH-10 'HELD' makes that ingest wait on the unique key; meanwhile
    another connection is answered, so the event loop is free. Then the hold ends and the
    waiting message is committed and acknowledged."""
    with holding_msh10_held(store) as blocking, Client(listener.port) as waiting, Client(listener.port) as other:
        waiting.send(adt("HELD"))
        assert acks(other.exchange(adt("FREE")))[0][:2] == ("AA", "FREE")
        blocking.rollback()
        assert acks(waiting.read_frame())[0][:2] == ("AA", "HELD")
    assert sorted(m.dedup_key for m in stored(store)) == ["FREE", "HELD"]


def test_many_concurrent_connections_several_messages_each(listener, store):
    def session(n: int) -> list[tuple[str, str]]:
        with Client(listener.port, timeout=60) as client:
            return [acks(client.exchange(adt(f"C{n}-{i}")))[0][:2] for i in range(5)]

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(session, range(20)))
    assert results == [[("AA", f"C{n}-{i}") for i in range(5)] for n in range(20)]
    assert count(store) == 100


# --- group commit: frames arriving together share a transaction, each answered after its commit ----------

@contextmanager
def slow_commits(store, seconds: float):
    """Every COMMIT of `store` waits `seconds` first: its rows are written but not yet visible to others."""
    from sqlalchemy import event

    def pause(_conn):
        threading.Event().wait(seconds)

    event.listen(store.engine, "commit", pause)
    try:
        yield
    finally:
        event.remove(store.engine, "commit", pause)


def test_group_commit_answers_each_frame_only_after_its_own_commit(mllp_settings, store, pg_url):
    """Eight connections at once, one transaction at a time, each COMMIT slowed down: frames share
    transactions, and each AA finds its message already visible to another connection of the database."""
    from sqlalchemy import create_engine, text

    observer = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    seen = text("SELECT count(*) FROM courier_messages WHERE source = 'lab' AND dedup_key = :k")

    def sender(n: int) -> list[tuple[str, str, int]]:
        out = []
        with Client(running.port, timeout=60) as client, observer.connect() as conn:
            for i in range(3):
                code, msa2, _ = acks(client.exchange(adt(f"G{n}-{i}")))[0]
                out.append((code, msa2, conn.scalar(seen, {"k": f"G{n}-{i}"})))  # at once, before the next frame
        return out

    try:
        with slow_commits(store, 0.2), listener_thread(mllp_settings, store, commit_leaders=1) as running, \
                ThreadPoolExecutor(8) as pool:
            results = list(pool.map(sender, range(8)))
            group = running.group_commit
        assert results == [[("AA", f"G{n}-{i}", 1) for i in range(3)] for n in range(8)]
        assert group.batches == 24 and group.transactions < 24, (group.batches, group.transactions)
    finally:
        observer.dispose()
    assert count(store) == 24


def test_a_transaction_stuck_on_a_lock_holds_up_other_frames_only_for_a_moment(mllp_settings, store):
    """The one commit leader waits on the row lock of 'HELD': the next frame waits its patience (0.5 s)
    for a leader, then runs its own transaction."""
    with holding_msh10_held(store) as blocking, listener_thread(mllp_settings, store, commit_leaders=1) as running, \
            Client(running.port) as waiting, Client(running.port, timeout=5) as other:
        waiting.send(adt("HELD"))
        threading.Event().wait(0.3)  # HELD's transaction has the lead, waiting for the lock
        started = time.monotonic()
        assert acks(other.exchange(adt("FREE")))[0][:2] == ("AA", "FREE")
        assert time.monotonic() - started < 3
        blocking.rollback()
        assert acks(waiting.read_frame())[0][:2] == ("AA", "HELD")
    assert sorted(m.dedup_key for m in stored(store)) == ["FREE", "HELD"]


def test_a_frame_that_spoils_its_group_fails_alone_and_the_others_are_stored(mllp_settings, store, monkeypatch):
    """A group holding a frame whose writing fails is committed again frame by frame: that frame gets
    AE (send again), the others of its group AA, each stored once."""
    from courier.app import ingest

    real = ingest.store_plans

    def store_plans(session, plans, **kwargs):
        if any(p.parsed.dedup_key == "BOOM" for p in plans):
            raise RuntimeError("this frame cannot be written")
        return real(session, plans, **kwargs)

    monkeypatch.setattr(ingest, "store_plans", store_plans)
    with slow_commits(store, 0.5), listener_thread(mllp_settings, store, commit_leaders=1) as running:
        with Client(running.port) as first, Client(running.port) as boom, Client(running.port) as one, \
                Client(running.port) as two:
            first.send(adt("FIRST"))  # its transaction holds the one lead for 0.5 s ...
            threading.Event().wait(0.15)
            for client, control_id in ((boom, "BOOM"), (one, "OK-1"), (two, "OK-2")):  # ... while these wait
                client.send(adt(control_id))
            answers = {name: acks(client.read_frame())[0] for name, client in
                       (("FIRST", first), ("BOOM", boom), ("OK-1", one), ("OK-2", two))}
        group = running.group_commit
    assert {name: answer[:2] for name, answer in answers.items()} == {
        "FIRST": ("AA", "FIRST"), "BOOM": ("AE", "BOOM"), "OK-1": ("AA", "OK-1"), "OK-2": ("AA", "OK-2")}
    assert "send again" in answers["BOOM"][2]
    # FIRST alone, then BOOM with OK-1 and OK-2, which failed, then each of the three alone.
    assert (group.batches, group.transactions) == (4, 5)
    assert sorted(m.dedup_key for m in stored(store)) == ["FIRST", "OK-1", "OK-2"]


# --- the real process: courier mllp, SIGTERM -------------------------------------------------

def test_courier_mllp_process_serves_and_stops_on_sigterm(tmp_path, store, queue_prefix):
    cfg = write_mllp_config(tmp_path / "courier.yml", tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": store.url, "COURIER_CONFIG": str(cfg), "MLLP_PORT": str(port),
           "COURIER_QUEUE_PREFIX": queue_prefix, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "mllp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(VENV_BIN / "courier"), "mllp", "--host", "127.0.0.1"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    try:
        client = None
        for _ in range(300):
            if b"MLLP listener on" in log_path.read_bytes():
                client = Client(port)
                break
            assert proc.poll() is None, log_path.read_text()
            threading.Event().wait(0.1)
        assert client is not None, log_path.read_text()
        with client, Client(port) as idle:
            assert acks(client.exchange(adt("PROC-1")))[0][:2] == ("AA", "PROC-1")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, log_path.read_text()
            assert idle.closed_by_server()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"MLLP listener stopped" in log_path.read_bytes()
    assert [m.dedup_key for m in stored(store)] == ["PROC-1"]


# --- properties: framing, and the listener under random and mutated input ----------------------

FRAMES = st.lists(st.binary(max_size=200).map(lambda b: b.replace(START_BLOCK, b"").replace(END_BLOCK, b"")),
                  min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(payloads=FRAMES, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
       gap=st.sampled_from([b"", b"\r\n", b"noise"]))
def test_deframer_gives_the_same_frames_however_the_stream_is_cut(payloads, cuts, gap):
    stream = b"".join(gap + frame(p) for p in payloads)
    deframer, out = Deframer(max_bytes=10_000), []
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in zip(points, points[1:]):
        deframer.feed(stream[start:end])
        while (payload := deframer.next_frame()) is not None:
            out.append(payload)
    assert out == payloads
    assert not deframer.in_frame and not deframer.buffer


def test_deframer_restarts_at_a_second_start_block_and_takes_a_bare_end_block():
    deframer = Deframer(max_bytes=100)
    deframer.feed(START_BLOCK + b"abandoned" + START_BLOCK + b"MSH|one" + END_BLOCK + START_BLOCK + b"MSH|two")
    assert deframer.next_frame() == b"MSH|one"  # the sender gave up on the first frame
    assert deframer.restarts == 1 and deframer.junk == len(b"abandoned")
    assert deframer.next_frame() is None and deframer.in_frame
    deframer.feed(END_BLOCK)  # no CR after the end block: still a frame
    assert deframer.next_frame() == b"MSH|two"
    deframer.feed(START_BLOCK + b"x" * 101)
    with pytest.raises(FrameTooLarge):
        deframer.next_frame()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000))
def test_deframer_on_random_bytes_never_holds_more_than_the_limit(data):
    deframer = Deframer(max_bytes=1000)
    try:
        for i in range(0, len(data), 97):
            deframer.feed(data[i:i + 97])
            while deframer.next_frame() is not None:
                pass
    except FrameTooLarge:
        return
    assert len(deframer.buffer) <= 1000


SEEDS = [sample(n) for n in GOOD_FILES if len(sample(n)) < 4000][:40]


@st.composite
def mutated_messages(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if op == "delete":
            del data[at:at + draw(st.integers(min_value=1, max_value=40))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=20) | st.sampled_from(
                [b"\r", b"|", b"^", b"\x0b", b"\x1c", b"\x1c\r", b"MSH|^~\\&|", b"BHS|^~\\&|\r", b"\x00", b"\xff"]))
        elif op == "replace" and at < len(data):
            data[at] = draw(st.integers(min_value=0, max_value=255))
        else:
            data += data[at:at + draw(st.integers(min_value=1, max_value=200))]
    return bytes(data)


def silent_ids(raw: bytes) -> set[str]:
    """MSH-10 of the well-formed messages in raw's frames whose MSH-15 asks for no answer when accepted."""
    deframer, ids = Deframer(len(raw) + 1), set()
    deframer.feed(raw)
    while (payload := deframer.next_frame()) is not None:
        try:
            ids |= {m.control_id for m in er7.parse_all(payload) if er7.ack_code(m, "AA") is None}
        except er7.Hl7Error:
            pass
    return ids


def exchange_all(port: int, raw: bytes) -> tuple[list[bytes], bool]:
    """Send raw bytes, half-close, read every answer frame until the listener closes (10 s at most)."""
    with Client(port, timeout=10) as client:
        client.send_raw(raw)
        client.sock.shutdown(socket.SHUT_WR)
        answers = []
        while True:
            try:
                answers.append(client.read_frame())
            except EOFError:
                return answers, True
            except ConnectionResetError:
                return answers, True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(
    st.binary(max_size=500),                                    # noise, maybe with framing bytes
    mutated_messages().map(frame),                              # a damaged real message, framed
    st.tuples(mutated_messages(), st.binary(max_size=30)).map(lambda t: START_BLOCK + t[0] + t[1]),
))
def test_listener_survives_random_and_mutated_input_without_partial_store(listener, store, raw):
    before = {m.dedup_key for m in stored(store)}
    answers, closed = exchange_all(listener.port, raw)  # a hang would raise socket.timeout here
    assert closed
    accepted: set[str] = set()
    for answer in answers:
        for code, msa2, text in acks(answer):  # every answer is a well-formed ACK
            assert code in ("AA", "AR", "AE", "CA", "CR", "CE")
            assert code in ("AA", "CA") or text
            if code in ("AA", "CA"):
                accepted.add(msa2)
    after = {m.dedup_key for m in stored(store)}
    # nothing stored that was not acknowledged AA/CA, but for senders that asked for no answer (MSH-15)
    assert after - before <= accepted | silent_ids(raw)
    assert accepted <= after           # and everything acknowledged is stored
    # The listener still serves.
    assert acks(exchange_all(listener.port, frame(adt("ALIVE")))[0][0])[0][0] == "AA"


# --- configuration ----------------------------------------------------------------------------

def test_bad_mllp_senders_and_networks_are_refused_with_file_and_line(tmp_path):
    from courier.app.settings import ConfigError
    from courier.app.config import load_routing

    path = tmp_path / "courier.yml"
    path.write_text("sources:\n"
                    "  lab:\n"
                    "    mllp_allow: [10.0.0.0/33]\n"
                    "    mllp_senders: ['LAB^HOSP^X', 'LAB|HOSP', 'ok^*']\n"
                    "destinations: {}\nroutes: []\n")
    with pytest.raises(ConfigError) as err:
        load_routing(path, {})
    problems = err.value.problems
    assert any(p.startswith(f"{path}:3: sources.lab.mllp_allow.0:") for p in problems), problems
    senders = [p[len(str(path)):] for p in problems if ": sources.lab.mllp_senders." in p]
    assert [p.split(": ")[0:2] for p in senders] == [[":4", "sources.lab.mllp_senders.0"],
                                                     [":4", "sources.lab.mllp_senders.1"]]
    assert "use APP or APP^FACILITY" in senders[0]
