"""File adapter: one file per delivery in a drop directory.

URL
===

.. code-block::

    file:///ABSOLUTE/DIR[?suffix=.EXT]

    file:///var/spool/courier/billing
    file:///mnt/erp-share/in?suffix=.xml

The host part must be empty or ``localhost`` (``file://dir`` with two slashes
is refused: it names a host, not a directory). Percent-escapes in the path are
decoded. The directory is not created: a missing directory usually means a
share that is not mounted, and writing under the mount point would hide that.

Options
=======

* ``suffix``: file name extension, e.g. ``.xml``, overriding the one chosen
  from the content type (``.json`` for JSON, ``.hl7`` for HL7 v2, ``.csv``
  for text/csv, ``.bin`` otherwise).

``timeout`` and ``secret`` are accepted and ignored.

Writing
=======

The body goes to ``DIR/<delivery id><suffix>``: written to a hidden temporary
file ``.<delivery id>.tmp-<random>`` in the same directory, fsynced, renamed
into place, then the directory is fsynced. A reader never sees a partial file,
and a redelivery replaces the same name, so each delivery leaves exactly one
file. A process killed mid-write can leave a hidden temporary file behind;
consumers should ignore names starting with ".".

Outcome
=======

* Delivery ids other than 1-200 of ``[A-Za-z0-9_-]``: PermanentError (they
  could escape the directory).
* Every OS error (missing directory, permission denied, disk full, read-only
  remount...): TemporaryError; an operator can fix each without losing the message.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from urllib.parse import parse_qs, unquote, urlsplit

from courier.adapters.base import Adapter, Outgoing, PermanentError, Sent, TemporaryError

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_.-]{0,15}")
_OPTIONS = {"suffix"}

# Some network filesystems cannot fsync a directory. The rename itself has
# succeeded by then, so failing the delivery would only retry it forever.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def suffix_for(content_type: str) -> str:
    """The file extension for a content type: .json, .hl7, .csv, or .bin."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/json" or mime.endswith("+json"):
        return ".json"
    if "hl7" in mime:  # application/hl7-v2, x-application/hl7-v2+er7, ...
        return ".hl7"
    if mime == "text/csv":
        return ".csv"
    return ".bin"


class FileAdapter(Adapter):
    """Writes each delivery atomically to its own file in a directory."""

    scheme = ("file",)

    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None):
        super().__init__(url, timeout=timeout, secret=secret)
        self.directory, self.suffix = _parse(url)

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        _parse(url)

    def send(self, out: Outgoing) -> Sent:
        if not _SAFE_ID.fullmatch(out.delivery_id):
            raise PermanentError("delivery id is not a safe file name (allowed: 1-200 of A-Z a-z 0-9 _ -)")
        final = os.path.join(self.directory, out.delivery_id + (self.suffix or suffix_for(out.content_type)))
        tmp = os.path.join(self.directory, f".{out.delivery_id}.tmp-{secrets.token_hex(4)}")
        try:
            _write_atomically(tmp, final, out.body, self.directory)
        except OSError as exc:
            raise TemporaryError(_describe(exc, self.directory)) from None
        return Sent(detail=f"wrote {final}")


def _parse(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URL names host {parts.netloc!r}; use three slashes for a directory: file:///dir")
    path = unquote(parts.path)
    if not path or not os.path.isabs(path):
        raise ValueError("file URL needs an absolute directory path, e.g. file:///var/spool/courier")
    if "\x00" in path:
        raise ValueError("file URL path contains a NUL character")
    if parts.fragment:
        raise ValueError("file URL must not have a #fragment")
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown file URL option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_OPTIONS))}")
    suffix = None
    if "suffix" in options:
        suffix = options["suffix"][-1]
        if not _SAFE_SUFFIX.fullmatch(suffix):
            raise ValueError(f"file URL suffix {suffix!r} must look like .xml (a dot, then up to 16 of A-Z a-z 0-9 _ . -)")
    return os.path.normpath(path), suffix


def _write_atomically(tmp: str, final: str, body: bytes, directory: str) -> None:
    # O_EXCL: never write through a file (or symlink) someone else put at the temporary name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # Make the rename itself durable, or a crash could bring back the old directory entry.
    dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(dfd)


def _describe(exc: OSError, directory: str) -> str:
    if exc.errno == errno.ENOENT and not os.path.isdir(directory):
        return f"directory {directory} does not exist (share not mounted?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied writing to {directory}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left in {directory}"
    name = errno.errorcode.get(exc.errno, exc.errno) if isinstance(exc.errno, int) else exc.errno
    return f"cannot write to {directory}: {exc.strerror or exc} ({name})"
