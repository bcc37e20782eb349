"""The MLLP listener (`courier mllp`): HL7 v2 over TCP in, ACKs out, through the same ingest as HTTP.

Each frame `<VT> payload <FS><CR>` gets exactly one answer frame: `AA` only after
the message(s) are committed, `AE` when the store could not commit (the
sender must resend), `AR` with the reason in MSA-3 and ERR when the frame can never
be accepted. A frame holding a batch (FHS/BHS, or MSH after MSH) is ingested as a
whole (all or nothing) and answered with a BHS ... BTS batch of one ACK per message.

asyncio serves the sockets; the blocking parse + ingest runs in a thread pool so a
slow database never stalls other connections. A frame is parsed once, and handed to
ingest as parsed; frames that arrive together on several connections are committed in
one transaction (courier.app.ingest.GroupCommit), each answered after that commit.
Several listener processes can share the port (--processes, courier.app.hl7.supervisor).
Peers are admitted by address (`mllp_allow`) and within two connection limits (in all,
and per peer address); among the sources a peer may speak for, MSH-3/MSH-4
(`mllp_senders`) pick one.
With TLS (COURIER_MLLP_TLS_*, courier.app.tls) the handshake follows admission, so a refused
or surplus peer costs no cryptography, and must finish within a timeout. Garbage,
oversized frames, frames without an end block, failed handshakes, slow or idle peers
cost a log line and the connection, never the listener.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import click
from flask import current_app

from courier.app import tls
from courier.app.cli.common import with_appcontext
from courier.app.observability import current_correlation_id, with_new_correlation
from courier.app.settings import ConfigError, env_duration, env_int
from courier.app.store.db import StoreWatch

log = logging.getLogger("courier.mllp")

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
_WHITESPACE = b" \t\r\n"
# Bytes outside any frame that make a peer "not speaking MLLP" (an HTTP client, a port scanner).
MAX_JUNK_BYTES = 4096
READ_CHUNK = 64 * 1024

# ERR-3 (HL7 table 0357) and ERR-2 for ingest's refusals: 200 unsupported message type (MSH-9), 207
# application error; a malformed message's own code and location come with the IngestError.
_ERROR_CODES = {"type_not_allowed": ("200", ("MSH", 1, 9, None)), "unknown_source": ("207", ("MSH", 1, 3, None)),
                "invalid": ("207", None), "malformed": ("102", None)}


class FrameTooLarge(Exception):
    """A frame grew past the size limit before its end block arrived."""


class Deframer:
    """Sans-IO MLLP framing: feed() bytes as they arrive, next_frame() gives complete payloads in order.

    Bytes between frames are skipped (whitespace silently, anything else counted in
    .junk). A start block inside an open frame restarts the frame: the sender gave up
    on the first one, and answering it would misalign every later ACK. The CR after
    the end block is optional on input (some senders omit it).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.in_frame = False
        self.junk = 0
        self.restarts = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self._sync()

    def _sync(self) -> None:
        """Outside a frame, drop everything up to the next start block."""
        if self.in_frame:
            return
        start = self.buffer.find(START_BLOCK)
        skipped = self.buffer if start == -1 else self.buffer[:start]
        self.junk += len(bytes(skipped).translate(None, _WHITESPACE))
        if start == -1:
            self.buffer.clear()
        else:
            del self.buffer[:start + 1]
            self.in_frame = True

    def next_frame(self) -> bytes | None:
        """The next complete payload, or None if more bytes are needed. Raises FrameTooLarge."""
        if not self.in_frame:
            return None
        end = self.buffer.find(END_BLOCK)
        scan = self.buffer if end == -1 else self.buffer[:end]
        restart = scan.rfind(START_BLOCK)
        if restart != -1:
            self.restarts += 1
            self.junk += restart
            del self.buffer[:restart + 1]
            end = -1 if end == -1 else end - restart - 1
        if end == -1:
            if len(self.buffer) > self.max_bytes:
                raise FrameTooLarge(len(self.buffer))
            return None
        if end > self.max_bytes:
            raise FrameTooLarge(end)
        payload = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        self.in_frame = False
        self._sync()
        return payload


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


@dataclass(frozen=True)
class Answer:
    """What one frame got: the ACK payload (encoded; None when the sender asked for none, MSH-15), its
    outcome (AA, AE or AR), and a log-safe summary (no PHI)."""

    payload: bytes | None
    code: str
    summary: str


# The listener's default address. B104 (binding to all interfaces) is intended: the listener exists to take HL7
# feeds from interface engines on other hosts; who can reach it is the network's and TLS's business (README,
# MLLP), and `courier mllp --host` narrows it.
ALL_INTERFACES = "0.0.0.0"  # nosec B104  # see above


class MllpListener:
    """Serves MLLP on host:port until stop(); run() is the coroutine that does it."""

    def __init__(self, settings, store, *, host: str = ALL_INTERFACES, port: int | None = None,
                 idle_timeout: float = 600.0, frame_timeout: float = 60.0, ingest_timeout: float = 30.0,
                 write_timeout: float = 30.0, max_connections: int = 200, max_per_peer: int = 20,
                 workers: int = 8, stop_grace: float = 20.0, tls=None, handshake_timeout: float = 10.0,
                 commit_leaders: int | None = None, reuse_port: bool = False, counts=None):
        """`tls`: an courier.app.tls.ServerTls, or None for plain TCP. `max_per_peer` counts connections per
        peer IP address, so one engine's connection leak cannot take every slot of `max_connections`.
        `commit_leaders`: transactions at once (courier.app.ingest.GroupCommit; default a quarter of `workers`).
        `reuse_port` and `counts` (a supervisor.SharedCounts): for one of several listener processes on one
        port (courier.app.hl7.supervisor); `counts` defaults to this process's own."""
        from courier.app.hl7 import er7  # python-hl7 (the [mllp] extra) is needed only when a listener runs
        from courier.app.hl7.supervisor import ConnectionCounts
        from courier.app.ingest import GroupCommit

        self.er7 = er7
        self.settings, self.store = settings, store
        self.host, self.port = host, settings.mllp_port if port is None else port
        self.idle_timeout, self.frame_timeout = idle_timeout, frame_timeout
        self.ingest_timeout, self.write_timeout = ingest_timeout, write_timeout
        self.max_connections, self.max_per_peer, self.stop_grace = max_connections, max_per_peer, stop_grace
        self.tls, self.handshake_timeout = tls, handshake_timeout
        self.reuse_port, self.counts = reuse_port, counts if counts is not None else ConnectionCounts()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mllp-ingest")
        # A quarter as many transactions at once as ingest threads, so that frames arriving together share one
        # (measured: groups of about 2.4 frames at 16 busy connections; with 1 leader 4.6, but then one
        # transaction waiting on a lock would hold up every frame).
        self.group_commit = GroupCommit(store, leaders=max(1, commit_leaders or workers // 4))
        # The store unreachable: one line (and one when it is back), not one per frame; frames get AE meanwhile.
        self.store_watch = StoreWatch(store, log, note="; until then every frame is answered AE (send again)")
        self.started = threading.Event()  # set once the socket listens (self.port is then the real port)
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._connections: dict[asyncio.Task, bool] = {}  # task -> busy with a frame

    # --- lifecycle ---------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Listen until stop() (or SIGTERM/SIGINT with handle_signals), then stop gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self.stop)
        server = await asyncio.start_server(self._accept, self.host, self.port, limit=READ_CHUNK,
                                            reuse_port=self.reuse_port or None)
        self.port = server.sockets[0].getsockname()[1]
        log.info("MLLP listener on %s:%d (%s)", self.host, self.port,
                 "plain TCP" if self.tls is None else
                 "TLS, client certificates required" if self.tls.client_ca else "TLS")
        self.started.set()
        self.store_watch.check_in_background()
        try:
            await self._stop_event.wait()
        finally:
            self.store_watch.stop()
            server.close()
            await self._drain_connections()
            await server.wait_closed()
            self.executor.shutdown(wait=True)
            log.info("MLLP listener stopped (%d frames went to the store in %d transactions)",
                     self.group_commit.batches, self.group_commit.transactions)

    def stop(self) -> None:
        """Stop accepting; connections finish the frame in hand (its ACK is sent), then close."""
        if self.stopping:
            return
        self.stopping = True
        log.info("MLLP listener stopping")
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()  # waiting for bytes: nothing in hand to finish
        if self._stop_event is not None:
            self._stop_event.set()

    def stop_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stop)

    async def _drain_connections(self) -> None:
        tasks = list(self._connections)
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=self.stop_grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("MLLP stop: %d connections still busy after %gs, closed", len(pending), self.stop_grace)
            await asyncio.wait(pending, timeout=5)

    # --- connections ---------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername") or ("?", 0)
        address, where = str(peer[0]), f"{peer[0]}:{peer[1]}"
        candidates = [s for s in self.settings.routing.sources.values() if s.allows_peer(address)]
        why = ("listener is stopping" if self.stopping else
               "address is in no source's mllp_allow" if not candidates else
               self.counts.admit(address, self.max_connections, self.max_per_peer))  # counted if None
        if why is not None:
            log.warning("MLLP connection from %s refused: %s", where, why)
            writer.close()
            return
        self._connections[task] = False
        try:
            if self.tls is not None and not await self._handshake(writer, where):
                return
            log.info("MLLP connection from %s (may send as %s)", where, ", ".join(s.name for s in candidates))
            await self._converse(reader, writer, where, candidates, task)
        except asyncio.CancelledError:
            pass  # stop() or the stop grace period ran out
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s lost: %s", where, exc)
        except Exception:  # a bug must cost this connection only, never the listener
            log.exception("MLLP connection from %s failed", where)
        finally:
            self._connections.pop(task, None)
            self.counts.release(address)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (Exception, asyncio.CancelledError):
                pass

    async def _handshake(self, writer: asyncio.StreamWriter, where: str) -> bool:
        """TLS on an admitted connection, within handshake_timeout; False (logged, no PHI) if it failed.

        No byte is read before this: the task runs _accept up to here on the loop turn after the
        connection was made, and start_tls pauses reading before it yields, so the ClientHello
        reaches the TLS layer and not the stream's buffer.
        """
        try:
            await writer.start_tls(self.tls.context(), ssl_handshake_timeout=self.handshake_timeout)
            return True
        except ssl.SSLError as exc:
            # e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE, TLSV1_ALERT_UNKNOWN_CA, WRONG_VERSION_NUMBER (plain text)
            log.warning("MLLP connection from %s: TLS handshake failed (%s); closed", where,
                        exc.reason or type(exc).__name__)
        except (ConnectionError, TimeoutError) as exc:
            if isinstance(exc, ConnectionAbortedError):  # asyncio's handshake timeout
                log.warning("MLLP connection from %s: no TLS handshake within %gs; closed", where,
                            self.handshake_timeout)
            else:
                log.info("MLLP connection from %s lost during the TLS handshake: %s", where, exc)
        except ConfigError as exc:  # files that never loaded (courier.app.tls keeps the last good context after a start)
            log.error("MLLP connection from %s: cannot load TLS files: %s; closed", where, "; ".join(exc.problems))
        return False

    async def _converse(self, reader, writer, where: str, candidates: list, task: asyncio.Task) -> None:
        deframer = Deframer(self.settings.max_message_bytes)
        frame_started = 0.0
        while True:
            try:
                payload = deframer.next_frame()
            except FrameTooLarge:
                log.warning("MLLP from %s: frame larger than %d bytes; answered AR and closed", where,
                            self.settings.max_message_bytes)
                await self._reply(writer, self._reject_frame(
                    f"frame larger than {self.settings.max_message_bytes} bytes (the limit)", "104"))
                return
            if payload is not None:
                self._connections[task] = True
                answer = await self._answer(payload, where, candidates)
                if answer.payload is not None:  # None: enhanced mode, the sender asked for no answer
                    await self._reply(writer, answer.payload)
                log.info("MLLP from %s: %s", where, answer.summary)
                self._connections[task] = False
                if self.stopping:
                    return
                continue
            if self.stopping:
                return
            if deframer.junk > MAX_JUNK_BYTES:
                log.warning("MLLP from %s: %d bytes outside any frame (not MLLP?); closed", where, deframer.junk)
                return
            if deframer.in_frame:
                if not frame_started:
                    frame_started = time.monotonic()
                timeout = max(0.0, frame_started + self.frame_timeout - time.monotonic())
            else:
                frame_started, timeout = 0.0, self.idle_timeout
            try:
                # asyncio.timeout, not wait_for: wait_for makes a task per call, three per frame in all.
                async with asyncio.timeout(timeout):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                if deframer.in_frame:
                    # A frame trickling in or never ending (slow loris, or a sender that lost its end block).
                    log.warning("MLLP from %s: no end block within %gs of the start block; answered AR and "
                                "closed", where, self.frame_timeout)
                    await self._reply(writer, self._reject_frame(
                        f"frame not complete within {self.frame_timeout:g}s (no end block)", "100"))
                else:
                    log.info("MLLP connection from %s idle for %gs; closed", where, self.idle_timeout)
                return
            if not data:
                if deframer.in_frame:
                    log.warning("MLLP from %s: connection closed inside a frame (%d bytes, no end block); "
                                "nothing stored", where, len(deframer.buffer))
                else:
                    log.info("MLLP connection from %s closed by peer", where)
                return
            junk_before = deframer.junk
            deframer.feed(data)
            if deframer.junk and not junk_before:
                log.warning("MLLP from %s: bytes outside a frame (before a start block) skipped", where)

    async def _reply(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        writer.write(frame(payload))
        # A peer that does not read its ACKs must not pin the connection (and its buffer) forever.
        async with asyncio.timeout(self.write_timeout):
            await writer.drain()

    async def _answer(self, payload: bytes, where: str, candidates: list) -> Answer:
        future = self._loop.run_in_executor(self.executor, self.process, payload, where, candidates)
        try:
            async with asyncio.timeout(self.ingest_timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            # The commit may still land; the sender's resend is then a duplicate (same MSH-10), answered AA.
            return self._refusal(payload, "AE", f"not stored within {self.ingest_timeout:g}s; send again",
                                 "207", f"AE (store did not answer within {self.ingest_timeout:g}s)")

    def _reject_frame(self, reason: str, error_code: str) -> bytes:
        return self.er7.build_ack(None, "AR", text=reason, error_code=error_code).encode("ascii", "replace")

    # --- one frame (runs in the thread pool) ---------------------------------------------

    @with_new_correlation  # one correlation id per frame: its log lines and its messages share it
    def process(self, payload: bytes, where: str, candidates: list) -> Answer:
        """Parse, pick the source, ingest; the ACK for the whole frame. Never raises."""
        from courier.app.ingest import Batch, IngestError, charge, plan

        er7 = self.er7
        try:
            messages = er7.parse_all(payload)
        except er7.Hl7Error as exc:
            return self._refusal(payload, "AR", str(exc), exc.error_code, f"AR ({exc})", exc.location)
        except Exception as exc:  # the parser's bug is this frame's refusal, not the listener's end
            log.exception("MLLP from %s: parser failed", where)
            return self._refusal(payload, "AR", f"cannot parse: {type(exc).__name__}", "207", "AR (parser error)")
        first = messages[0]
        source = pick_source(candidates, first.sending_application, first.sending_facility)
        ids = ", ".join(m.control_id for m in messages[:5]) + (", ..." if len(messages) > 5 else "")
        if source is None:
            reason = (f"sender {first.sending_application}^{first.sending_facility} (MSH-3/MSH-4) is not a "
                      f"source allowed from this address")
            return self._answer_messages(payload, messages, "AR", reason, *_ERROR_CODES["unknown_source"],
                                         f"AR MSH-10 {ids}: unknown sender")
        read = messages  # what ingest stores: the frame read once, here, in the source's charset
        if source.charset:  # messages without MSH-18 are read in the source's charset: answered in it too
            try:
                messages = read = er7.reread(messages, source.charset)
            except er7.Hl7Error:
                read = None  # not readable in it: ingest reads the frame itself and says why, as over HTTP
        try:  # ingest(), with the commit shared with the frames arriving meanwhile on other connections
            plans, _ = plan(self.settings.routing, source=source.name, content_type="application/hl7-v2",
                            body=payload, hl7_messages=read)
            charge(self.store, self.settings.routing, source.name, len(plans))
            results = self.group_commit.commit(Batch(source.name, plans, current_correlation_id()))
        except IngestError as exc:
            if exc.code == "store_unavailable" and exc.__cause__ is not None:
                self.store_watch.failed(exc.__cause__)
            code = "AE" if exc.status >= 500 or exc.status == 429 else "AR"  # 429 rate limited: resend later
            error_code, location = _ERROR_CODES.get(exc.code, ("207", None))
            if exc.details.get("error_code"):  # an HL7 refusal: its own code and place
                error_code = exc.details["error_code"]
                location = tuple(exc.details["location"]) if exc.details.get("location") else None
            return self._answer_messages(payload, messages, code, exc.message, error_code, location,
                                         f"{code} MSH-10 {ids} from {source.name}: {exc.code}")
        except Exception as exc:  # an ingest bug: nothing committed that we know of, so the sender must resend
            log.exception("MLLP from %s: ingest failed", where)
            return self._answer_messages(payload, messages, "AE", f"internal error ({type(exc).__name__}); send "
                                         "again", "207", None, f"AE MSH-10 {ids}: internal error")
        self.store_watch.ok()
        stored = sum(1 for r in results if r.created)
        return self._answer_messages(payload, messages, "AA", "", None, None,
                                     f"AA MSH-10 {ids} from {source.name} ({stored} new, "
                                     f"{len(results) - stored} duplicate)")

    def _answer_messages(self, payload: bytes, messages: list, outcome: str, reason: str, error_code: str | None,
                         location: tuple | None, summary: str) -> Answer:
        """The answer to parsed messages: per message the code its sender asked for (er7.ack_code:
        AA/AE/AR, or CA/CE/CR in enhanced mode, or none), in the first message's charset."""
        return self._acks(payload, messages, outcome, reason, error_code, location, summary,
                          messages[0].charset if messages else None)

    def _refusal(self, payload: bytes, code: str, reason: str, error_code: str, summary: str,
                 location: tuple | None = None) -> Answer:
        """An ACK for a frame that did not parse, addressed from whatever MSH can be salvaged;
        a batch that still splits gets a batch of them, one per message, all with the reason.
        Always sent (CR in enhanced mode): the MSH-15 of a message that did not parse is not trusted."""
        er7 = self.er7
        try:
            parts = er7.split(er7.decode(payload), counts=False)
        except Exception:  # not even splittable: one ACK for the frame
            parts = [payload]
        return self._acks(payload, [er7.salvage_header(part) for part in parts], code, reason, error_code,
                          location, summary, None, always=True)

    def _acks(self, payload: bytes, messages: list, outcome: str, reason: str, error_code: str | None,
              location: tuple | None, summary: str, codec: str | None, always: bool = False) -> Answer:
        er7 = self.er7
        acks = []
        for message in messages:
            code = er7.ack_code(message, outcome)
            if code is None and always:
                code = "C" + outcome[1]
            if code is not None:
                acks.append(er7.build_ack(message, code, text=reason, error_code=error_code if outcome != "AA"
                                          else None, location=location))
        if not acks:
            return Answer(None, outcome, summary + " (no ACK: MSH-15 asked for none)")
        batch = len(messages) > 1 or payload.lstrip(b" \t\r\n\xef\xbb\xbf").startswith((b"FHS", b"BHS"))
        text = er7.build_batch_ack(acks) if batch else acks[0]
        return Answer(_encode(text, payload, er7, codec), outcome, summary)


def _encode(text: str, payload: bytes, er7, codec: str | None = None) -> bytes:
    """The ACK in the charset the message came in (its MSH-3..6 are echoed), else UTF-8."""
    if codec is None:
        try:
            codec = er7.decode_with_codec(payload)[1]
        except Exception:  # undecodable input: the ACK is ours, UTF-8 it is
            codec = "utf-8"
    return text.encode(codec, errors="replace")


def pick_source(candidates: list, application: str, facility: str):
    """The source for a message from an admitted peer: the first whose mllp_senders match
    MSH-3.1/MSH-4.1, else the first that lists no senders (config order); None if neither."""
    named = [s for s in candidates if s.sent_by(application, facility)]
    if named:
        return named[0]
    return next((s for s in candidates if s.sent_by(application, facility) is None), None)


def listener_options(env: Mapping[str, str] | None = None) -> dict:
    """MllpListener's operator settings from the environment (COURIER_MLLP_*, courier.app.tls for TLS).

    Raises ConfigError listing every unusable variable, so `courier mllp` refuses to start with all of them named.
    """
    env = os.environ if env is None else env
    options: dict = {}
    problems: list[str] = []
    # (keyword, variable, default, parser, must be above zero): a zero handshake timeout or limit would refuse all.
    variables = (("idle_timeout", "COURIER_MLLP_IDLE_TIMEOUT", 600.0, env_duration, False),
                 ("frame_timeout", "COURIER_MLLP_FRAME_TIMEOUT", 60.0, env_duration, False),
                 ("ingest_timeout", "COURIER_MLLP_INGEST_TIMEOUT", 30.0, env_duration, False),
                 ("handshake_timeout", "COURIER_MLLP_TLS_HANDSHAKE_TIMEOUT", 10.0, env_duration, True),
                 ("max_connections", "COURIER_MLLP_MAX_CONNECTIONS", 200, env_int, True),
                 ("max_per_peer", "COURIER_MLLP_MAX_PER_PEER", 20, env_int, True))
    for key, name, default, read, positive in variables:
        try:
            options[key] = read(env, name, default)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if positive and options[key] <= 0:
            problems.append(f"environment: {name}={env[name]!r} must be above zero")
    try:
        options["tls"] = tls.from_env("COURIER_MLLP_TLS", env)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return options


@click.command("mllp")
@click.option("--host", default=ALL_INTERFACES, show_default=True, help="address to listen on (port: MLLP_PORT)")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              envvar="COURIER_MLLP_PROCESSES", show_envvar=True,
              help="listener processes sharing the port (SO_REUSEPORT): one core each, under a supervisor")
@with_appcontext
def mllp_command(host: str, processes: int):
    """Receive HL7 v2 over MLLP on MLLP_PORT until SIGTERM; ACK AA only after commit."""
    try:
        options = listener_options()
    except ConfigError as exc:
        raise click.ClickException("cannot start: " + "; ".join(exc.problems)) from None
    try:
        from courier.app.hl7 import er7  # noqa: F401  # before any fork: python-hl7 is the [mllp] extra
    except ImportError as exc:
        raise click.ClickException(f"HL7 v2 support is not installed ({exc}); pip install 'courier[mllp]'") from None
    settings, store = current_app.extensions["courier.settings"], current_app.extensions["courier.store"]
    counts = None
    if processes > 1:
        from courier.app.hl7.supervisor import SharedCounts, Supervisor, check_port_free

        if not settings.mllp_port:
            raise click.ClickException("cannot start: --processes needs a fixed MLLP_PORT (0 picks a port per "
                                       "process)")
        try:
            check_port_free(host, settings.mllp_port)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{settings.mllp_port}: "
                                       f"{exc.strerror or exc}") from None
        counts = SharedCounts(processes, options["max_connections"])
        supervisor = Supervisor(processes, counts)
        if supervisor.run() is None:  # the supervisor, after every listener process has stopped
            if supervisor.status:
                click.get_current_context().exit(supervisor.status)
            return
        # A listener process, just forked: pooled connections, if the supervisor had any, are not its own.
        store.engine.dispose(close=False)
    listener = MllpListener(settings, store, host=host, reuse_port=processes > 1, counts=counts, **options)
    asyncio.run(listener.run(handle_signals=True))
