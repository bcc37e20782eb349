"""HL7 v2 (ER7) text in and out: decoding, batch splitting, header parsing, ACKs.

Shared by the HTTP ingest and the MLLP listener so that both accept and refuse
exactly the same inputs. Field splitting follows python-hl7 (`hl7.parse`): a
message's MSH is split as python-hl7 splits it (_MshFields, without building its
tree of the whole message, which cost most of the listener's CPU), and ACKs and
salvaged headers go through python-hl7 itself; this module adds what that library
leaves out and what Courier relies on: strict checks of the delimiters and of MSH,
segment-terminator normalisation, batch envelopes, and never letting anything but
`Hl7Error` escape for bad input.

Header values in `Hl7Message` are the raw wire values (escape sequences kept),
so MSH-10 is echoed byte for byte in MSA-2 and used unchanged as the
idempotency key. parse_all() reads bytes message by message (split_raw), each
in the charset its MSH-18 declares (else the source's default), and keeps each
message's bytes as received (.raw) for storage. What is accepted and refused,
rule by rule, is docs/hl7.md's table; the tests hold this module to it.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import string
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import hl7
import hl7.containers
import hl7.parser
import hl7.util

from courier.adapters.hl7_charsets import charset_codec, content_charset

__all__ = [
    "ACK_CODES",
    "KNOWN_VERSIONS",
    "Hl7Error",
    "Hl7Message",
    "ack_code",
    "build_ack",
    "build_batch_ack",
    "declared_charset",
    "decode",
    "decode_with_codec",
    "parse",
    "parse_ack",
    "parse_all",
    "parse_raw",
    "parse_stored",
    "reread",
    "salvage_header",
    "split",
    "split_raw",
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
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]{1,3}")
_FIRST_MSH = re.compile(rb"(?:^|[\r\n\x0b])MSH([\x21-\x7e])")
_RAW_TERMINATOR = re.compile(rb"[\r\n]")
# HL7 table 0104 (version id), v2.1 to v2.9: MSH-12.1 must be one of them.
KNOWN_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
                  "2.8", "2.8.1", "2.8.2", "2.9", "2.9.1")
_MAX_CONTROL_ID = 199  # MSH-10 length limit since v2.7 (20 before); longer is not a control id.
_MSA3_MAX = 80  # MSA-3 is ST(80) in the versions that define it
_ERR8_MAX = 250  # ERR-8 is TX(250)


class Hl7Error(ValueError):
    """Input that can never be accepted. .reason (str: what is wrong), .where (str: e.g. 'segment 1 (MSH), field 9' or 'byte 0'), str(e) combines both.

    .error_code is the HL7 table 0357 code that fits (for ERR-3 of a reject ACK), .location
    the (segment id, segment occurrence, field, component) it points at, for ERR-2 (ERR-1 up
    to v2.4); None where no segment is to blame (a bad frame, an empty input).
    Reasons name structure (segment ids, fields, delimiters), never field contents,
    so they can be logged and returned without leaking PHI.
    """

    def __init__(self, reason: str, where: str = "", error_code: str = "102", location: tuple | None = None):
        # args carry everything so the exception survives pickling (Celery, multiprocessing).
        super().__init__(reason, where, error_code, location)
        self.reason = reason
        self.where = where
        self.error_code = error_code
        self.location = location

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
    encoding_characters: str  # MSH-2, e.g. '^~\\&' (or '^~\\&#' with the truncation character)
    processing_id: str     # MSH-11 first component
    accept_ack_type: str = ""       # MSH-15 (AL, NE, ER, SU; '' when absent)
    application_ack_type: str = ""  # MSH-16
    character_set: str = ""         # MSH-18 first repetition as sent ('' when absent)
    charset: str = "utf-8"          # the Python codec its bytes were decoded with
    raw: bytes = field(default=b"", repr=False, compare=False)  # its bytes as received (parse_all)

    @property
    def enhanced(self) -> bool:
        """Enhanced acknowledgment mode: the sender valued MSH-15 or MSH-16."""
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2 ('' for a bare ACK)."""
        return self.message_type.partition("^")[2]


# --------------------------------------------------------------------------- decoding

DEFAULT_CHARSET = "ASCII"  # HL7's default when MSH-18 is empty, unless the source configures another


def decode(raw: bytes) -> str:
    """Bytes of an HL7 v2 message or batch -> text, choosing the charset like a tolerant receiver would.

    Order: the charset MSH-18 declares, then ASCII, UTF-8 (after dropping a BOM), cp1252,
    latin-1, so bytes never make it fail; NUL bytes or no 'MSH' at all mean it is not HL7 v2.
    For reading a message to accept it, parse_all() is strict about MSH-18 instead.
    """
    return decode_with_codec(raw)[0]


def decode_with_codec(raw: bytes) -> tuple[str, str]:
    """decode(), plus the Python codec it chose: an MLLP ACK goes back in the sender's charset."""
    raw = _start(raw)
    return _decode(raw, None, strict=False)


def _start(raw: bytes) -> bytes:
    """Input as bytes without a leading BOM; Hl7Error for NUL bytes or no MSH at all."""
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
    return raw


def _decode(raw: bytes, default: str | None, *, strict: bool) -> tuple[str, str]:
    """(text, codec) of raw: per its first MSH-18, else the default charset (ASCII), falling back
    to UTF-8, cp1252 and latin-1 when the bytes are not valid in it.

    strict: an MSH-18 Courier cannot decode, or bytes that are not valid in the declared
    charset, are an Hl7Error (MSH-18 is never second-guessed into mojibake); otherwise they
    fall back like an undeclared charset (for addressing a reject ACK).
    """
    name = declared_charset(raw)
    if name:
        codec = charset_codec(name)
        where, location = "segment 1 (MSH), field 18", ("MSH", 1, 18, None)
        if codec is None:
            if strict:
                raise Hl7Error(f"MSH-18 (character set) {name[:30]!r} is not one Courier can decode (see "
                               "docs/hl7.md)", where, "103", location)
        else:
            try:
                return raw.decode(codec), codec
            except UnicodeDecodeError as exc:
                if strict:
                    raise Hl7Error(f"byte {exc.start} is not valid {name[:30]} (the charset MSH-18 declares)",
                                   where, "102", location) from None
    first = charset_codec(default or DEFAULT_CHARSET) or "ascii"
    for codec in dict.fromkeys((first, "utf-8", "cp1252")):
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1"), "iso8859-1"


def declared_charset(raw: bytes) -> str:
    """MSH-18 (first repetition, first component) of the first MSH in raw, as sent ('' if none)."""
    match = _FIRST_MSH.search(raw)
    if match is None:
        return ""
    segment = _RAW_TERMINATOR.split(raw[match.start(1) - 3:], maxsplit=1)[0]
    fields = segment.split(match.group(1))
    if len(fields) < 18:
        return ""
    value = fields[17]  # fields[0] is 'MSH', fields[1] is MSH-2, so MSH-n is fields[n-1]
    encoding_chars = fields[1]
    if len(encoding_chars) >= 2:
        value = value.split(encoding_chars[1:2])[0]  # first repetition
    if encoding_chars:
        value = value.split(encoding_chars[0:1])[0]  # first component
    return value.decode("ascii", "replace").strip()


# --------------------------------------------------------------------------- splitting

def _segments(text: str) -> list[str]:
    """Text -> non-blank segments, accepting CR, LF, CRLF or a mix as terminators."""
    text = text.strip(_SURROUNDING)
    return [line for line in _TERMINATOR.split(text) if line.strip()]


def _is_envelope(segment: str, name: str) -> bool:
    return segment.startswith(name) and (len(segment) == 3 or not segment[3].isalnum())


def split(text: str, *, counts: bool = True) -> list[str]:
    """Text of one message or a batch -> one '\\r'-joined text per message.

    FHS/BHS/BTS/FTS envelopes are dropped, each MSH starts a message. Refused: anything
    but FHS/BHS before the first MSH, a second FHS, a BHS inside an open batch, anything
    after FTS, no MSH at all, and a BTS-1 (FTS-1) that is not the number of messages in its
    batch (of batches in the file). Missing or unpaired trailers (BTS/FTS), or empty counts,
    are tolerated: real senders drop them and they carry nothing a receiver needs.
    counts=False skips the count checks (to answer each message of a batch refused for its count).
    """
    if not isinstance(text, str):
        raise TypeError(f"split() takes str, not {type(text).__name__}")
    segments = _segments(text)
    return ["\r".join(segments[i] for i in group) for group in _group(segments, counts)]


_RAW_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|\Z)")
_RAW_NOISE = b" \t\r\n\x0b\x0c\x1c"


def split_raw(raw: bytes) -> list[bytes]:
    """split() on bytes: each message's bytes exactly as received, from its MSH up to and with the
    terminator of its last segment (envelopes, blank lines and framing noise around it left out).

    Segment ids and terminators are ASCII in every charset Courier reads, so no decoding is needed
    (and each message of a batch may declare its own MSH-18).
    """
    raw = _start(raw)
    spans = []
    for match in _RAW_LINE.finditer(raw):
        line = match.group()
        if line.strip(_RAW_NOISE):
            start = match.start() + len(line) - len(line.lstrip(_RAW_NOISE)) if not spans else match.start()
            # The last line may end in noise instead of a terminator: text, framing bytes.
            end = match.end() if line.endswith((b"\r", b"\n")) else match.start() + len(line.rstrip(_RAW_NOISE))
            spans.append((start, end))
        if match.end() == len(raw):
            break
    segments = [raw[start:end].rstrip(b"\r\n").decode("latin-1") for start, end in spans]
    if not segments:
        raise Hl7Error("empty input", "byte 0", "100")
    return [raw[spans[group[0]][0]:spans[group[-1]][1]] for group in _group(segments)]


def _group(segments: list[str], counts: bool = True) -> list[list[int]]:
    """Segments (text, or bytes read as latin-1: only ids and counts are looked at) -> the
    indices of each message's segments. Hl7Error for a broken batch structure (see split)."""
    if not segments:
        raise Hl7Error("empty input", "byte 0", "100")
    messages: list[list[int]] = []
    current: list[int] | None = None
    seen_file_header = in_batch = after_file_trailer = False
    batch_start, batches, loose = 0, 0, False  # loose: messages outside BHS/BTS (an implied batch)
    for index, segment in enumerate(segments, 1):
        where = f"segment {index} ({_shown_id(segment)})"
        if after_file_trailer:
            raise Hl7Error("segment after the file trailer (FTS)", where, "100")
        if segment.startswith("MSH"):
            current = [index - 1]
            messages.append(current)
            loose = loose or not in_batch
        elif _is_envelope(segment, "FHS"):
            if seen_file_header or messages or in_batch:
                raise Hl7Error("FHS is only allowed once, as the first segment", where, "100", ("FHS", 1, None, None))
            seen_file_header = True
        elif _is_envelope(segment, "BHS"):
            if in_batch:
                raise Hl7Error("BHS inside a batch that has no BTS yet", where, "100", ("BHS", None, None, None))
            in_batch, current, batch_start = True, None, len(messages)
            batches += 1
        elif _is_envelope(segment, "BTS"):
            if counts:
                _check_count(segment, len(messages) - batch_start, "BTS-1 (batch message count)", "messages", where)
            in_batch, current, batch_start = False, None, len(messages)
        elif _is_envelope(segment, "FTS"):
            if counts:
                _check_count(segment, batches + loose, "FTS-1 (file batch count)", "batches", where)
            after_file_trailer, in_batch, current = True, False, None
        elif current is None:
            raise Hl7Error("segment outside a message: every message must start with MSH", where, "100")
        else:
            current.append(index - 1)
    if not messages:
        raise Hl7Error("no MSH segment: no message in the input", "segment 1", "100")
    return messages


def _check_count(segment: str, actual: int, what: str, unit: str, where: str) -> None:
    """A batch or file trailer's count (its field 1), when given, must be what was received."""
    value = segment[4:].split(segment[3:4] or "|")[0].strip() if len(segment) > 4 else ""
    if not value:
        return
    location = (segment[:3], None, 1, None)
    if not value.isdigit() or len(value) > 9:
        raise Hl7Error(f"{what} is not a number", f"{where}, field 1", "102", location)
    if int(value) != actual:
        raise Hl7Error(f"{what} says {int(value)} {unit}, {actual} were received", f"{where}, field 1",
                       "100", location)


def _shown_id(segment: str) -> str:
    """A segment id fit for an error message (repr when it is not printable ASCII)."""
    head = segment[:3]
    return head if _PRINTABLE_ID.fullmatch(head) else ascii(head)


# --------------------------------------------------------------------------- parsing

def _delimiters(segment: str) -> tuple[str, str]:
    """Check MSH-1/MSH-2 of an MSH segment; returns (field separator, encoding characters).

    Done before python-hl7 sees the text: it silently fills in defaults for missing
    encoding characters and asserts (AssertionError) on duplicated ones.
    """
    if len(segment) < 4:
        raise Hl7Error("MSH-1 (field separator) is missing", "segment 1 (MSH), field 1", "101", _msh(1))
    sep = segment[3]
    if sep not in _DELIMITER_CHARS:
        raise Hl7Error(f"MSH-1 (field separator) {sep!r} is not a printable ASCII non-alphanumeric character",
                       "segment 1 (MSH), field 1", "102", _msh(1))
    end = segment.find(sep, 4)
    encoding = segment[4:] if end == -1 else segment[4:end]
    where = "segment 1 (MSH), field 2"
    # Four (component, repetition, escape, subcomponent), or five with v2.7's truncation character,
    # which senders of every version use (v2.5.1 lab reporting feeds): kept, in any version.
    if not encoding:
        raise Hl7Error("MSH-2 (encoding characters) is missing", where, "101", _msh(2))
    if len(encoding) < 4:
        raise Hl7Error(f"MSH-2 (encoding characters) has {len(encoding)} characters; 4 are needed (component, "
                       "repetition, escape, subcomponent), or 5 with the truncation character", where, "102",
                       _msh(2))
    if len(encoding) > 5:
        raise Hl7Error(f"MSH-2 (encoding characters) has {len(encoding)} characters; at most 5 (the 5th is the "
                       "truncation character)", where, "102", _msh(2))
    for char in encoding:
        if char not in _DELIMITER_CHARS:
            raise Hl7Error(f"MSH-2 (encoding characters) contains {char!r}, not a printable ASCII "
                           "non-alphanumeric character", where, "102", _msh(2))
    if len(set(encoding)) != len(encoding) or sep in encoding:
        raise Hl7Error("MSH-2 (encoding characters) repeats a delimiter or the field separator", where, "102",
                       _msh(2))
    return sep, encoding


def _msh(field_number: int, component: int | None = None) -> tuple:
    """The location of an MSH field, for Hl7Error.location."""
    return ("MSH", 1, field_number, component)


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
        raise Hl7Error(f"a message must start with MSH, not {_shown_id(segments[0])}", "segment 1", "100",
                       ("MSH", 1, None, None))
    sep, encoding = _delimiters(segments[0])
    for index, segment in enumerate(segments[1:], 2):
        segment_id = segment[:3]
        if not _SEGMENT_ID.fullmatch(segment_id) or (len(segment) > 3 and segment[3] != sep):
            raise Hl7Error("segment id must be 3 uppercase letters or digits (starting with a letter) "
                           "followed by the field separator", *_segment_place(segments, index), "100",
                           _segment_location(segments, index))
        if segment_id == "MSH" or segment_id in _ENVELOPE:
            raise Hl7Error(f"{segment_id} inside a message (a batch must be split first)",
                           *_segment_place(segments, index), "100", _segment_location(segments, index))
    message_text = "\r".join(segments)
    bad = _FORBIDDEN.search(message_text)
    if bad:
        index = message_text.count("\r", 0, bad.start()) + 1
        raise Hl7Error(f"control character {bad.group()!r} inside the message", *_segment_place(segments, index),
                       "102", _segment_location(segments, index))
    # Only MSH is read, by _MshFields: python-hl7's tree of the whole message (hl7.parse) was most of the
    # listener's CPU, and every other segment has passed the checks above, on which python-hl7 cannot fail.
    # A message that is MSH alone is stripped as python-hl7 strips its input (Unicode whitespace too).
    msh = _MshFields(segments[0].strip() if len(segments) == 1 else segments[0], sep, encoding)
    return _header(message_text, msh, sep, encoding, strict=True)


def _segment_place(segments: list[str], index: int) -> tuple[str]:
    """Hl7Error's `where` for the segment at 1-based index (made only when there is an error)."""
    return (f"segment {index} ({_shown_id(segments[index - 1])})",)


def _segment_location(segments: list[str], index: int) -> tuple:
    return (_shown_id(segments[index - 1]), _occurrence(segments, index), None, None)


class _MshFields:
    """The raw values of an MSH segment as python-hl7's tree gives them (for `_value`), without building it.

    python-hl7 splits MSH-3 onwards on the field separator, then on the repetition, component and
    subcomponent separators (MSH-2's 2nd, 1st and 4th character); `_value` takes the first repetition,
    the component asked for and its first subcomponent. Splitting the one string the same way gives
    the same values (tests/unit/test_hl7v2.py checks it against python-hl7 on generated segments).
    """

    __slots__ = ("fields", "component", "repetition", "subcomponent")

    def __init__(self, segment: str, sep: str, encoding: str):
        end = segment.find(sep, 4)
        # python-hl7: no separator after MSH-2 and the segment itself is split again ("MSH", MSH-2): no MSH-3 on.
        rest = segment if end == -1 else segment[end + 1:]
        self.fields = ["MSH", sep, segment[4:end], *rest.split(sep)] if rest else ["MSH", sep, segment[4:end]]
        self.component, self.repetition, self.subcomponent = encoding[0], encoding[1], encoding[3]

    def __call__(self, field: int, component: int = 1) -> str:
        if field >= len(self.fields):
            return ""
        components = self.fields[field].split(self.repetition, 1)[0].split(self.component)
        if component > len(components):
            return ""
        return components[component - 1].split(self.subcomponent, 1)[0]


def _occurrence(segments: list[str], index: int) -> int:
    """Which occurrence of its id the segment at 1-based index is (ERR-2.2 segment sequence)."""
    head = segments[index - 1][:3]
    return sum(1 for segment in segments[:index] if segment[:3] == head)


def _header(message_text: str, msh, sep: str, encoding: str, *, strict: bool) -> Hl7Message:
    """Hl7Message from a parsed MSH (an _MshFields, or python-hl7's Segment); strict=False (for reject ACKs)
    skips the content checks."""
    value = msh if isinstance(msh, _MshFields) else lambda field, component=1: _value(msh, field, component)
    code, trigger = value(9, 1), value(9, 2)
    control_id = value(10)
    version = value(12)
    if strict:
        _check_header(code, trigger, control_id, version)
    return Hl7Message(
        text=message_text,
        message_type=f"HL7v2:{code}^{trigger}" if trigger else f"HL7v2:{code}",
        control_id=control_id,
        version=version,
        sending_application=value(3),
        sending_facility=value(4),
        receiving_application=value(5),
        receiving_facility=value(6),
        field_separator=sep,
        encoding_characters=encoding,
        processing_id=value(11),
        accept_ack_type=value(15).strip().upper(),
        application_ack_type=value(16).strip().upper(),
        character_set=value(18).strip(),
    )


def _check_header(code: str, trigger: str, control_id: str, version: str) -> None:
    """The MSH values Courier routes, deduplicates and answers on must be usable; Hl7Error if not."""
    where9, where10, where12 = ("segment 1 (MSH), field 9", "segment 1 (MSH), field 10",
                                "segment 1 (MSH), field 12")
    if not code:
        raise Hl7Error("MSH-9 (message type) is empty", where9, "101", _msh(9))
    if not _MESSAGE_CODE.fullmatch(code):
        raise Hl7Error("MSH-9.1 (message code) must be 1-20 letters, digits or '_'", where9, "102", _msh(9, 1))
    if not trigger and code != "ACK":
        raise Hl7Error("MSH-9.2 (trigger event) is empty", where9, "101", _msh(9, 2))
    if trigger and not _MESSAGE_CODE.fullmatch(trigger):
        raise Hl7Error("MSH-9.2 (trigger event) must be 1-20 letters, digits or '_'", where9, "102", _msh(9, 2))
    # Required although v2 lets receivers be lax: idempotency and MSA-2 depend on it.
    if not control_id.strip():
        raise Hl7Error("MSH-10 (message control id) is empty", where10, "101", _msh(10))
    if len(control_id) > _MAX_CONTROL_ID:
        raise Hl7Error(f"MSH-10 (message control id) is longer than {_MAX_CONTROL_ID} characters", where10, "102",
                       _msh(10))
    if _CONTROL.search(control_id):
        raise Hl7Error("MSH-10 (message control id) contains a control character", where10, "102", _msh(10))
    # Without a known version nothing says how the message is to be read (nor its ACK written).
    if not version.strip():
        raise Hl7Error("MSH-12 (version id) is empty", where12, "203", _msh(12))
    if version.strip() not in KNOWN_VERSIONS:
        raise Hl7Error(f"MSH-12 (version id) {version[:20]!r} is not an HL7 v2 version Courier knows "
                       f"(2.1 to 2.9: {', '.join(KNOWN_VERSIONS)})", where12, "203", _msh(12))


def parse_all(raw: bytes, default_charset: str | None = None) -> list[Hl7Message]:
    """Bytes of a message or batch -> every message, or Hl7Error for the first bad one (nothing half-accepted).

    Each message is read from its own bytes (split_raw), decoded per its MSH-18, else per
    default_charset (the source's setting; ASCII when None) with the tolerant fallback of
    _decode; .raw holds the bytes as received and .charset the codec used. For a batch,
    the error's where names the message ('message 2, segment 1 (MSH), field 10').
    """
    parts = split_raw(raw)
    messages = []
    for number, part in enumerate(parts, 1):
        try:
            messages.append(parse_raw(part, default_charset))
        except Hl7Error as exc:
            if len(parts) == 1:
                raise
            raise Hl7Error(exc.reason, f"message {number}, {exc.where}", exc.error_code, exc.location) from None
    return messages


def parse_raw(part: bytes, default_charset: str | None = None) -> Hl7Message:
    """One message's bytes (an element of split_raw) -> Hl7Message with .raw and .charset; Hl7Error if refused."""
    text, codec = _decode(part, default_charset, strict=True)
    return dataclasses.replace(parse(text), charset=codec, raw=part)


def reread(messages: list[Hl7Message], default_charset: str | None) -> list[Hl7Message]:
    """parse_all(raw, default_charset) for messages parse_all(raw) already read: each is parsed again only
    if its bytes decode to other text under the new default, else it only gets the new codec (Hl7Error as
    parse_all). The MLLP listener reads a frame before it knows the source, and so the source's charset."""
    again = []
    for number, message in enumerate(messages, 1):
        text, codec = _decode(message.raw, default_charset, strict=True)
        if codec == message.charset or text == message.raw.decode(message.charset):
            again.append(message if codec == message.charset else dataclasses.replace(message, charset=codec))
            continue
        try:
            again.append(dataclasses.replace(parse(text), charset=codec, raw=message.raw))
        except Hl7Error as exc:
            if len(messages) == 1:
                raise
            raise Hl7Error(exc.reason, f"message {number}, {exc.where}", exc.error_code, exc.location) from None
    return again


def parse_stored(body: bytes, content_type: str) -> Hl7Message:
    """A stored HL7 v2 message (bytes as received, the codec in the content type's charset) -> Hl7Message."""
    codec = content_charset(content_type)
    if codec is None:  # not ours: read it like a message received now
        return parse_all(body)[0]
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as exc:
        raise Hl7Error(f"byte {exc.start} is not valid {codec} (the stored charset)", f"byte {exc.start}") from None
    return dataclasses.replace(parse(text), charset=codec, raw=body)


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


def ack_code(msg: Hl7Message | None, outcome: str) -> str | None:
    """The acknowledgment code msg's sender asked for, for an outcome of AA, AE or AR; None for none.

    Original mode (MSH-15 and MSH-16 empty): the outcome itself. Enhanced mode: the accept
    acknowledgment CA, CE or CR, sent as MSH-15 asks: AL always (also when MSH-15 is empty or
    not a table 0155 value, so a sender waiting for an answer gets one), NE never, ER only for
    CE/CR, SU only for CA. Courier never sends application acknowledgments (MSH-16): its
    destinations answer Courier, not the sender.
    """
    if outcome not in ("AA", "AE", "AR"):
        raise ValueError(f"outcome must be AA, AE or AR, not {outcome!r}")
    if msg is None or not msg.enhanced:
        return outcome
    condition = msg.accept_ack_type
    if condition == "NE" or (condition == "ER" and outcome == "AA") or (condition == "SU" and outcome != "AA"):
        return None
    return "C" + outcome[1]


def build_ack(msg: Hl7Message | None, code: str, *, text: str = "", error_code: str | None = None,
              location: tuple | None = None, now: datetime | None = None, control_id: str | None = None) -> str:
    """An ACK for msg in its own delimiters, version and MSH-18, every segment ending in '\\r'.

    MSH-3/4 and MSH-5/6 are the message's MSH-5/6 and MSH-3/4 (whole fields, byte for byte),
    MSH-9 'ACK^<trigger>^ACK', MSH-10 control_id or a new 20-character id, MSH-12 and MSH-18
    the message's as received, MSA-2 the message's MSH-10 as received, MSA-3 the text.
    AE/AR/CE/CR add ERR: from v2.5 ERR-2 the location (segment^sequence^field[^^component]),
    ERR-3 the table 0357 code (default 207), ERR-4 'E', ERR-8 the text; up to v2.4, ERR-1
    (segment^sequence^field^code&text&HL70357); both when the version is not a known one.
    msg=None (nothing usable, see salvage_header) gives '|^~\\&', v2.5 and an empty MSA-2.
    MSH-7 is `now` (default: UTC) as YYYYMMDDHHMMSS.
    """
    if code not in ACK_CODES:
        raise ValueError(f"ACK code must be one of {sorted(ACK_CODES)}, not {code!r}")
    rejecting = code not in ("AA", "CA")
    if error_code is not None and not rejecting:
        raise ValueError("error_code only applies to AE, AR, CE and CR")
    charset = ""
    if msg is not None:
        sep, encoding, version = msg.field_separator, msg.encoding_characters, msg.version
        raw = _raw_msh_fields(msg)

        def value(n: int, fallback: str) -> str:
            if raw is None:
                return _embed(fallback, sep, encoding)
            return raw[n - 1] if n - 1 < len(raw) else ""

        receiver = [value(3, msg.sending_application), value(4, msg.sending_facility)]
        sender = [value(5, msg.receiving_application), value(6, msg.receiving_facility)]
        processing = value(11, msg.processing_id) or "P"
        charset = value(18, msg.character_set)
        # A salvaged header may carry any junk in MSH-9.2; the ACK only echoes a well-formed one.
        trigger = msg.trigger_event if _MESSAGE_CODE.fullmatch(msg.trigger_event) else ""
        original_id = _embed(msg.control_id, sep, encoding)
        version = _embed(version, sep, encoding)
        known = msg.version.strip() in KNOWN_VERSIONS
    else:
        sep, encoding, version = DEFAULT_FIELD_SEPARATOR, DEFAULT_ENCODING_CHARACTERS, DEFAULT_VERSION
        receiver, sender, processing, trigger, original_id = ["", ""], ["", ""], "P", "", ""
        known = False
    comp = encoding[0]
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    ack_id = _escape(control_id if control_id is not None else uuid.uuid4().hex[:20].upper(), sep, encoding)
    message_type = f"ACK{comp}{trigger}{comp}ACK" if trigger else "ACK"
    # MSH-1 is the separator itself, so MSH-2 follows 'MSH' directly.
    msh = [encoding, *sender, *receiver, stamp, "", message_type, ack_id, processing, version]
    if charset:
        msh += ["", "", "", "", "", charset]  # MSH-13..17 empty, MSH-18
    msa = ["MSA", code, original_id]
    if text:
        msa.append(_escape(text[:_MSA3_MAX], sep, encoding))
    segments = ["MSH" + sep + sep.join(msh), sep.join(msa)]
    if rejecting:
        old = known and (_version_tuple(msg.version) or (0, 0)) < (2, 5)
        new = not known or not old
        segments.append(_err(str(error_code) if error_code is not None else "207", location, text,
                             sep, encoding, old=not known or old, new=new))
    return "".join(segment + "\r" for segment in segments)


def _err(error_code: str, location: tuple | None, text: str, sep: str, encoding: str, *, old: bool,
         new: bool) -> str:
    """The ERR segment: ERR-1 (v2.1-2.4 ELD) when old, ERR-2/3/4/8 (v2.5+) when new."""
    comp, sub = encoding[0], encoding[3]
    segment_id, sequence, field_number, component = location or (None, None, None, None)
    place = ["" if v is None else _escape(str(v), sep, encoding) for v in (segment_id, sequence, field_number)]
    description = _escape(ERROR_CODES.get(error_code, ""), sep, encoding)
    code = _escape(error_code, sep, encoding)
    err = ["ERR", ""]
    if old:
        err[1] = comp.join([*place, sub.join([code, description, "HL70357"])])
    if new:
        erl = place + (["", str(component)] if component else [])
        err += [comp.join(erl).rstrip(comp), comp.join([code, description, "HL70357"]), "E", "", "", "",
                _escape(text[:_ERR8_MAX], sep, encoding)]
    return sep.join(err).rstrip(sep)


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
