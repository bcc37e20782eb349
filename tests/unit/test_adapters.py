"""Adapters against real peers on loopback: an HTTP server, a directory.

The contract tests at the top run against every adapter; adding an adapter
means adding one peer fixture and its name to PEERS.
"""
from __future__ import annotations

import email.utils
import hashlib
import hmac
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import pytest

from courier import adapters
from courier.adapters import Outgoing, PermanentError, Sent, TemporaryError, UnknownScheme
from courier.adapters.file import FileAdapter
from courier.adapters.http import HttpAdapter, parse_retry_after

from tests.support.sinks import HttpSink

HL7 = (b"MSH|^~\\&|LAB|HOSP|BILL|HOSP|20240101120000||DFT^P03|MSG0001|P|2.5\r"
       b"PID|1||12345^^^HOSP^MR||M\xc3\xbcller^J\xc3\xbcrgen\r")


def outgoing(delivery_id: str = "dlv-0001", body: bytes = HL7, **kw) -> Outgoing:
    fields = dict(delivery_id=delivery_id, message_id="msg-1", correlation_id="corr-1", body=body,
                  content_type="application/hl7-v2", message_type="HL7v2:DFT^P03")
    fields.update(kw)
    return Outgoing(**fields)


@pytest.fixture
def sink():
    with HttpSink(path="/hook") as s:
        yield s


# --- contract: every adapter ------------------------------------------------


@dataclass
class Peer:
    """A live destination for one adapter, and ways to inspect and break it."""

    url: str
    down_url: str                               # same kind of destination, unreachable
    keys: Callable[[], list[str]]               # idempotency keys the peer holds or saw, one per copy
    bodies: Callable[[str], list[bytes]]        # bodies the peer holds or saw for one key
    refusing: Callable[[Outgoing], Outgoing]    # arrange a refusal; returns what to send
    dedups: bool                                # a redelivery leaves one copy (else the peer sees two)


@pytest.fixture
def http_peer(sink, closed_port):
    def refusing(out):
        sink.respond((400, {"Content-Type": "text/plain"}, b"invalid charge code"))
        return out

    return Peer(
        url=sink.url,
        down_url=f"http://127.0.0.1:{closed_port}/hook",
        keys=lambda: [r.headers.get("idempotency-key") for r in sink.received],
        bodies=lambda key: [r.body for r in sink.received if r.headers.get("idempotency-key") == key],
        refusing=refusing,
        dedups=False,
    )


@pytest.fixture
def file_peer(tmp_path):
    outbox = tmp_path / "outbox"
    outbox.mkdir()

    def files():
        return sorted(p for p in outbox.iterdir() if not p.name.startswith("."))

    return Peer(
        url=outbox.as_uri(),
        down_url=(tmp_path / "not-mounted").as_uri(),
        keys=lambda: [p.name.split(".")[0] for p in files()],
        bodies=lambda key: [p.read_bytes() for p in files() if p.name.split(".")[0] == key],
        refusing=lambda out: replace(out, delivery_id="../escaped"),
        dedups=True,
    )


PEERS = ["http_peer", "file_peer"]


@pytest.fixture(params=PEERS)
def peer(request) -> Peer:
    return request.getfixturevalue(request.param)


def test_contract_send_delivers_exact_body(peer):
    out = outgoing()
    with adapters.open_adapter(peer.url, timeout=5) as adapter:
        result = adapter.send(out)
    assert isinstance(result, Sent) and result.detail
    assert peer.bodies(out.delivery_id) == [HL7]


@pytest.fixture
def keyed_peer(peer) -> Peer:
    """A peer that sees the delivery id (all here; an MLLP peer sees only the message)."""
    return peer


def test_contract_redelivery_keeps_the_idempotency_key(keyed_peer):
    out = outgoing("dlv-again")
    with adapters.open_adapter(keyed_peer.url, timeout=5) as adapter:
        adapter.send(out)
        adapter.send(out)
    keys = keyed_peer.keys()
    assert set(keys) == {"dlv-again"}
    assert len(keys) == (1 if keyed_peer.dedups else 2)
    assert all(body == HL7 for body in keyed_peer.bodies("dlv-again"))


def test_contract_unreachable_peer_is_temporary(peer):
    with adapters.open_adapter(peer.down_url, timeout=5) as adapter:
        with pytest.raises(TemporaryError) as err:
            adapter.send(outgoing())
    assert err.value.detail
    assert "Müller" not in err.value.detail
    assert peer.keys() == []


def test_contract_refusal_is_permanent(peer):
    with adapters.open_adapter(peer.url, timeout=5) as adapter:
        with pytest.raises(PermanentError) as err:
            adapter.send(peer.refusing(outgoing()))
    assert err.value.detail
    assert "Müller" not in err.value.detail


# --- registry ---------------------------------------------------------------


@pytest.mark.parametrize("url, scheme", [
    ("https://billing.example/api", "https"),
    ("HTTP://BILLING.EXAMPLE/", "http"),
    ("file:///var/spool/out", "file"),
    ("sql+postgresql://courier@db/erp?table=charges", "sql"),
    ("sql+sqlite:////tmp/x.db?table=t", "sql"),
    ("mllp://10.0.0.5:2575", "mllp"),
    ("amqp://guest:guest@localhost:5672//", "amqp"),
])
def test_scheme_of(url, scheme):
    assert adapters.scheme_of(url) == scheme


@pytest.mark.parametrize("url", ["billing.example/api", "", "://x", "/var/spool"])
def test_scheme_of_without_scheme_is_a_value_error(url):
    with pytest.raises(ValueError, match="no scheme"):
        adapters.scheme_of(url)


@pytest.mark.parametrize("url, cls", [
    ("http://h/", HttpAdapter), ("https://h/", HttpAdapter), ("HTTPS://h/", HttpAdapter),
    ("file:///d", FileAdapter),
])
def test_resolve(url, cls):
    assert adapters.resolve(url) is cls


def test_every_scheme_resolves_to_an_adapter_that_claims_it():
    for scheme in adapters.SCHEMES:
        cls = adapters.resolve(f"{scheme}://x")
        assert issubclass(cls, adapters.Adapter)
        assert scheme in cls.scheme


def test_unknown_scheme_names_it_and_the_supported_ones():
    with pytest.raises(UnknownScheme) as err:
        adapters.resolve("ftp://files.example/in")
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "'ftp'" in message
    for scheme in ("http", "https", "file"):
        assert scheme in message
    assert err.value.scheme == "ftp"


def test_importing_adapters_is_cheap():
    code = "import adapters, sys; print('requests' in sys.modules, 'courier.adapters.http' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["False", "False"]


def test_open_adapter_passes_options(sink):
    adapter = adapters.open_adapter(sink.url, timeout=3.5, secret="k")
    assert isinstance(adapter, HttpAdapter)
    assert (adapter.timeout, adapter.secret) == (3.5, "k")
    adapter.close()


@pytest.mark.parametrize("url, message", [
    ("http://", "needs a host"),
    ("https:///path/only", "needs a host"),
    ("http://host:99999/", "invalid port"),
    ("http://host:abc/", "invalid port"),
    ("http://host:0/", "invalid port"),
    ("http://bill ing.example/", "spaces"),
    ("http://billing.example/a\nb", "control characters"),
    ("file://relative/dir", "three slashes"),
    ("file://", "absolute directory"),
    ("file:relative/dir", "absolute directory"),
    ("file:///d?suffix=/../x", "suffix"),
    ("file:///d?suffix=xml", "suffix"),
    ("file:///d?sufix=.xml", "unknown file URL option"),
    ("file:///d#frag", "fragment"),
])
def test_check_url_refuses_unusable_urls(url, message):
    cls = adapters.resolve(url)
    with pytest.raises(ValueError, match=message):
        cls.check_url(url)
    with pytest.raises(ValueError, match=message):
        adapters.open_adapter(url)


@pytest.mark.parametrize("url", [
    "http://billing.example/api/charges?tenant=a&x=1",
    "https://user:pass@billing.example:8443/",
    "http://[::1]:8080/hook",
    "file:///var/spool/out",
    "file://localhost/var/spool/out",
    "file:///var/spool/out%20box?suffix=.xml",
])
def test_check_url_accepts_usable_urls(url):
    adapters.resolve(url).check_url(url)


def test_check_url_rejects_other_schemes():
    with pytest.raises(ValueError, match="not file"):
        HttpAdapter.check_url("file:///d")


def test_repr_hides_credentials():
    adapter = HttpAdapter("https://user:hunter2@billing.example/api?token=s3cret")
    assert "hunter2" not in repr(adapter) and "s3cret" not in repr(adapter)
    assert "billing.example/api" in repr(adapter)


# --- HTTP -------------------------------------------------------------------


@pytest.mark.parametrize("status, expected", [
    (200, Sent), (201, Sent), (202, Sent), (204, Sent),
    (301, PermanentError), (302, PermanentError), (304, PermanentError),
    (400, PermanentError), (401, PermanentError), (403, PermanentError), (404, PermanentError),
    (409, PermanentError), (413, PermanentError), (422, PermanentError),
    (408, TemporaryError), (425, TemporaryError), (429, TemporaryError),
    (500, TemporaryError), (502, TemporaryError), (503, TemporaryError), (504, TemporaryError),
])
def test_http_status_classification(sink, status, expected):
    sink.status = status
    with HttpAdapter(sink.url, timeout=5) as adapter:
        if expected is Sent:
            result = adapter.send(outgoing())
            assert result == Sent(detail=f"HTTP {status}", status_code=status)
        else:
            with pytest.raises(expected) as err:
                adapter.send(outgoing())
            assert err.value.status_code == status
            assert err.value.detail.startswith(f"HTTP {status}")
    assert len(sink.received) == 1  # one attempt, no retries or redirects inside the adapter


def test_http_proxy_from_the_environment_is_honoured(sink, closed_port, monkeypatch):
    """Read once when the adapter is made: a proxy that refuses makes the send fail; NO_PROXY skips it."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with HttpAdapter(sink.url, timeout=5) as adapter, pytest.raises(TemporaryError):
        adapter.send(outgoing())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with HttpAdapter(sink.url, timeout=5) as adapter:
        assert adapter.send(outgoing()).status_code == 200
    assert len(sink.received) == 1


def test_http_request_headers_and_body(sink):
    out = outgoing("dlv-hdr", body=b'{"type":"service.completed"}', content_type="application/json",
                   correlation_id="corr-42")
    with HttpAdapter(sink.url) as adapter:
        adapter.send(out)
    [got] = sink.received
    assert got.method == "POST" and got.path == "/hook"
    assert got.body == b'{"type":"service.completed"}'
    assert got.headers["idempotency-key"] == "dlv-hdr"
    assert got.headers["x-correlation-id"] == "corr-42"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("courier/")
    assert "x-courier-signature" not in got.headers


def test_http_signature_verifies(sink):
    secret = "whsec-7f3a"
    with HttpAdapter(sink.url, secret=secret) as adapter:
        adapter.send(outgoing())
    [got] = sink.received
    fields = dict(part.split("=", 1) for part in got.headers["x-courier-signature"].split(","))
    assert set(fields) == {"t", "v1"}
    t = int(fields["t"])
    assert abs(t - got.time) < 5
    expected = hmac.new(secret.encode(), f"{t}.".encode() + got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    wrong = hmac.new(b"other", f"{t}.".encode() + got.body, hashlib.sha256).hexdigest()
    assert fields["v1"] != wrong


@pytest.mark.parametrize("field, value", [
    ("correlation_id", "c1\r\nX-Injected: 1"), ("correlation_id", "caf\u20ac"), ("delivery_id", ""),
    ("content_type", "application/json\n"),
])
def test_http_values_that_cannot_be_headers_are_permanent(sink, field, value):
    with HttpAdapter(sink.url) as adapter, pytest.raises(PermanentError, match="HTTP header"):
        adapter.send(outgoing(**{field: value}))
    assert sink.received == []


def test_http_query_string_is_kept(sink):
    with HttpAdapter(sink.url + "?tenant=a&x=%2F1") as adapter:
        adapter.send(outgoing())
    assert sink.received[0].path == "/hook?tenant=a&x=%2F1"


def test_http_retry_after_seconds(sink):
    sink.respond((429, {"Retry-After": "7"}, b"slow down"))
    with HttpAdapter(sink.url) as adapter, pytest.raises(TemporaryError) as err:
        adapter.send(outgoing())
    assert err.value.retry_after == 7.0
    assert err.value.status_code == 429


def test_http_retry_after_date(sink):
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    sink.respond((503, {"Retry-After": when}, b""))
    with HttpAdapter(sink.url) as adapter, pytest.raises(TemporaryError) as err:
        adapter.send(outgoing())
    assert 115 <= err.value.retry_after <= 121


def test_http_retry_after_garbage_is_ignored(sink):
    sink.respond((503, {"Retry-After": "soon"}, b""), (503, {}, b""))
    with HttpAdapter(sink.url) as adapter:
        for _ in range(2):
            with pytest.raises(TemporaryError) as err:
                adapter.send(outgoing())
            assert err.value.retry_after is None


@pytest.mark.parametrize("value, seconds", [
    ("0", 0.0), ("120", 120.0), (" 30 ", 30.0), ("1.5", 1.5),
    ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),      # 30 s after `now` below
    ("Wednesday, 21-Oct-15 07:28:30 GMT", 30.0),  # obsolete RFC 850 form
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),       # already past
    (None, None), ("", None), ("soon", None), ("-5", None), ("5s", None), ("Wed, 99 Foo", None),
])
def test_parse_retry_after(value, seconds):
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now=now) == seconds


def test_http_detail_has_first_line_of_answer_not_our_body(sink):
    sink.respond((422, {"Content-Type": "text/plain"}, b"\n  field 'code' is invalid\nsecond line\n"),
                 (400, {}, b"x" * 5000))
    with HttpAdapter(sink.url) as adapter:
        with pytest.raises(PermanentError) as err:
            adapter.send(outgoing())
        assert err.value.detail == "HTTP 422: field 'code' is invalid"
        with pytest.raises(PermanentError) as err:
            adapter.send(outgoing())
        assert err.value.detail.startswith("HTTP 400: xxx")
        assert len(err.value.detail) <= 220
    assert "Müller" not in err.value.detail


def test_http_redirect_is_not_followed(sink):
    sink.respond((301, {"Location": sink.url + "/moved"}, b""))
    with HttpAdapter(sink.url) as adapter, pytest.raises(PermanentError) as err:
        adapter.send(outgoing())
    assert "/hook/moved" in err.value.detail and "not followed" in err.value.detail
    assert [r.path for r in sink.received] == ["/hook"]


def test_http_read_timeout_is_temporary(sink):
    sink.delay = 1.5
    started = time.monotonic()
    with HttpAdapter(sink.url, timeout=0.3) as adapter, pytest.raises(TemporaryError) as err:
        adapter.send(outgoing())
    assert time.monotonic() - started < 1.4
    assert "timeout" in err.value.detail
    assert err.value.status_code is None
    # The destination did get it: only the idempotency key makes the retry harmless.
    assert sink.count_by_key() == {"dlv-0001": 1}


def test_http_connection_refused_detail_hides_url(closed_port):
    with HttpAdapter(f"http://127.0.0.1:{closed_port}/hook?token=s3cret", timeout=5) as adapter:
        with pytest.raises(TemporaryError) as err:
            adapter.send(outgoing())
    assert "refused" in err.value.detail.lower()
    assert "s3cret" not in err.value.detail


def test_http_connection_closed_without_answer_is_temporary():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST, no answer

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        with HttpAdapter(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=5) as adapter:
            with pytest.raises(TemporaryError) as err:
                adapter.send(outgoing())
        assert err.value.detail.startswith("connection failed")
    finally:
        t.join(5)
        listener.close()


def test_http_unknown_host_is_temporary():
    with HttpAdapter("http://courier-test.invalid/", timeout=5) as adapter:
        with pytest.raises(TemporaryError, match="DNS lookup failed"):
            adapter.send(outgoing())


@pytest.mark.parametrize("first", [200, 204, 400, 503])
def test_http_connection_is_reused(sink, first):
    sink.respond((first, {}, b"some answer" if first != 204 else b""))
    with HttpAdapter(sink.url) as adapter:
        try:
            adapter.send(outgoing("dlv-a"))
        except (PermanentError, TemporaryError):
            pass
        adapter.send(outgoing("dlv-b"))
    a, b = sink.received
    assert a.client_port == b.client_port


def test_http_stopped_sink_is_down_even_for_kept_alive_connections(sink):
    with HttpAdapter(sink.url, timeout=5) as adapter:
        adapter.send(outgoing("dlv-1"))
        sink.stop()
        with pytest.raises(TemporaryError):
            adapter.send(outgoing("dlv-2"))
        sink.start()  # same port, same URL
        adapter.send(outgoing("dlv-3"))
    assert [r.headers["idempotency-key"] for r in sink.received] == ["dlv-1", "dlv-3"]


def test_https_is_the_http_adapter():
    adapter = adapters.open_adapter("https://billing.example/api")
    assert isinstance(adapter, HttpAdapter)
    adapter.close()


# --- file -------------------------------------------------------------------


@pytest.fixture
def outbox(tmp_path):
    d = tmp_path / "outbox"
    d.mkdir()
    return d


@pytest.mark.parametrize("content_type, name", [
    ("application/json", "dlv-1.json"),
    ("application/json; charset=utf-8", "dlv-1.json"),
    ("application/fhir+json", "dlv-1.json"),
    ("application/hl7-v2", "dlv-1.hl7"),
    ("x-application/hl7-v2+er7", "dlv-1.hl7"),
    ("text/csv", "dlv-1.csv"),
    ("application/pdf", "dlv-1.bin"),
])
def test_file_exact_bytes_and_name(outbox, content_type, name):
    with FileAdapter(outbox.as_uri()) as adapter:
        result = adapter.send(outgoing("dlv-1", content_type=content_type))
    assert os.listdir(outbox) == [name]  # and no temporary file left behind
    assert (outbox / name).read_bytes() == HL7
    assert result.detail == f"wrote {outbox / name}"


def test_file_suffix_option(outbox):
    with FileAdapter(outbox.as_uri() + "?suffix=.xml") as adapter:
        adapter.send(outgoing("dlv-1", content_type="application/json"))
    assert os.listdir(outbox) == ["dlv-1.xml"]


def test_file_redelivery_replaces_the_one_file(outbox):
    with FileAdapter(outbox.as_uri()) as adapter:
        adapter.send(outgoing("dlv-1", body=b"first"))
        adapter.send(outgoing("dlv-1", body=b"second"))
    assert os.listdir(outbox) == ["dlv-1.hl7"]
    assert (outbox / "dlv-1.hl7").read_bytes() == b"second"


def test_file_percent_encoded_directory(tmp_path):
    d = tmp_path / "out box"
    d.mkdir()
    with FileAdapter(d.as_uri()) as adapter:
        adapter.send(outgoing("dlv-1"))
    assert os.listdir(d) == ["dlv-1.hl7"]


@pytest.mark.parametrize("delivery_id", [
    "../escaped", "a/b", "/etc/passwd", "..", ".hidden", "", "a b", "x\x00y", "é", "a" * 201,
])
def test_file_unsafe_delivery_id_is_permanent_and_writes_nothing(tmp_path, outbox, delivery_id):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with FileAdapter(outbox.as_uri()) as adapter, pytest.raises(PermanentError, match="safe file name"):
        adapter.send(outgoing(delivery_id))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_file_missing_directory_is_temporary(tmp_path):
    missing = tmp_path / "share"
    with FileAdapter(missing.as_uri()) as adapter:
        with pytest.raises(TemporaryError, match="does not exist"):
            adapter.send(outgoing())
        missing.mkdir()  # the share is back
        adapter.send(outgoing())
    assert os.listdir(missing) == ["dlv-0001.hl7"]


def _as_unprivileged(fn: Callable[[], str]) -> str:
    """Run `fn` in a forked child as user nobody (root ignores file permissions); return its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = fn()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def test_file_permission_denied_is_temporary(outbox):
    def attempt() -> str:
        try:
            with FileAdapter(outbox.as_uri()) as adapter:
                adapter.send(outgoing())
            return "sent"
        except TemporaryError as exc:
            return f"temporary: {exc.detail}"

    outbox.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        result = _as_unprivileged(attempt) if os.geteuid() == 0 else attempt()
    finally:
        outbox.chmod(stat.S_IRWXU)
    assert result == f"temporary: permission denied writing to {outbox}"
    assert os.listdir(outbox) == []


def test_file_failed_rename_is_temporary_and_cleans_up(outbox):
    # A directory squatting on the final name makes the rename fail after the write.
    (outbox / "dlv-1.hl7").mkdir()
    (outbox / "dlv-1.hl7" / "keep").write_bytes(b"")
    with FileAdapter(outbox.as_uri()) as adapter, pytest.raises(TemporaryError):
        adapter.send(outgoing("dlv-1"))
    assert os.listdir(outbox) == ["dlv-1.hl7"]
    assert (outbox / "dlv-1.hl7").is_dir()


def test_file_path_that_is_a_file_is_temporary(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_bytes(b"")
    with FileAdapter(f.as_uri()) as adapter, pytest.raises(TemporaryError, match="cannot write"):
        adapter.send(outgoing())
