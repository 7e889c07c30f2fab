"""A small pool of SQLite connections shared by every thread (WAL mode), for the built-ins
that keep an SQLite file (scoring: greylisting and Bayes; dmarc: the report history).

libmilter runs every milter connection on a thread of its own, so a connection per thread
(thread-local) would grow with the number of SMTP sessions; the pool grows with the number
of concurrent users only."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SQLitePool"]


class SQLitePool:
    """Connections are created on demand and at most ``keep`` idle ones are kept, so the
    number of open connections is bounded by the concurrency, not by the thread count."""

    def __init__(
        self, path: str, timeout: float = 5.0, autocommit: bool = False, keep: int = 8
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.autocommit = autocommit
        self.keep = keep
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            timeout=self.timeout,
            check_same_thread=False,
            isolation_level=None if self.autocommit else "DEFERRED",
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextlib.contextmanager
    def conn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._open()
        try:
            yield db
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < self.keep
                if keep:
                    self._idle.append(db)
            if not keep:
                db.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            with contextlib.suppress(sqlite3.Error):
                db.close()
