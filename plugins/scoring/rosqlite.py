"""Read-only SQLite for a dry run (``milterd check``): the Bayes and greylist databases
are read, if they exist, without creating or changing any file.

A plain ``mode=ro`` connection to a WAL database creates the ``-wal`` and ``-shm`` files
when they are missing (and leaves them, owned by whoever ran the check: root, which
the daemon then cannot write). So: ``mode=ro`` only while both exist (a writer has the
database open and SQLite shares them), else ``immutable=1``, which reads the database
file alone and creates nothing (no writer has uncommitted pages in a WAL then).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator

__all__ = ["ReadOnlyPool", "connect_readonly"]


def connect_readonly(path: str, table: str, timeout: float = 5.0) -> sqlite3.Connection | None:
    """A read-only connection to the database at ``path``, or None when there is no such
    file or it has no table ``table`` (a database never written to)."""
    if not os.path.isfile(path):
        return None
    live = os.path.exists(path + "-wal") and os.path.exists(path + "-shm")
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?" + (
        "mode=ro" if live else "mode=ro&immutable=1"
    )
    db = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
    try:
        found = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
    except sqlite3.Error:
        db.close()
        raise
    if found is None:
        db.close()
        return None
    return db


class ReadOnlyPool:
    """What :class:`~plugins.sqlpool.SQLitePool` offers the stores (``conn()``,
    ``close()``), read-only: a fresh connection per use, closed after it (a dry run reads
    a handful of times). A write raises ``sqlite3.OperationalError``."""

    def __init__(self, path: str, table: str, timeout: float = 5.0) -> None:
        self.path = path
        self.table = table
        self.timeout = timeout

    @contextlib.contextmanager
    def conn(self) -> Iterator[sqlite3.Connection]:
        db = connect_readonly(self.path, self.table, self.timeout)
        if db is None:
            raise sqlite3.OperationalError(f"{self.path}: no database (dry run: not created)")
        try:
            yield db
        finally:
            db.close()

    def close(self) -> None:
        pass
