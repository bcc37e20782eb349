"""HTTPS destinations with a `tls` block: a private CA and a client certificate (mutual TLS).

A real HTTPS server on loopback (http.server in a thread, TLS 1.2+ from the ssl module) that
requires a client certificate from a throwaway CA (tests/support/tls_ca.py); the adapter is the client.
The config side (where `tls` is allowed) is tested through load_routing, as in test_config.py.
The end to end run (config -> the worker's run_batch -> mutual TLS) stores in PostgreSQL:
tests/integration/test_http_tls.py.
"""
from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from courier.adapters import Outgoing, TemporaryError
from courier.adapters.base import TlsFiles
from courier.adapters.http import HttpAdapter
from courier.app.config import load_routing
from tests.unit.test_config import BASE, line_of, problems_of, write
from tests.support.tls_ca import ThrowawayCA

BODY = b'{"type": "service.completed", "id": "tls-1", "data": {"n": 1}}'


def outgoing(delivery_id: str = "dlv-tls-1") -> Outgoing:
    return Outgoing(delivery_id=delivery_id, message_id="msg-1", correlation_id="corr-1", body=BODY,
                    content_type="application/json", message_type="service.completed")


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        peer = self.connection.getpeercert()
        self.server.received.append((body, dict(x[0] for x in peer["subject"]).get("commonName") if peer else None))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class MutualTlsServer:
    """An HTTPS server requiring a client certificate signed by `client_ca`; records (body, client CN)."""

    def __init__(self, server_cert, client_ca):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(server_cert.cert), str(server_cert.key))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.received = []
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/charges?tenant=a"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    @property
    def received(self) -> list:
        return list(self.httpd.received)


@pytest.fixture
def ca(tmp_path):
    return ThrowawayCA(tmp_path / "ca")


@pytest.fixture
def server(ca):
    with MutualTlsServer(ca.server(), ca.cert) as s:
        yield s


# --- the adapter ------------------------------------------------------------------------------


def test_private_ca_and_client_certificate_deliver(ca, server):
    client = ca.client("courier-worker")
    with HttpAdapter(server.url, tls=TlsFiles(ca=str(ca.cert), cert=str(client.cert), key=str(client.key))) as a:
        sent = a.send(outgoing())
    assert sent.status_code == 201
    assert server.received == [(BODY, "courier-worker")]


def test_cert_file_holding_both_certificate_and_key(ca, server, tmp_path):
    client = ca.client("courier-worker")
    both = tmp_path / "client-both.pem"
    both.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    with HttpAdapter(server.url, tls=TlsFiles(ca=str(ca.cert), cert=str(both))) as a:
        assert a.send(outgoing()).status_code == 201
    assert server.received == [(BODY, "courier-worker")]


def test_without_client_certificate_is_a_temporary_tls_failure(ca, server):
    with HttpAdapter(server.url, tls=TlsFiles(ca=str(ca.cert))) as a:
        with pytest.raises(TemporaryError, match="^TLS: .*client certificate") as info:
            a.send(outgoing())
    assert info.value.status_code is None
    assert server.received == []


def test_client_certificate_from_another_ca_is_a_temporary_tls_failure(ca, server, tmp_path):
    stranger = ThrowawayCA(tmp_path / "other", name="Other CA").client("stranger")
    with HttpAdapter(server.url, tls=TlsFiles(ca=str(ca.cert), cert=str(stranger.cert), key=str(stranger.key))) as a:
        with pytest.raises(TemporaryError, match="^TLS: .*tls.cert and tls.key"):
            a.send(outgoing())
    assert server.received == []


def test_wrong_ca_does_not_trust_the_destination(ca, server, tmp_path):
    other = ThrowawayCA(tmp_path / "other", name="Other CA")
    client = ca.client()
    with HttpAdapter(server.url, tls=TlsFiles(ca=str(other.cert), cert=str(client.cert), key=str(client.key))) as a:
        with pytest.raises(TemporaryError, match="^TLS: the destination's certificate is not accepted: "):
            a.send(outgoing())
    assert server.received == []


def test_without_ca_the_system_store_does_not_trust_a_private_ca(ca, server, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    client = ca.client()
    with HttpAdapter(server.url, tls=TlsFiles(cert=str(client.cert), key=str(client.key))) as a:
        with pytest.raises(TemporaryError, match="^TLS: the destination's certificate is not accepted: "):
            a.send(outgoing())
    assert server.received == []


@pytest.mark.parametrize("missing", ["ca", "cert", "key"])
def test_missing_file_is_a_temporary_tls_failure_naming_it(ca, server, tmp_path, missing):
    client = ca.client()
    real = {"ca": ca.cert, "cert": client.cert, "key": client.key}
    files = {name: str(path) for name, path in real.items()}
    files[missing] = str(tmp_path / "gone.pem")
    with HttpAdapter(server.url, tls=TlsFiles(**files)) as a:
        with pytest.raises(TemporaryError, match=f"^TLS: {missing}={tmp_path}/gone.pem: cannot read "
                                                 r"\(No such file or directory"):
            a.send(outgoing())
        # Files are read at send time: once the file is there, the same adapter delivers.
        (tmp_path / "gone.pem").write_bytes(real[missing].read_bytes())
        assert a.send(outgoing("dlv-tls-2")).status_code == 201
    assert [body for body, _ in server.received] == [BODY]


def test_key_without_cert_and_tls_on_plain_http_are_refused():
    with pytest.raises(ValueError, match="key needs cert"):
        TlsFiles(key="/tls/client.key")
    with pytest.raises(ValueError, match="https:// URLs only"):
        HttpAdapter("http://127.0.0.1:9/", tls=TlsFiles(ca="/tls/ca.pem"))


# --- the config -------------------------------------------------------------------------------

BILLING_URL = '    url: "http://127.0.0.1:9/billing"\n'


def with_tls(url_line: str, tls_lines: str, destination: str = "billing") -> str:
    """BASE with the billing destination's URL replaced and a tls block after it."""
    assert BASE.count(BILLING_URL) == 1
    text = BASE.replace(BILLING_URL, url_line + tls_lines)
    if destination == "erp":  # move the block to the file:// destination instead
        text = BASE.replace('    url: "file:///tmp/courier-test-erp"\n',
                            '    url: "file:///tmp/courier-test-erp"\n' + tls_lines)
    return text


def test_tls_block_is_loaded_for_https(tmp_path):
    text = with_tls('    url: "https://erp.hospital.local/billing"\n',
                    "    tls:\n      ca: /etc/courier/erp-ca.pem\n      cert: /etc/courier/client.pem\n"
                    "      key: /etc/courier/client.key\n")
    # The files need not exist where the config is checked (the web host): workers read them.
    routing = load_routing(write(tmp_path, text), {})
    assert routing.destinations["billing"].tls == TlsFiles("/etc/courier/erp-ca.pem", "/etc/courier/client.pem",
                                                           "/etc/courier/client.key")
    assert routing.destinations["erp"].tls is None


@pytest.mark.parametrize("destination, scheme", [("billing", "http"), ("erp", "file")])
def test_tls_on_a_destination_that_is_not_https_is_refused(tmp_path, destination, scheme):
    text = with_tls(BILLING_URL, "    tls:\n      ca: /etc/courier/ca.pem\n", destination)
    path = write(tmp_path, text)
    problems = problems_of(path)
    lines = [i for i, line in enumerate(text.splitlines(), 1) if line == "    tls:"]
    assert problems == [f"{path}:{lines[0]}: destinations.{destination}.tls: tls applies to https:// URLs only, "
                        f"not {scheme}:// (mllps:// takes ca=, cert= and key= in its URL)"]


def test_tls_on_mllp_is_refused(tmp_path):
    text = with_tls('    url: "mllp://10.0.0.5:2575"\n', "    tls: {ca: /etc/courier/ca.pem}\n")
    text = text.replace("    transform: passthrough\n", "")
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line_of(text, 'tls: {ca')}: destinations.billing.tls: tls applies to "
                                  "https:// URLs only, not mllp://")


def test_key_without_cert_is_refused_naming_the_line(tmp_path):
    text = with_tls('    url: "https://erp.hospital.local/billing"\n', "    tls:\n      key: /etc/courier/client.key\n")
    path = write(tmp_path, text)
    # Reported at the tls line: courier.app.settings._flatten reads a "key" level as a Dict field's keys.
    assert problems_of(path) == [f"{path}:{line_of(text, 'tls:')}: destinations.billing.tls: "
                                 "key needs cert (the client certificate it belongs to)"]
