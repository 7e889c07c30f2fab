"""Read-only SQLite for a dry run (``milterd check``): the Bayes and greylist databases
are read, if they exist, without creating or changing any file.

A plain ``mode=ro`` connection to a WAL database creates the ``-wal`` and ``-shm`` files
when they are missing (and leaves them, owned by whoever ran the check: root, which
the daemon then cannot write), and rebuilds a ``-shm`` a crashed writer left. So:

* no ``-wal``, or an empty one: ``immutable=1``, which reads the database file alone and
  touches nothing (there is nothing committed elsewhere);
* a ``-wal`` with content (a daemon running, or one that crashed): the database and its
  ``-wal`` are copied to a private temporary directory, SQLite recovers the copy there,
  and the result is read into memory; the state directory is never opened for writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Iterator

__all__ = ["ReadOnlyPool", "connect_readonly"]


def connect_readonly(path: str, table: str, timeout: float = 5.0) -> sqlite3.Connection | None:
    """A read-only connection to the database at ``path``, or None when there is no such
    file or it has no table ``table`` (a database never written to)."""
    if not os.path.isfile(path):
        return None
    wal = path + "-wal"
    if os.path.isfile(wal) and os.path.getsize(wal) > 0:
        db = _recovered_copy(path, wal, timeout)
    else:
        uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro&immutable=1"
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


def _recovered_copy(path: str, wal: str, timeout: float) -> sqlite3.Connection:
    """The database with its WAL applied, in memory, from a private copy (see above)."""
    with tempfile.TemporaryDirectory(prefix="milterd-dry-run-") as tmp:
        copy = os.path.join(tmp, "db.sqlite")
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, copy + "-wal")
        src = sqlite3.connect(copy, timeout=timeout)
        try:
            mem = sqlite3.connect(":memory:", check_same_thread=False)
            src.backup(mem)
        finally:
            src.close()
    return mem


class ReadOnlyPool:
    """What :class:`~plugins.sqlpool.SQLitePool` offers the stores (``conn()``,
    ``close()``), read-only: a fresh connection per use, closed after it (a dry run reads
    a handful of times). A write never reaches the file."""

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
