"""Logging set-up: text or JSON lines on stderr (journald adds time and unit)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping

__all__ = ["JsonFormatter", "LazyFields", "TextFormatter", "setup_logging", "to_journal"]


class LazyFields(Mapping[str, object]):
    """A record's structured fields, built on first read: the per-message summary's dict
    costs as much as the line itself, and only the JSON format reads it."""

    __slots__ = ("_build", "_data")

    def __init__(self, build: Callable[[], dict[str, object]]) -> None:
        self._build = build
        self._data: dict[str, object] | None = None

    def _fields(self) -> dict[str, object]:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, key: str) -> object:
        return self._fields()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields())

    def __len__(self) -> int:
        return len(self._fields())

    def __reduce__(self) -> tuple[type[dict[str, object]], tuple[dict[str, object]]]:
        return (dict, (self._fields(),))  # a pickled record (SocketHandler) gets the dict


class _Worker(logging.Filter):
    """Adds ``worker`` (the worker index, ``-`` in the supervisor) to every record."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = -1
        self._worker = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.process != self._pid:  # read once per process, not once per record
            self._pid = record.process or -1
            self._worker = os.environ.get("MILTERD_WORKER", "-")
        record.worker = self._worker
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line. The per-message summary's fields are top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "worker": getattr(record, "worker", "-"),
            "message": record.getMessage(),
        }
        summary = getattr(record, "summary", None)
        if isinstance(summary, Mapping):
            out.update(summary)
        for key in ("plugin", "queue_id"):
            if hasattr(record, key) and key not in out:
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# What a sender controls (HELO, addresses, header values) must not start a line of its
# own or drive the terminal: C0 controls but tab, DEL and the C1 controls are escaped.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


class TextFormatter(logging.Formatter):
    """The text format, one line per record: control characters in the message (never in
    a traceback that follows it) are written as ``\\xNN``, so a sender's CR LF cannot
    forge a log line. (JSON escapes them by itself.) A plugin's line (``ctx.log``) starts
    with the message's queue id (``NOQUEUE`` before the MTA has one), as the core's
    summary line and Postfix's own lines do."""

    _second: tuple[int, str] | None = None  # the last second formatted, and its text

    def formatTime(  # noqa: N802 - logging's name
        self, record: logging.LogRecord, datefmt: str | None = None
    ) -> str:
        """logging's own time stamp, with the date and time of a second made once for
        all the records of that second (strftime per record was a tenth of a line's cost)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        sec = math.floor(record.created)  # as localtime() takes it, before 1970 too
        last = self._second
        if last is None or last[0] != sec:
            text = time.strftime(self.default_time_format, self.converter(sec))
            last = self._second = (sec, text)
        if not self.default_msec_format:
            return last[1]
        return self.default_msec_format % (last[1], record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if _CONTROL.search(record.message):
            record.message = _CONTROL.sub(_escape, record.message)
        qid = getattr(record, "queue_id", None)
        if qid is not None and hasattr(record, "plugin"):  # ctx.log: as Postfix's lines
            record.message = f"{_CONTROL.sub(_escape, qid) or 'NOQUEUE'}: {record.message}"
        return super().formatMessage(record)


def to_journal() -> bool:
    """Whether stderr is the systemd journal: ``$JOURNAL_STREAM`` (``DEVICE:INODE``, set by
    systemd for a service whose stderr it connected) names the very file stderr is, so
    a process that merely inherited the variable and writes elsewhere does not match."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    # Per-record work nobody reads (the logging HOWTO's "Optimization" list): the caller's
    # file and line (a stack walk per record), thread and multiprocessing names. At info
    # level every message logs a summary line from a libmilter thread: ~20 % off each.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Worker())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # The journal stamps every line itself: a second time stamp would only be noise.
        stamp = "" if to_journal() else "%(asctime)s "
        handler.setFormatter(
            TextFormatter(
                stamp + "milterd[%(process)d/w%(worker)s] %(levelname)s %(name)s: %(message)s"
            )
        )
    root = logging.getLogger("milterd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
