"""HL7 v2 character sets (MSH-18, HL7 table 0211) and the Python codecs that read them.

Pure data and lookups, shared by the parser (courier.app.hl7.er7), the configuration check
(a source's `charset`) and the MLLP adapter (its `charset` URL option); here because
adapters import nothing of courier.app.
"""
from __future__ import annotations

import codecs
import re

__all__ = ["body_charset", "charset_codec", "content_charset", "hl7_name"]

# HL7 table 0211 (MSH-18 character sets) -> Python codecs. ISO IR14/87/159 and
# CNS 11643 need ISO 2022 code switching that Python's codecs do not model: refused
# when declared. Bare "UNICODE" (deprecated) can only be UTF-8 in ER7 text: UTF-16/32
# bytes hold NULs, which are refused before any charset is looked at.
_HL7_CHARSETS = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "ISO IR100": "iso8859-1",
    "ISO IR192": "utf-8",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
_HL7_CHARSETS.update({f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)})
# ISO IR numbers of the 8859 parts (table 0211 names them both ways).
_HL7_CHARSETS.update({f"ISO IR{ir}": f"iso8859-{n}" for ir, n in
                      ((101, 2), (109, 3), (110, 4), (144, 5), (127, 6), (126, 7), (138, 8), (148, 9))})
# Names senders put in MSH-18 although HL7 does not define them ("UTF-8", "ISO-8859-1",
# "windows-1252") are honoured only if they resolve to one of these: an arbitrary codec
# (unicode_escape, utf-16, ...) could rewrite backslashes into control characters.
_SAFE_CODECS = frozenset(
    {codecs.lookup(c).name for c in set(_HL7_CHARSETS.values())}
    | {codecs.lookup(f"cp{n}").name for n in range(1250, 1259)}
    | {codecs.lookup(c).name for c in ("latin-1", "shift_jis", "euc_jp", "cp932", "gbk", "koi8-r")}
)


def charset_codec(name: str) -> str | None:
    """The Python codec for an MSH-18 value (an HL7 table 0211 name, or a common alias such as
    'UTF-8' or 'ISO-8859-1'), or None when Courier cannot decode it faithfully."""
    name = name.strip()
    codec = _HL7_CHARSETS.get(name.upper())
    if codec is not None:
        return codecs.lookup(codec).name
    try:
        resolved = codecs.lookup(name).name
    except LookupError:
        return None
    return resolved if resolved in _SAFE_CODECS else None


# The MSH-18 name written when Courier re-encodes a message (the MLLP adapter's charset option).
_PREFERRED = {"ascii": "ASCII", "utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000", "euc_kr": "KS X 1001",
              "big5": "BIG-5", **{f"iso8859-{n}": f"8859/{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)}}


def hl7_name(codec: str) -> str | None:
    """The HL7 table 0211 name of a Python codec (for MSH-18), or None if HL7 has none."""
    return _PREFERRED.get(codecs.lookup(codec).name)


def content_charset(content_type: str) -> str | None:
    """The codec of a content type's charset parameter ('application/hl7-v2; charset=iso8859-1'), if usable."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return charset_codec(value.strip().strip('"'))
    return None


def body_charset(content_type: str, body: bytes) -> str | None:
    """The codec a body is in: its content type's charset parameter, else (HL7 v2) its MSH-18; None if neither."""
    codec = content_charset(content_type)
    if codec is not None:
        return codec
    msh = re.split(rb"\r\n|\r|\n", body.lstrip(b"\xef\xbb\xbf \t\r\n"), maxsplit=1)[0]
    fields = msh.split(msh[3:4]) if msh.startswith(b"MSH") and len(msh) > 3 else []
    if len(fields) > 17 and len(fields[1]) >= 2:
        value = fields[17].split(fields[1][1:2])[0].split(fields[1][0:1])[0]
        return charset_codec(value.decode("ascii", "replace"))
    return None
