"""HL7 v2 (ER7) text in and out: decoding, batch splitting, header parsing, ACKs.

Shared by the HTTP ingest and the MLLP listener so that both accept and refuse
exactly the same inputs. Field splitting is python-hl7's (`hl7.parse`); this
module adds what that library leaves out and what Courier relies on: strict
checks of the delimiters and of MSH, segment-terminator normalisation, batch
envelopes, and never letting anything but `Hl7Error` escape for bad input.

Header values in `Hl7Message` are the raw wire values (escape sequences kept),
so MSH-10 is echoed byte for byte in MSA-2 and used unchanged as the
idempotency key.
"""
from __future__ import annotations

import codecs
import logging
import re
import string
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import hl7
import hl7.containers
import hl7.parser
import hl7.util

__all__ = [
    "ACK_CODES",
    "Hl7Error",
    "Hl7Message",
    "build_ack",
    "build_batch_ack",
    "decode",
    "decode_with_codec",
    "parse",
    "parse_ack",
    "parse_all",
    "salvage_header",
    "split",
]

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

# HL7 table 0357 (message error condition codes), for ERR-3.
ERROR_CODES = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "104": "Value too long",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

DEFAULT_FIELD_SEPARATOR = "|"
DEFAULT_ENCODING_CHARACTERS = "^~\\&"
DEFAULT_VERSION = "2.5"

# python-hl7 logs whole field values (PHI) when it meets a bad escape sequence,
# under loggers named after its source files; a filter on the logger itself
# drops those records before any handler (or Sentry) sees them, and survives
# logging.config.dictConfig, which leaves filters of existing loggers alone.
for _module in (hl7.util, hl7.containers, hl7.parser):
    logging.getLogger(_module.__file__).addFilter(lambda record: False)

_BOM = "\ufeff"
# Whitespace, MLLP start/end bytes (VT, FS) and a BOM around the payload are transport noise.
_SURROUNDING = " \t\r\n\x0b\x0c\x1c" + _BOM
_TERMINATOR = re.compile(r"\r\n|\r|\n")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
_ENVELOPE = ("FHS", "BHS", "BTS", "FTS")
# HL7 expects printable ASCII delimiters; anything else is what fuzzers and broken encodings produce.
_DELIMITER_CHARS = frozenset(string.punctuation)
_MESSAGE_CODE = re.compile(r"[A-Za-z0-9_]{1,20}")
# NUL, VT and FS would corrupt storage or MLLP framing of a forwarded message.
_FORBIDDEN = re.compile(r"[\x00\x0b\x1c]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION = re.compile(r"(\d+)\.(\d+)")
_MAX_CONTROL_ID = 199  # MSH-10 length limit since v2.7 (20 before); longer is not a control id.
_MSA3_MAX = 80  # MSA-3 is ST(80) in the versions that define it
_ERR8_MAX = 250  # ERR-8 is TX(250)


class Hl7Error(ValueError):
    """Input that can never be accepted. .reason (str: what is wrong), .where (str: e.g. 'segment 1 (MSH), field 9' or 'byte 0'), str(e) combines both.

    .error_code is the HL7 table 0357 code that fits (for ERR-3 of a reject ACK).
    Reasons name structure (segment ids, fields, delimiters), never field contents,
    so they can be logged and returned without leaking PHI.
    """

    def __init__(self, reason: str, where: str = "", error_code: str = "102"):
        # args carry everything so the exception survives pickling (Celery, multiprocessing).
        super().__init__(reason, where, error_code)
        self.reason = reason
        self.where = where
        self.error_code = error_code

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


@dataclass(frozen=True)
class Hl7Message:
    """One parsed HL7 v2 message: its normalised text and the MSH values Courier routes and ACKs on."""

    text: str              # the message, segments joined by '\r' (normalised), no trailing junk
    message_type: str      # "HL7v2:<MSH-9.1>^<MSH-9.2>", e.g. "HL7v2:ADT^A01" (just "HL7v2:ACK" if MSH-9.2 is empty)
    control_id: str        # MSH-10 as on the wire; never '' from parse() (only from salvage_header)
    version: str           # MSH-12 first component ('' if absent)
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    field_separator: str   # MSH-1
    encoding_characters: str  # MSH-2, e.g. '^~\\&'
    processing_id: str     # MSH-11 first component

    @property
    def trigger_event(self) -> str:
        """MSH-9.2 ('' for a bare ACK)."""
        return self.message_type.partition("^")[2]


# --------------------------------------------------------------------------- decoding

# HL7 table 0211 (MSH-18 character sets) -> Python codecs. ISO IR14/87/159 and
# CNS 11643 need ISO 2022 code switching that Python's codecs do not model; left
# out, they fall back like an undeclared charset. Bare "UNICODE" is ambiguous.
_HL7_CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "ISO IR100": "iso8859-1",
    "ISO IR192": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
_HL7_CHARSETS.update({f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)})
# Names senders put in MSH-18 although HL7 does not define them are honoured only if
# they resolve to one of these: an arbitrary codec (unicode_escape, utf-16, ...) could
# rewrite backslashes into control characters or turn the message into noise.
_SAFE_CODECS = frozenset(
    {codecs.lookup(c).name for c in set(_HL7_CHARSETS.values())}
    | {codecs.lookup(f"cp{n}").name for n in range(1250, 1259)}
    | {codecs.lookup(c).name for c in ("latin-1", "shift_jis", "euc_jp", "cp932", "gbk", "koi8-r")}
)


def decode(raw: bytes) -> str:
    """Bytes of an HL7 v2 message or batch -> text, choosing the charset like a tolerant receiver would.

    Order: UTF-8 (after dropping a BOM), the charset MSH-18 declares, cp1252, latin-1,
    so bytes never make it fail; NUL bytes or no 'MSH' at all mean it is not HL7 v2.
    """
    return decode_with_codec(raw)[0]


def decode_with_codec(raw: bytes) -> tuple[str, str]:
    """decode(), plus the Python codec it chose: an MLLP ACK goes back in the sender's charset."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode() takes bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    nul = raw.find(b"\x00")
    if nul != -1:
        # UTF-16/32 or binary data: never a v2 message, and NUL breaks text columns downstream.
        raise Hl7Error("NUL byte in input (binary data or UTF-16/32 text is not HL7 v2 ER7)", f"byte {nul}", "102")
    start = len(raw) - len(raw.lstrip(b" \t\r\n\x0b"))
    if raw.startswith(b"\xef\xbb\xbf", start):
        raw = raw[:start] + raw[start + 3:]
    if b"MSH" not in raw:
        raise Hl7Error("no MSH segment: not an HL7 v2 message", "byte 0", "100")
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    declared = _declared_codec(raw)
    for codec in (declared, "cp1252"):
        if codec is None:
            continue
        try:
            text = raw.decode(codec)
        except (UnicodeError, LookupError):
            continue
        if "MSH" in text:
            return text, codec
    return raw.decode("latin-1"), "latin-1"


def _declared_codec(raw: bytes) -> str | None:
    """The Python codec for the MSH-18 of the first MSH in raw, if it is one we trust."""
    match = re.search(rb"(?:^|[\r\n\x0b])MSH([\x21-\x7e])", raw)
    if match is None:
        return None
    segment = re.split(rb"[\r\n]", raw[match.start(1) - 3:], maxsplit=1)[0]
    fields = segment.split(match.group(1))
    if len(fields) < 18:
        return None
    value = fields[17]  # fields[0] is 'MSH', fields[1] is MSH-2, so MSH-n is fields[n-1]
    encoding_chars = fields[1]
    if len(encoding_chars) >= 2:
        value = value.split(encoding_chars[1:2])[0]  # first repetition
    if encoding_chars:
        value = value.split(encoding_chars[0:1])[0]  # first component
    name = value.decode("ascii", "replace").strip()
    if not name:
        return None
    codec = _HL7_CHARSETS.get(name.upper())
    if codec is not None:
        return codec
    try:
        resolved = codecs.lookup(name).name
    except LookupError:
        return None
    return resolved if resolved in _SAFE_CODECS else None


# --------------------------------------------------------------------------- splitting

def _segments(text: str) -> list[str]:
    """Text -> non-blank segments, accepting CR, LF, CRLF or a mix as terminators."""
    text = text.strip(_SURROUNDING)
    return [line for line in _TERMINATOR.split(text) if line.strip()]


def _is_envelope(segment: str, name: str) -> bool:
    return segment.startswith(name) and (len(segment) == 3 or not segment[3].isalnum())


def split(text: str) -> list[str]:
    """Text of one message or a batch -> one '\\r'-joined text per message.

    FHS/BHS/BTS/FTS envelopes are dropped, each MSH starts a message. Refused: anything
    but FHS/BHS before the first MSH, a second FHS, a BHS inside an open batch, anything
    after FTS, no MSH at all. Missing or unpaired trailers (BTS/FTS) are tolerated: real
    senders drop them and they carry nothing a receiver needs.
    """
    if not isinstance(text, str):
        raise TypeError(f"split() takes str, not {type(text).__name__}")
    segments = _segments(text)
    if not segments:
        raise Hl7Error("empty input", "byte 0", "100")
    messages: list[list[str]] = []
    current: list[str] | None = None
    seen_file_header = in_batch = after_file_trailer = False
    for index, segment in enumerate(segments, 1):
        where = f"segment {index} ({_shown_id(segment)})"
        if after_file_trailer:
            raise Hl7Error("segment after the file trailer (FTS)", where, "100")
        if segment.startswith("MSH"):
            current = [segment]
            messages.append(current)
        elif _is_envelope(segment, "FHS"):
            if seen_file_header or messages or in_batch:
                raise Hl7Error("FHS is only allowed once, as the first segment", where, "100")
            seen_file_header = True
        elif _is_envelope(segment, "BHS"):
            if in_batch:
                raise Hl7Error("BHS inside a batch that has no BTS yet", where, "100")
            in_batch, current = True, None
        elif _is_envelope(segment, "BTS"):
            in_batch, current = False, None
        elif _is_envelope(segment, "FTS"):
            after_file_trailer, in_batch, current = True, False, None
        elif current is None:
            raise Hl7Error("segment outside a message: every message must start with MSH", where, "100")
        else:
            current.append(segment)
    if not messages:
        raise Hl7Error("no MSH segment: no message in the input", "segment 1", "100")
    return ["\r".join(message) for message in messages]


def _shown_id(segment: str) -> str:
    """A segment id fit for an error message (repr when it is not printable ASCII)."""
    head = segment[:3]
    return head if re.fullmatch(r"[\x21-\x7e]{1,3}", head) else ascii(head)


# --------------------------------------------------------------------------- parsing

def _delimiters(segment: str) -> tuple[str, str]:
    """Check MSH-1/MSH-2 of an MSH segment; returns (field separator, encoding characters).

    Done before python-hl7 sees the text: it silently fills in defaults for missing
    encoding characters and asserts (AssertionError) on duplicated ones.
    """
    if len(segment) < 4:
        raise Hl7Error("MSH-1 (field separator) is missing", "segment 1 (MSH), field 1", "101")
    sep = segment[3]
    if sep not in _DELIMITER_CHARS:
        raise Hl7Error(f"MSH-1 (field separator) {sep!r} is not a printable ASCII non-alphanumeric character",
                       "segment 1 (MSH), field 1", "102")
    end = segment.find(sep, 4)
    encoding = segment[4:] if end == -1 else segment[4:end]
    where = "segment 1 (MSH), field 2"
    if len(encoding) not in (4, 5):
        raise Hl7Error(f"MSH-2 (encoding characters) must be 4 characters (5 from v2.7), got {len(encoding)}",
                       where, "102")
    for char in encoding:
        if char not in _DELIMITER_CHARS:
            raise Hl7Error(f"MSH-2 (encoding characters) contains {char!r}, not a printable ASCII "
                           "non-alphanumeric character", where, "102")
    if len(set(encoding)) != len(encoding) or sep in encoding:
        raise Hl7Error("MSH-2 (encoding characters) repeats a delimiter or the field separator", where, "102")
    return sep, encoding


def _value(segment: hl7.Segment, field: int, component: int = 1) -> str:
    """Raw value (escapes kept) of a field's first repetition, given component, first subcomponent.

    Walks python-hl7's tree itself: Segment.extract_field unescapes (lossy: \\H\\ -> '_',
    and it raises ValueError on some bad escapes) and raises IndexError on short paths.
    """
    if field >= len(segment):
        return ""
    node = segment[field]
    for index in (0, component - 1, 0):  # repetition, component, subcomponent
        if isinstance(node, str):
            return node if index == 0 else ""
        if index >= len(node):
            return ""
        node = node[index]
    return node if isinstance(node, str) else ""


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = _VERSION.match(version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse(text: str) -> Hl7Message:
    """One message (an element of split()) -> Hl7Message, or Hl7Error saying what and where.

    Terminators are normalised here too, so a single message need not go through split().
    """
    if not isinstance(text, str):
        raise TypeError(f"parse() takes str, not {type(text).__name__}")
    segments = _segments(text)
    if not segments:
        raise Hl7Error("empty message", "segment 1", "100")
    if not segments[0].startswith("MSH"):
        raise Hl7Error(f"a message must start with MSH, not {_shown_id(segments[0])}", "segment 1", "100")
    sep, encoding = _delimiters(segments[0])
    for index, segment in enumerate(segments[1:], 2):
        segment_id = segment[:3]
        where = f"segment {index} ({_shown_id(segment)})"
        if not _SEGMENT_ID.fullmatch(segment_id) or (len(segment) > 3 and segment[3] != sep):
            raise Hl7Error("segment id must be 3 uppercase letters or digits (starting with a letter) "
                           "followed by the field separator", where, "100")
        if segment_id == "MSH" or segment_id in _ENVELOPE:
            raise Hl7Error(f"{segment_id} inside a message (a batch must be split first)", where, "100")
    message_text = "\r".join(segments)
    bad = _FORBIDDEN.search(message_text)
    if bad:
        index = message_text.count("\r", 0, bad.start()) + 1
        raise Hl7Error(f"control character {bad.group()!r} inside the message",
                       f"segment {index} ({_shown_id(segments[index - 1])})", "102")
    try:
        parsed = hl7.parse(message_text)
        msh = parsed[0]
    except Exception as exc:  # python-hl7 raises assorted types on odd input; none may escape
        raise Hl7Error(f"HL7 parser failed ({type(exc).__name__})", "segment 1 (MSH)", "102") from None
    return _header(message_text, msh, sep, encoding, strict=True)


def _header(message_text: str, msh: hl7.Segment, sep: str, encoding: str, *, strict: bool) -> Hl7Message:
    """Hl7Message from a parsed MSH; strict=False (for reject ACKs) skips the content checks."""
    code, trigger = _value(msh, 9, 1), _value(msh, 9, 2)
    control_id = _value(msh, 10)
    version = _value(msh, 12)
    if strict:
        if not code:
            raise Hl7Error("MSH-9 (message type) is empty", "segment 1 (MSH), field 9", "101")
        if not _MESSAGE_CODE.fullmatch(code):
            raise Hl7Error("MSH-9.1 (message code) must be 1-20 letters, digits or '_'",
                           "segment 1 (MSH), field 9", "102")
        if not trigger and code != "ACK":
            raise Hl7Error("MSH-9.2 (trigger event) is empty", "segment 1 (MSH), field 9", "101")
        if trigger and not _MESSAGE_CODE.fullmatch(trigger):
            raise Hl7Error("MSH-9.2 (trigger event) must be 1-20 letters, digits or '_'",
                           "segment 1 (MSH), field 9", "102")
        # Required although v2 lets receivers be lax: idempotency and MSA-2 depend on it.
        if not control_id.strip():
            raise Hl7Error("MSH-10 (message control id) is empty", "segment 1 (MSH), field 10", "101")
        if len(control_id) > _MAX_CONTROL_ID:
            raise Hl7Error(f"MSH-10 (message control id) is longer than {_MAX_CONTROL_ID} characters",
                           "segment 1 (MSH), field 10", "102")
        if _CONTROL.search(control_id):
            raise Hl7Error("MSH-10 (message control id) contains a control character",
                           "segment 1 (MSH), field 10", "102")
        if len(encoding) == 5 and (_version_tuple(version) or (0, 0)) < (2, 7):
            raise Hl7Error("a 5th encoding character (truncation) is only allowed from v2.7 "
                           f"(MSH-12 is {version[:20]!r})", "segment 1 (MSH), field 2", "102")
    return Hl7Message(
        text=message_text,
        message_type=f"HL7v2:{code}^{trigger}" if trigger else f"HL7v2:{code}",
        control_id=control_id,
        version=version,
        sending_application=_value(msh, 3),
        sending_facility=_value(msh, 4),
        receiving_application=_value(msh, 5),
        receiving_facility=_value(msh, 6),
        field_separator=sep,
        encoding_characters=encoding,
        processing_id=_value(msh, 11),
    )


def parse_all(raw: bytes) -> list[Hl7Message]:
    """decode + split + parse each: all messages, or Hl7Error for the first bad one (nothing half-accepted).

    For a batch, the error's where names the message ('message 2, segment 1 (MSH), field 10').
    """
    parts = split(decode(raw))
    messages = []
    for number, part in enumerate(parts, 1):
        try:
            messages.append(parse(part))
        except Hl7Error as exc:
            if len(parts) == 1:
                raise
            raise Hl7Error(exc.reason, f"message {number}, {exc.where}", exc.error_code) from None
    return messages


def salvage_header(data: bytes | str) -> Hl7Message | None:
    """Best-effort MSH of input that parse() refused, to address a reject ACK (MSA-2 = its MSH-10).

    Only the delimiters must be sound; MSH-9/MSH-10 may be empty. None when even that fails.
    Never use the result as an accepted message: its text is just the MSH segment.
    """
    try:
        text = data if isinstance(data, str) else decode(bytes(data).replace(b"\x00", b""))
        segment = next((s for s in _segments(text) if s.startswith("MSH")), None)
        if segment is None:
            return None
        sep, encoding = _delimiters(segment)
        segment = _CONTROL.sub(" ", segment)
        return _header(segment, hl7.parse(segment)[0], sep, encoding, strict=False)
    except Exception:  # salvage is optional by nature: any failure means "no header"
        return None


# --------------------------------------------------------------------------- ACKs

def _escape(value: str, sep: str, encoding: str) -> str:
    """Escape text for a field in these delimiters; control characters (CR, LF, VT, FS...) become spaces."""
    component, repetition, escape, subcomponent = encoding[:4]
    table = {sep: "F", component: "S", repetition: "R", subcomponent: "T", escape: "E"}
    if len(encoding) == 5:
        table[encoding[4]] = "P"  # v2.7 truncation character
    out = []
    for char in _CONTROL.sub(" ", value):
        code = table.get(char)
        out.append(f"{escape}{code}{escape}" if code else char)
    return "".join(out)


def _embed(value: str, sep: str, encoding: str) -> str:
    """Make a raw (already escaped) value safe to put in a field: its escape sequences are
    kept, stray delimiters are escaped and control characters become spaces."""
    component, repetition, escape, subcomponent = encoding[:4]
    table = {sep: "F", component: "S", repetition: "R", subcomponent: "T"}
    return "".join(f"{escape}{table[c]}{escape}" if c in table else c for c in _CONTROL.sub(" ", value))


def _raw_msh_fields(msg: Hl7Message) -> list[str] | None:
    """MSH fields of msg.text split on the field separator (index n-1 is MSH-n), if it is sane."""
    first = msg.text.split("\r", 1)[0]
    if not first.startswith("MSH" + msg.field_separator) or _CONTROL.search(first):
        return None
    return first.split(msg.field_separator)


def build_ack(msg: Hl7Message | None, code: str, *, text: str = "", error_code: str | None = None,
              now: datetime | None = None, control_id: str | None = None) -> str:
    """An original-mode ACK for msg in its own delimiters and version, every segment ending in '\\r'.

    MSH-3/4 and MSH-5/6 are the message's MSH-5/6 and MSH-3/4 (whole fields, byte for byte),
    MSH-9 'ACK^<trigger>^ACK', MSH-10 control_id or a new 20-character id, MSA-2 the message's
    MSH-10 as received. AE/AR/CE/CR add ERR (ERR-3 code from table 0357, default 207; ERR-4
    'E'; ERR-8 the text). msg=None (nothing usable, see salvage_header) gives '|^~\\&', v2.5
    and an empty MSA-2. MSH-7 is `now` (default: UTC) as YYYYMMDDHHMMSS.
    """
    if code not in ACK_CODES:
        raise ValueError(f"ACK code must be one of {sorted(ACK_CODES)}, not {code!r}")
    rejecting = code not in ("AA", "CA")
    if error_code is not None and not rejecting:
        raise ValueError("error_code only applies to AE, AR, CE and CR")
    if msg is not None:
        sep, encoding = msg.field_separator, msg.encoding_characters
        version = msg.version or DEFAULT_VERSION
        # A truncation character is only legal from v2.7; without it the ACK stays parseable.
        if len(encoding) == 5 and (_version_tuple(version) or (0, 0)) < (2, 7):
            encoding = encoding[:4]
        raw = _raw_msh_fields(msg)

        def field(n: int, fallback: str) -> str:
            if raw is None:
                return _embed(fallback, sep, encoding)
            return raw[n - 1] if n - 1 < len(raw) else ""

        receiver = [field(3, msg.sending_application), field(4, msg.sending_facility)]
        sender = [field(5, msg.receiving_application), field(6, msg.receiving_facility)]
        processing = field(11, msg.processing_id) or "P"
        # A salvaged header may carry any junk in MSH-9.2; the ACK only echoes a well-formed one.
        trigger = msg.trigger_event if _MESSAGE_CODE.fullmatch(msg.trigger_event) else ""
        original_id = _embed(msg.control_id, sep, encoding)
        version = _embed(version, sep, encoding)
    else:
        sep, encoding, version = DEFAULT_FIELD_SEPARATOR, DEFAULT_ENCODING_CHARACTERS, DEFAULT_VERSION
        receiver, sender, processing, trigger, original_id = ["", ""], ["", ""], "P", "", ""
    comp = encoding[0]
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    ack_id = _escape(control_id if control_id is not None else uuid.uuid4().hex[:20].upper(), sep, encoding)
    message_type = f"ACK{comp}{trigger}{comp}ACK" if trigger else "ACK"
    # MSH-1 is the separator itself, so MSH-2 follows 'MSH' directly.
    msh = "MSH" + sep + sep.join([encoding, *sender, *receiver, stamp, "", message_type, ack_id, processing, version])
    msa = ["MSA", code, original_id]
    if text:
        msa.append(_escape(text[:_MSA3_MAX], sep, encoding))
    segments = [msh, sep.join(msa)]
    if rejecting:
        err_code = str(error_code) if error_code is not None else "207"
        err3 = comp.join([_escape(err_code, sep, encoding),
                          _escape(ERROR_CODES.get(err_code, ""), sep, encoding), "HL70357"])
        err = ["ERR", "", "", err3, "E", "", "", "", _escape(text[:_ERR8_MAX], sep, encoding)]
        segments.append(sep.join(err).rstrip(sep))
    return "".join(segment + "\r" for segment in segments)


def build_batch_ack(acks: list[str]) -> str:
    """ACKs (from build_ack) for the messages of one batch, as one BHS ... BTS batch.

    The HL7 batch protocol answers a batch with a batch of acknowledgments; over MLLP
    it travels as one frame, so a sender gets exactly one answer per frame it sent.
    BHS-3..7 are the first ACK's MSH-3..7 (already swapped); BTS-1 is the ACK count.
    """
    if not acks:
        raise ValueError("a batch acknowledgment needs at least one ACK")
    first = acks[0].split("\r", 1)[0]
    sep = first[3]
    fields = first.split(sep)  # fields[n-1] is MSH-n, fields[1] the encoding characters
    bhs = sep.join(["BHS", *fields[1:7]])
    return bhs + "\r" + "".join(acks) + f"BTS{sep}{len(acks)}\r"


def parse_ack(text: str) -> tuple[str, str, str]:
    """An ACK's (MSA-1 code, MSA-2 control id, text): text is MSA-3, else ERR-8, else ERR-3.2, unescaped.

    Lenient on MSH beyond the delimiters (remote systems send sloppy ACKs); Hl7Error if
    there is no MSA or MSA-1 is not an acknowledgment code.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_ack() takes str, not {type(text).__name__}")
    segments = _segments(text)
    if not segments or not segments[0].startswith("MSH"):
        raise Hl7Error("an ACK must start with MSH", "segment 1", "100")
    _delimiters(segments[0])
    try:
        parsed = hl7.parse("\r".join(segments))
        ids = [_value(segment, 0) for segment in parsed]
    except Exception as exc:
        raise Hl7Error(f"HL7 parser failed ({type(exc).__name__})", "segment 1 (MSH)", "102") from None
    if "MSA" not in ids:
        raise Hl7Error("no MSA segment: not an acknowledgment", "message", "100")
    msa = parsed[ids.index("MSA")]
    err = parsed[ids.index("ERR")] if "ERR" in ids else None
    where = f"segment {ids.index('MSA') + 1} (MSA)"
    ack_code = _value(msa, 1).strip().upper()
    if ack_code not in ACK_CODES:
        raise Hl7Error("MSA-1 is not an acknowledgment code (AA, AE, AR, CA, CE, CR)", f"{where}, field 1", "103")
    detail = _value(msa, 3)
    if not detail and err is not None:
        detail = _value(err, 8) or _value(err, 3, 2)
    return ack_code, _value(msa, 2), _unescape(parsed, detail)


def _unescape(parsed: hl7.Message, value: str) -> str:
    try:
        return parsed.unescape(value)
    except Exception:  # python-hl7 raises ValueError on some malformed escapes; the raw text is still useful
        return value
