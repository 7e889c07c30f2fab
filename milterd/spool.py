"""The message, spooled once per message by the core and shared by every plugin.

The body is kept in memory up to ``[milterd] spool_memory`` bytes, then in an anonymous
temporary file (removed when the message ends, whatever happens). Plugins never get a
copy of their own: they read the same spool.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Iterator
from typing import BinaryIO

from milterd.events import Header

__all__ = ["Message", "Spool", "header_line"]

_BARE_LF = re.compile(rb"(?<!\r)\n")
_CHUNK = 65536


def crlf(data: bytes) -> bytes:
    """Turn every bare LF into CRLF (MTAs send folded header lines with LF or CRLF)."""
    return _BARE_LF.sub(b"\r\n", data) if b"\n" in data else data


def header_line(header: Header) -> bytes:
    """The header field as it stands in the message: ``Name: value\\r\\n``."""
    return header.name.encode("ascii", "surrogateescape") + b":" + crlf(header.raw) + b"\r\n"


class Spool:
    """A write-once body buffer: memory up to ``limit`` bytes, then a temporary file."""

    __slots__ = ("_file", "_lock", "closed", "size")

    def __init__(self, limit: int, tmpdir: str | None = None) -> None:
        # Closed in close(), which the session calls when the message ends, whatever happens.
        self._file: BinaryIO = tempfile.SpooledTemporaryFile(  # type: ignore[assignment]  # noqa: SIM115
            max_size=limit, dir=tmpdir
        )
        # One file position, several readers: a plugin abandoned past its deadline may
        # still be reading on its helper thread while the next plugin reads. Each reader
        # keeps its own offset and seeks under this lock before every read.
        self._lock = threading.Lock()
        self.size = 0
        self.closed = False

    def write(self, chunk: bytes) -> None:
        with self._lock:
            self._file.seek(0, 2)
            self._file.write(chunk)
            self.size += len(chunk)

    def read(self) -> bytes:
        with self._lock:
            self._file.seek(0)
            return self._file.read()

    def chunks(self, size: int = _CHUNK) -> Iterator[bytes]:
        """The body in chunks, without loading it whole; readers never disturb each other."""
        offset = 0
        while True:
            with self._lock:
                self._file.seek(offset)
                block = self._file.read(size)
            if not block:
                return
            offset += len(block)
            yield block

    def close(self) -> None:
        """Release the memory or remove the temporary file. Safe to call twice."""
        if not self.closed:
            self.closed = True
            self._file.close()


class Message:
    """The message as plugins see it at end of message.

    ``headers`` are in order with their raw bytes; the body is read through :meth:`body`
    or :meth:`body_chunks`. A message built for the ``finalize`` stage is the message as it
    will be delivered (every other plugin's changes applied). When no enabled plugin
    reads the body (every one taking ``message`` says ``reads_body = False``, none hooks
    ``body``), the MTA does not send it and :meth:`body` is empty (in the harness too).
    """

    __slots__ = ("_body_override", "_spool", "headers")

    def __init__(
        self, headers: list[Header], spool: Spool | None, body: bytes | None = None
    ) -> None:
        self.headers = headers
        self._spool = spool
        self._body_override = body

    def get(self, name: str) -> str | None:
        """The decoded value of the first field named ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for h in self.headers:
            if h.name.lower() == lname:
                return h.value
        return None

    def get_all(self, name: str) -> list[str]:
        """The decoded values of every field named ``name``, in order."""
        lname = name.lower()
        return [h.value for h in self.headers if h.name.lower() == lname]

    def header_bytes(self) -> bytes:
        """The header block as it stands in the message, without the blank line."""
        return b"".join(header_line(h) for h in self.headers)

    def body(self) -> bytes:
        """The whole body (CRLF line ends, as the MTA sent it)."""
        if self._body_override is not None:
            return self._body_override
        return self._spool.read() if self._spool is not None else b""

    def body_chunks(self, size: int = _CHUNK) -> Iterator[bytes]:
        """The body in chunks of at most ``size`` bytes, without loading it whole."""
        if self._body_override is not None or self._spool is None:
            data = self.body()
            for i in range(0, len(data), size):
                yield data[i : i + size]
            return
        yield from self._spool.chunks(size)

    @property
    def body_size(self) -> int:
        if self._body_override is not None:
            return len(self._body_override)
        return self._spool.size if self._spool is not None else 0

    def as_bytes(self) -> bytes:
        """The whole message: header block, blank line, body."""
        return self.header_bytes() + b"\r\n" + self.body()
