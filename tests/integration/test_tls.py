"""TLS on Courier's two servers, on loopback with a throwaway CA (tests/support/tls_ca.py).

HTTP: the Procfile's `web` command (gunicorn with deploy/gunicorn.conf.py) as a real process,
TLS from COURIER_TLS_*; requests as the client. MLLP: the listener in a thread with the
settings `courier mllp` reads from COURIER_MLLP_TLS_*, a raw socket client. Both: a client
that trusts another CA fails, client certificates are required when a client CA is set, TLS
1.1 is refused, and half a setting stops the process at start. (The MLLP adapter's mllps://
is tested in tests/integration/test_legacy_adapters.py.)
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from courier.app import tls
from courier.app.hl7.listener import listener_options
from courier.app.store.models import Message
from courier.app.settings import ConfigError
from bench.infra import free_port, procfile_command
from tests.support.mllp_peers import Client, listener_thread
from tests.support.processes import VENV_BIN, running_courier
from tests.integration.test_metrics import _shell, _stop, _up, wait_for
from tests.integration import test_mllp_listener
from tests.integration.test_mllp_listener import HL7_SAMPLES, acks, adt, write_mllp_config
from tests.support.tls_ca import ThrowawayCA

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = HL7_SAMPLES / "microsoft-FHIR-Converter" / "ADT-A01-01.hl7"
EVENT = {"type": "service.completed", "id": "tls-1", "data": {"n": 1}}
mllp_settings = test_mllp_listener.mllp_settings  # the fixture: sources lab and pharmacy allowed from loopback


@pytest.fixture
def ca(tmp_path):
    return ThrowawayCA(tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path):
    """A CA nobody configured: what it signs must be refused."""
    return ThrowawayCA(tmp_path / "other-ca", name="Other CA")


def messages(store) -> int:
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(Message))


def client_context(ca_file, cert=None, *, tls11: bool = False) -> ssl.SSLContext:
    """A client context trusting `ca_file`, with a client certificate if given; tls11: at most TLS 1.1."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if tls11:
        with warnings.catch_warnings():  # TLSVersion.TLSv1_1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so only the server's minimum can refuse
    return context


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version a bare handshake with 127.0.0.1:port agrees on (raises ssl.SSLError if refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            return tls_sock.version()


# --- courier.app.tls: the settings both servers read ----------------------------------------------------

@pytest.mark.parametrize("names, message", [
    (("CERT",), "COURIER_TLS_CERT is set but COURIER_TLS_KEY is not"),
    (("KEY",), "COURIER_TLS_KEY is set but COURIER_TLS_CERT is not"),
    (("CLIENT_CA",), "COURIER_TLS_CLIENT_CA is set but COURIER_TLS_CERT and COURIER_TLS_KEY are not"),
])
def test_half_a_tls_setting_is_refused(ca, names, message):
    server = ca.server()
    files = {"CERT": server.cert, "KEY": server.key, "CLIENT_CA": ca.cert}
    with pytest.raises(ConfigError) as err:
        tls.from_env("COURIER_TLS", {f"COURIER_TLS_{n}": str(files[n]) for n in names})
    assert message in err.value.problems[0]


def test_unusable_files_are_named(ca, other_ca, tmp_path):
    server, stranger = ca.server(), other_ca.server()
    with pytest.raises(ConfigError, match="COURIER_TLS_KEY=/nowhere/key.pem: the file does not exist"):
        tls.from_env("COURIER_TLS", {"COURIER_TLS_CERT": str(server.cert), "COURIER_TLS_KEY": "/nowhere/key.pem"})
    with pytest.raises(ConfigError, match="not a usable certificate and private key .*KEY_VALUES_MISMATCH"):
        tls.from_env("COURIER_TLS", {"COURIER_TLS_CERT": str(server.cert), "COURIER_TLS_KEY": str(stranger.key)})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"COURIER_TLS_CLIENT_CA={junk}: not a usable PEM CA bundle"):
        tls.from_env("COURIER_TLS", {"COURIER_TLS_CERT": str(server.cert), "COURIER_TLS_KEY": str(server.key),
                                     "COURIER_TLS_CLIENT_CA": str(junk)})
    assert tls.from_env("COURIER_TLS", {}) is None


# --- HTTP: gunicorn as the Procfile runs it ----------------------------------------------------

@pytest.fixture
def web(tmp_path, store, queue_prefix):
    """start(**env) runs the Procfile's web command with extra environment; yields (port, ingest headers)."""
    started = []
    with running_courier(tmp_path, store, queue_prefix, {"billing": "http://127.0.0.1:9/billing"}) as courier:
        def start(**env):
            port = free_port()
            log = tmp_path / f"web-{port}.log"
            proc = _shell(procfile_command("web"), {**courier.procs.env, "PORT": str(port),
                                                   "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                                   **env}, log)
            started.append(proc)
            return port, proc, log
        try:
            yield start, courier.headers
        finally:
            for proc in started:
                if proc.poll() is None:
                    _stop(proc)


def wait_https(port: int, proc, log: Path, ca_file) -> None:
    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return requests.get(f"https://127.0.0.1:{port}/healthz", verify=str(ca_file), timeout=5).ok
        except requests.exceptions.ConnectionError:
            return False
    wait_for(up, "gunicorn answers /healthz over HTTPS", log.read_text)


def test_https_api_with_a_server_certificate(web, ca, other_ca, store):
    start, headers = web
    server = ca.server()
    port, proc, log = start(COURIER_TLS_CERT=str(server.cert), COURIER_TLS_KEY=str(server.key))
    wait_https(port, proc, log, ca.cert)
    codes = [requests.post(f"https://{host}:{port}/api/v1/messages", json=EVENT, headers=headers,
                           verify=str(ca.cert), timeout=10).status_code
             for host in ("127.0.0.1", "localhost")]  # both names of the certificate
    assert codes == [202, 200] and messages(store) == 1  # the second post is the first's duplicate
    with pytest.raises(requests.exceptions.SSLError):  # a client that trusts another CA refuses us
        requests.post(f"https://127.0.0.1:{port}/api/v1/messages", json={**EVENT, "id": "tls-2"},
                      headers=headers, verify=str(other_ca.cert), timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP on the HTTPS port gets nowhere
        requests.post(f"http://127.0.0.1:{port}/api/v1/messages", json={**EVENT, "id": "tls-3"},
                      headers=headers, timeout=10)
    with pytest.raises(ssl.SSLError):
        handshake(port, client_context(ca.cert, tls11=True))
    assert handshake(port, client_context(ca.cert)) in ("TLSv1.2", "TLSv1.3")
    assert messages(store) == 1


def test_the_procfile_web_logs_each_request_once(web, store):
    """gunicorn's default logging config gave the root logger a stdout handler beside the app's
    own: every application line, request lines included, was printed twice."""
    start, headers = web
    port, proc, log = start()
    wait_for(lambda: _up(port), "gunicorn answers", log.read_text)
    r = requests.post(f"http://127.0.0.1:{port}/api/v1/messages", json=EVENT, headers=headers, timeout=10)
    assert r.status_code == 202, r.text
    _stop(proc)  # flushes both streams
    cid = r.headers["X-Correlation-ID"]
    lines = [line for line in log.read_text().splitlines() if cid in line and '"courier.web"' in line]
    assert len(lines) == 1, lines


def test_https_api_requires_client_certificates_when_a_client_ca_is_set(web, ca, other_ca, store):
    start, headers = web
    server, client, stranger = ca.server(), ca.client(), other_ca.client("stranger")
    port, proc, log = start(COURIER_TLS_CERT=str(server.cert), COURIER_TLS_KEY=str(server.key),
                            COURIER_TLS_CLIENT_CA=str(ca.cert))
    url = f"https://127.0.0.1:{port}/api/v1/messages"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            requests.get(f"https://127.0.0.1:{port}/healthz", verify=str(ca.cert),
                         cert=(str(client.cert), str(client.key)), timeout=5)
            return True
        except requests.exceptions.ConnectionError:
            return False
    wait_for(up, "gunicorn answers over mutual TLS", log.read_text)
    for cert in (None, (str(stranger.cert), str(stranger.key))):  # none, and one from a CA not configured
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError, or reset after the alert
            requests.post(url, json=EVENT, headers=headers, verify=str(ca.cert), cert=cert, timeout=10)
    assert messages(store) == 0
    r = requests.post(url, json=EVENT, headers=headers, verify=str(ca.cert),
                      cert=(str(client.cert), str(client.key)), timeout=10)
    assert r.status_code == 202, r.text
    assert messages(store) == 1


@pytest.mark.parametrize("names, missing", [(("CERT",), "COURIER_TLS_KEY"), (("KEY",), "COURIER_TLS_CERT"),
                                            (("CLIENT_CA",), "COURIER_TLS_CERT")])
def test_gunicorn_refuses_to_start_with_half_a_tls_setting(web, ca, names, missing):
    start, _ = web
    server = ca.server()
    files = {"CERT": server.cert, "KEY": server.key, "CLIENT_CA": ca.cert}
    port, proc, log = start(**{f"COURIER_TLS_{n}": str(files[n]) for n in names})
    assert proc.wait(timeout=60) != 0
    output = log.read_text()
    assert "courier web: cannot start" in output and missing in output, output
    with pytest.raises(OSError):  # and it never listened, in plain HTTP or otherwise
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# --- MLLP: the listener ----------------------------------------------------------------------------

def mllp_tls(ca, client_ca: bool = False, **env) -> dict:
    """The listener options `courier mllp` would read from this environment."""
    server = ca.server()
    env = {"COURIER_MLLP_TLS_CERT": str(server.cert), "COURIER_MLLP_TLS_KEY": str(server.key), **env}
    if client_ca:
        env["COURIER_MLLP_TLS_CLIENT_CA"] = str(ca.cert)
    return listener_options(env)


def test_mllp_over_tls_answers_aa_after_commit(mllp_settings, store, ca, other_ca, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    payload = SAMPLE.read_bytes()
    with listener_thread(mllp_settings, store, **mllp_tls(ca)) as listener:
        with Client(listener.port, tls=client_context(ca.cert)) as client:
            code, msa2, _ = acks(client.exchange(payload))[0]
            assert code == "AA" and messages(store) == 1
            big = adt("TLS-BIG").replace(b"PID|", b"NTE|1||" + b"x" * 1_000_000 + b"\rPID|")
            assert acks(client.exchange(big))[0][:2] == ("AA", "TLS-BIG")  # many TLS records, one frame
        with pytest.raises(ssl.SSLCertVerificationError):  # a client trusting another CA refuses us
            Client(listener.port, tls=client_context(other_ca.cert))
        with pytest.raises(ssl.SSLError):
            handshake(listener.port, client_context(ca.cert, tls11=True))
        assert handshake(listener.port, client_context(ca.cert)) in ("TLSv1.2", "TLSv1.3")
    with store.session() as session:
        assert sorted(m.dedup_key for m in session.scalars(select(Message))) == sorted([msa2, "TLS-BIG"])
    assert any("(TLS)" in r.getMessage() for r in caplog.records)  # the start line says so


def test_plain_mllp_to_a_tls_listener_stores_nothing(mllp_settings, store, ca, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with listener_thread(mllp_settings, store, **mllp_tls(ca)) as listener:
        with Client(listener.port) as plain:
            plain.send(adt("PLAIN-1"))
            with pytest.raises((EOFError, ConnectionResetError)):
                plain.read_frame()  # no ACK: the connection is closed
        with Client(listener.port, tls=client_context(ca.cert)) as client:  # the listener serves on
            assert acks(client.exchange(adt("TLS-1")))[0][:2] == ("AA", "TLS-1")
    with store.session() as session:
        assert [m.dedup_key for m in session.scalars(select(Message))] == ["TLS-1"]
    failed = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert failed and "127.0.0.1" in failed[0] and "PLAIN-1" not in failed[0]


def test_mllp_client_certificates_required_when_a_client_ca_is_set(mllp_settings, store, ca, other_ca, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    with listener_thread(mllp_settings, store, **mllp_tls(ca, client_ca=True)) as listener:
        for cert in (None, other_ca.client("stranger")):
            # TLS 1.3: the client's side of the handshake may finish before the server's verdict,
            # which then arrives as an alert (SSLError) or a closed connection at the first read.
            with pytest.raises((ssl.SSLError, EOFError, ConnectionResetError, BrokenPipeError)):
                with Client(listener.port, tls=client_context(ca.cert, cert)) as client:
                    client.exchange(adt("NO-CERT"))
        assert messages(store) == 0
        with Client(listener.port, tls=client_context(ca.cert, ca.client())) as client:
            assert acks(client.exchange(adt("WITH-CERT")))[0][:2] == ("AA", "WITH-CERT")
    assert messages(store) == 1
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


def test_a_silent_client_cannot_hold_a_slot_past_the_handshake_timeout(mllp_settings, store, ca, caplog):
    caplog.set_level(logging.INFO, "courier.mllp")
    options = mllp_tls(ca, COURIER_MLLP_TLS_HANDSHAKE_TIMEOUT="500ms", COURIER_MLLP_MAX_PER_PEER="1")
    with listener_thread(mllp_settings, store, **options) as listener:
        with Client(listener.port) as silent:  # connects, never says hello: holds the one slot
            assert silent.closed_by_server(timeout=10)
        with Client(listener.port, tls=client_context(ca.cert)) as client:  # the slot is free again
            assert acks(client.exchange(adt("AFTER-SILENT")))[0][:2] == ("AA", "AFTER-SILENT")
    assert any("no TLS handshake within 0.5s" in r.getMessage() for r in caplog.records)


def test_renewed_files_are_used_without_a_restart_and_a_half_written_renewal_is_not(mllp_settings, store, ca,
                                                                                     other_ca, caplog):
    options = mllp_tls(ca)
    files = options["tls"]
    with listener_thread(mllp_settings, store, **options) as listener:
        with Client(listener.port, tls=client_context(ca.cert)) as client:
            assert acks(client.exchange(adt("OLD-CERT")))[0][0] == "AA"
        renewed = other_ca.server("renewed")
        Path(files.cert).write_bytes(renewed.cert.read_bytes())  # the key not yet: they do not match
        with Client(listener.port, tls=client_context(ca.cert)) as client:  # still the old certificate
            assert acks(client.exchange(adt("HALF-RENEWED")))[0][0] == "AA"
        assert any("cannot be used" in r.getMessage() and "KEY_VALUES_MISMATCH" in r.getMessage()
                   for r in caplog.records)
        Path(files.key).write_bytes(renewed.key.read_bytes())
        with Client(listener.port, tls=client_context(other_ca.cert)) as client:  # the new one, no restart
            assert acks(client.exchange(adt("NEW-CERT")))[0][0] == "AA"
        with pytest.raises(ssl.SSLCertVerificationError):
            Client(listener.port, tls=client_context(ca.cert))
    assert messages(store) == 3


def test_courier_mllp_refuses_to_start_with_half_a_tls_setting(tmp_path, ca, store):
    server = ca.server()
    env = {**os.environ, "COURIER_MLLP_TLS_CERT": str(server.cert), "MLLP_PORT": str(free_port()),
           "DATABASE_URL": store.url, "COURIER_CONFIG": str(write_mllp_config(tmp_path / "courier.yml", tmp_path))}
    env.pop("COURIER_MLLP_TLS_KEY", None)
    out = subprocess.run([str(VENV_BIN / "courier"), "mllp", "--host", "127.0.0.1"], env=env, cwd=ROOT,
                         capture_output=True, timeout=60)
    assert out.returncode != 0
    assert b"COURIER_MLLP_TLS_CERT is set but COURIER_MLLP_TLS_KEY is not" in out.stderr, out.stderr


def test_mllp_settings_from_the_environment(ca):
    options = mllp_tls(ca, client_ca=True, COURIER_MLLP_MAX_CONNECTIONS="50", COURIER_MLLP_MAX_PER_PEER="5")
    assert (options["max_connections"], options["max_per_peer"], options["handshake_timeout"]) == (50, 5, 10.0)
    assert options["tls"].client_ca == str(ca.cert)
    assert options["tls"].context().verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError) as err:
        listener_options({"COURIER_MLLP_MAX_PER_PEER": "0", "COURIER_MLLP_MAX_CONNECTIONS": "many",
                          "COURIER_MLLP_TLS_KEY": "/k.pem"})
    assert err.value.problems == [
        "environment: COURIER_MLLP_MAX_CONNECTIONS='many' is not an integer",
        "environment: COURIER_MLLP_MAX_PER_PEER='0' must be above zero",
        "environment: COURIER_MLLP_TLS_KEY is set but COURIER_MLLP_TLS_CERT is not: TLS needs both the "
        "certificate and its private key (set neither to serve without TLS)",
    ]
