"""Archive storage: the backend interface and the default local-file store.

:class:`ArchiveBackend` is the small interface the plugin and the CLI use; another store
(object storage, a database) can be added by a package that registers a factory in the
entry-point group ``milterd.archive_backends`` (see :func:`open_backend`).

:class:`FileStore` keeps each copy as one file, ``ROOT/YYYY/MM/DD/ID.eml`` (``.eml.zst``
when compressed; the as-received copy is ``ID.received.eml[.zst]``), and the metadata in an
SQLite index ``ROOT/index.sqlite3`` in WAL mode. A copy is written as an unnamed temporary
file in its day directory (O_TMPFILE), flushed with fsync, linked into place under its
name and the directory fsynced; only then is the index row committed. (Where the
filesystem has no O_TMPFILE, the temporary file is ``ROOT/tmp/PID....``, renamed into
place.) A crash therefore leaves either nothing (an unnamed file is freed by the
filesystem; a named one in ``tmp/`` is removed by the next start of any writer whose
process id it does not carry), or a complete file without an index row (``verify``
reports it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from json.encoder import encode_basestring_ascii as _encode_str
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ArchiveBackend",
    "Copy",
    "CopyError",
    "FileStore",
    "Problem",
    "Query",
    "Record",
    "StoreError",
    "new_id",
]

KINDS = ("delivered", "received")
_TMPFILE_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC
# verify: a file without an index row modified less than this many seconds before the
# run started may be a message being stored right now; it is not reported as an orphan.
# (Plus the longest a writer may wait for its row's commit: COMMIT_TIMEOUT and the
# index's busy timeout; past them it gives up and removes its copy.)
ORPHAN_SLACK = 2.0
# The longest a writer waits in the group commit before it withdraws its row.
COMMIT_TIMEOUT = 60.0


class StoreError(Exception):
    """The store cannot do what was asked (write failed, unknown id...)."""


class CopyError(StoreError):
    """A stored copy cannot be returned as it was archived. ``kind`` is the word
    ``verify`` reports: ``missing`` (no file), ``unreadable`` (cannot be read or
    decompressed: a truncated or corrupt zstd frame, permissions) or ``mismatch`` (size
    or SHA-256 differ from the index)."""

    def __init__(self, kind: str, path: str, detail: str) -> None:
        super().__init__(f"{path}: {kind}: {detail}")
        self.kind, self.path, self.detail = kind, path, detail


@dataclass(slots=True)
class Copy:
    """One stored copy of the message bytes."""

    path: str  # relative to the store root
    size: int  # uncompressed bytes
    sha256: str  # of the uncompressed bytes


@dataclass(slots=True)
class Record:
    """Everything the index knows about one archived message."""

    id: str
    received: float  # epoch seconds, when the message was archived
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    auth_user: str = ""
    queue_id: str = ""
    message_id: str = ""
    subject: str = ""
    date: str = ""
    verdict: str = "continue"
    score: float = 0.0
    results: list[str] = field(default_factory=list)
    direction: str = "inbound"
    size: int = 0  # of the primary copy (delivered if stored, else received)
    sha256: str = ""
    copies: dict[str, Copy] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["received_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.received))
        return d


@dataclass(slots=True)
class Query:
    """Search criteria; every given one must match. Text matches are case-insensitive."""

    sender: str | None = None  # address, or "@domain"/"domain" for the domain; "<>": null sender
    recipient: str | None = None  # idem, any recipient
    subject: str | None = None  # substring
    message_id: str | None = None  # exact, with or without <>
    since: float | None = None  # epoch seconds, inclusive
    until: float | None = None  # epoch seconds, exclusive
    verdict: str | None = None
    queue_id: str | None = None
    limit: int | None = None  # the newest N matches (still listed oldest first); >= 1


@dataclass(slots=True)
class Problem:
    """One thing ``verify`` found wrong."""

    kind: str  # missing, mismatch, unreadable, orphan, stale-temp, bad-row
    id: str
    path: str
    detail: str = ""


class ArchiveBackend(Protocol):
    """What the archive plugin and ``milterd archive`` need from a store."""

    def store(self, record: Record, copies: dict[str, Iterable[bytes]]) -> Record:
        """Write the copies durably and index ``record``; return it with ``copies``,
        ``size`` and ``sha256`` filled in. Raises StoreError (or OSError) on failure,
        leaving nothing behind."""
        ...

    def set_verdict(self, id: str, verdict: str) -> None: ...

    def get(self, id: str) -> Record | None: ...

    def read(self, record: Record, kind: str | None = None) -> bytes:
        """The bytes of one copy (default: delivered if stored, else received), checked
        against the size and SHA-256 the index holds for it. Raises CopyError (a
        StoreError) rather than return bytes that are not the archived ones."""
        ...

    def search(self, query: Query) -> list[Record]: ...

    def delete(self, id: str) -> bool: ...

    def older_than(self, cutoff: float) -> list[str]: ...

    def verify(self) -> list[Problem]: ...

    def close(self) -> None: ...


def new_id(now: float) -> str:
    """A unique, time-ordered, file-name-safe id: ``20261122T035012-1a2b3c4d5e6f``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(6)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    received REAL NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,          -- JSON list
    rcpt_search TEXT NOT NULL,         -- "\\naddr1\\naddr2\\n", lower case
    client_address TEXT, client_name TEXT, helo TEXT, auth_user TEXT,
    queue_id TEXT, message_id TEXT, subject TEXT, date TEXT,
    verdict TEXT NOT NULL, score REAL, results TEXT, direction TEXT,
    size INTEGER, sha256 TEXT,
    delivered_path TEXT, delivered_size INTEGER, delivered_sha256 TEXT,
    received_path TEXT, received_size INTEGER, received_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS messages_received ON messages(received);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(sender);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_queue_id ON messages(queue_id);
"""

_COLUMNS = (
    "id, received, sender, recipients, client_address, client_name, helo, auth_user, "
    "queue_id, message_id, subject, date, verdict, score, results, direction, size, sha256, "
    "delivered_path, delivered_size, delivered_sha256, received_path, received_size, "
    "received_sha256"
)


_INSERT = (
    "INSERT INTO messages (id, received, sender, recipients, rcpt_search, client_address, "
    "client_name, helo, auth_user, queue_id, message_id, subject, date, verdict, score, "
    "results, direction, size, sha256, delivered_path, delivered_size, delivered_sha256, "
    "received_path, received_size, received_sha256) VALUES (" + ",".join("?" * 25) + ")"
)


_MSG_ID = re.compile(r"<([^<>]*)>")


def message_id_key(mid: str) -> str:
    """A Message-ID as the index keeps it and a search matches it: the ``id-left@id-right``
    inside the first ``<...>`` (a comment or folding around it is not part of it), lower
    case; a value with no angle brackets is taken as it is, trimmed."""
    m = _MSG_ID.search(mid)
    return (m.group(1) if m else mid).strip().strip("<>").strip().lower()


class _Pending:
    """One writer's index row waiting in the group commit."""

    __slots__ = ("day", "error", "row", "signal", "state")

    def __init__(self, row: tuple[Any, ...], day: str) -> None:
        self.row = row
        self.day = day
        self.error: BaseException | None = None
        # "queued" -> "lead" (commit the queue now), or "taken" (in a batch another
        # writer commits) -> "done" (committed, or error set); or "withdrawn" (gave up
        # waiting while still queued). Changed only under _GroupCommit.lock, and the
        # signal is released under it too.
        self.state = "queued"
        # A plain lock as a one-shot signal: cheaper than an Event, and only this writer
        # waits on it (no thundering herd on one shared condition).
        self.signal = threading.Lock()
        self.signal.acquire()


class _GroupCommit:
    """Index rows of concurrent writers committed together (leader/follower, no thread of
    its own). A writer that finds no commit running commits its own row at once. Writers
    arriving while a commit runs queue up; when it ends, the finishing leader wakes the
    first of them as the next leader, which commits the whole queue with one fsync per
    day directory and one SQLite transaction (one WAL fsync), then wakes exactly the
    writers of its batch. Each writer returns once its own row is durable, or raises the
    error of its own row: a failed batch is retried row by row, so a row that cannot be
    inserted (or a directory that cannot be synced) fails only the messages concerned."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.queue: list[_Pending] = []
        self.busy = False

    def submit(self, row: tuple[Any, ...], day: str, timeout: float = COMMIT_TIMEOUT) -> None:
        """Commit one row; return when it is durable. Raises its error, or StoreError when
        the row was still queued after ``timeout`` seconds (then withdrawn, never
        committed). A row whose batch is already being committed when the timeout ends
        cannot be withdrawn (it may be in the index a moment later): its writer waits for
        the commit's outcome, as the leader itself does."""
        p = _Pending(row, day)
        with self.lock:
            if self.busy:
                self.queue.append(p)
            else:
                self.busy = True
                p.state = "lead"
        if p.state != "lead" and not p.signal.acquire(timeout=timeout):
            with self.lock:
                if p.state == "queued":
                    self.queue.remove(p)
                    p.state = "withdrawn"
                    raise StoreError(f"index commit not done within {timeout:g}s")
                taken = p.state == "taken"
            if taken:  # its batch is being committed: the outcome decides
                p.signal.acquire()
            # Otherwise it was made leader or done just now (under the lock): go on.
        if p.state == "done":
            if p.error is not None:
                raise p.error
            return
        with self.lock:  # the leader: everything queued so far joins this batch
            batch = [p, *(q for q in self.queue if q is not p)]
            self.queue = []
            for q in batch[1:]:
                q.state = "taken"
        try:
            errors = self._commit(batch)
        except BaseException as e:  # not an ordinary failure (KeyboardInterrupt...)
            errors = {id(q): e for q in batch}
        with self.lock:
            for q in batch:
                if q is not p:
                    q.error = errors.get(id(q))
                    q.state = "done"
                    q.signal.release()
            if self.queue:  # they arrived during this commit: the first one leads next
                nxt = self.queue[0]
                nxt.state = "lead"
                nxt.signal.release()
            else:
                self.busy = False
        mine = errors.get(id(p))
        if mine is not None:
            raise mine

    def _commit(self, batch: list[_Pending]) -> dict[int, BaseException]:
        """Make the batch durable: directory fsyncs, then the rows in one transaction.
        Returns the error of each row that failed, keyed by ``id()`` of its _Pending."""
        errors: dict[int, BaseException] = {}
        if self.store.fsync:
            for d in {q.day for q in batch}:
                try:
                    _fsync_dir(self.store.root / d)
                except OSError as e:  # that directory's new entries might not survive
                    for q in batch:
                        if q.day == d:
                            errors[id(q)] = e
        ok = [q for q in batch if id(q) not in errors]
        if not ok:
            return errors
        try:
            self.store._insert_rows([q.row for q in ok])
        except Exception as e:
            if len(ok) == 1:
                errors[id(ok[0])] = e
            else:  # the transaction was rolled back: find the rows that cannot go in
                for q in ok:
                    try:
                        self.store._insert_rows([q.row])
                    except Exception as e1:
                        errors[id(q)] = e1
        return errors


class FileStore:
    """Local files laid out by date, plus an SQLite (WAL) index. Thread-safe; several
    processes may share one directory.

    ``readonly``: never create or change anything (the index must exist). ``create``
    (writable stores only): make the directory and the index when missing; with False a
    missing index raises StoreError, so that a maintenance command given a wrong or
    unmounted path does not start an empty archive there."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        compress: bool = False,
        level: int = 3,
        fsync: bool = True,
        synchronous: str = "full",
        busy_timeout: float = 10.0,
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self._root, self._tmp = str(self.root), str(self.tmp)
        self.compress = compress
        self.level = level
        self.fsync = fsync
        self.busy_timeout = busy_timeout
        self._lock = threading.Lock()
        # Day directories known to exist. A day directory may still disappear (prune
        # removes a past day's directory it emptied): _write recreates it then.
        self._dirs: set[str] = set()
        db = self.root / "index.sqlite3"
        if (readonly or not create) and not db.is_file():
            raise StoreError(f"{db}: no archive index here")
        if not readonly and create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            str(db), timeout=busy_timeout, check_same_thread=False, isolation_level=None
        )
        # SQLite's lower() and LIKE fold ASCII letters only: "ÜBERWEISUNG" would not find
        # "Überweisung". Searches compare Python's casefold() of both sides instead.
        self.db.create_function("casefold", 1, _casefold, deterministic=True)
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if (readonly or not create) and self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
            ).fetchone() is None:
                # Another program's SQLite file (or an empty one): not ours to initialise.
                raise StoreError(f"{db}: not a milterd archive index (no messages table)")
            if not readonly:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
                self.db.executescript(_SCHEMA)
                self.tmp.mkdir(exist_ok=True)  # only now: the index is known to be ours
        except BaseException:
            self.db.close()
            raise
        self._committer: _GroupCommit | None = None
        # Unnamed temporary files (O_TMPFILE) linked into place, where the filesystem and
        # /proc allow it (probed once); else a named one in tmp/, renamed into place.
        self._proc_fd = -1
        # MILTERD_ARCHIVE_TMPFILE=0: named temporary files always (a filesystem that
        # claims O_TMPFILE but misbehaves; bench/archive.py's archive-rename variant).
        self.tmpfile = (
            not readonly
            and os.environ.get("MILTERD_ARCHIVE_TMPFILE", "1") != "0"
            and self._probe_tmpfile()
        )
        self._zstd: Any = None
        if compress:
            import zstandard

            self._zstd = zstandard

    # --- writing --------------------------------------------------------------------------

    def _probe_tmpfile(self) -> bool:
        """Whether copies can be written as unnamed files (O_TMPFILE) and linked into place
        by ``linkat(2)`` through ``/proc/self/fd``. The same guarantee as a named temporary
        file and a rename (a name appears only for a complete, flushed copy; a crash leaves
        nothing behind, not even a stale file), with one directory entry less to create,
        rename and journal a message: 0.97 against 1.17 ms of machine CPU per copy on a
        journaled ext4 (bench/flush_cost.py). Not every filesystem has O_TMPFILE."""
        if not hasattr(os, "O_TMPFILE"):
            return False
        probe = f"{self._tmp}/probe.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            # os.link() calls link(2), which does not follow the /proc symlink; giving a
            # directory descriptor makes it linkat(2) with AT_SYMLINK_FOLLOW (the source
            # path is absolute, so the descriptor itself is not used).
            self._proc_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fd = os.open(self._tmp, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o640)
            try:
                os.link(f"/proc/self/fd/{fd}", probe, src_dir_fd=self._proc_fd)
            finally:
                os.close(fd)
            os.unlink(probe)
            return True
        except OSError:
            if self._proc_fd >= 0:
                os.close(self._proc_fd)
                self._proc_fd = -1
            return False

    def _link(self, fd: int, path: str) -> None:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=self._proc_fd)

    def clean_temp(self) -> int:
        """Remove temporary files left by writers that no longer run. Returns the count."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                pid = entry.name.split(".", 1)[0]
                if pid.isdigit() and _alive(int(pid)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _day_dir(self, now: float) -> str:
        """The day directory (relative, ``YYYY/MM/DD``), created (and made durable) once."""
        rel = time.strftime("%Y/%m/%d", time.gmtime(now))
        self._make_dir(rel)
        return rel

    def _make_dir(self, rel: str) -> None:
        """Create the day directory ``rel`` unless known to exist (and make it durable)."""
        if rel not in self._dirs:
            path = self.root / rel
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                if self.fsync:  # the new directories' entries must survive a crash too
                    for p in (path.parent.parent.parent, path.parent.parent, path.parent):
                        _fsync_dir(p)
            self._dirs.add(rel)

    def _write(self, chunks: Iterable[bytes], rel: str) -> Copy:
        """Write one copy atomically to ``ROOT/rel``; returns its Copy. Straight to the
        file descriptor, no buffered file object: the plugin hands a small message over
        as one chunk, which becomes one write(2)."""
        final = f"{self._root}/{rel}"
        tmp: str | None = None
        if self.tmpfile:
            day = rel.rsplit("/", 1)[0]
            try:
                fd = os.open(f"{self._root}/{day}", _TMPFILE_FLAGS, 0o640)
            except FileNotFoundError:  # the day directory is gone: see below
                self._dirs.discard(day)
                self._make_dir(day)
                fd = os.open(f"{self._root}/{day}", _TMPFILE_FLAGS, 0o640)
        else:
            tmp = f"{self._tmp}/{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                if self._zstd is not None:
                    # Compressor objects are not safe to share between threads: one a copy.
                    # The frame carries a checksum of its content, so that a flipped byte
                    # fails decompression instead of yielding other text.
                    cctx = self._zstd.ZstdCompressor(level=self.level, write_checksum=True)
                    if isinstance(chunks, (tuple, list)) and len(chunks) == 1:
                        # One buffer: one-shot compression, a few times cheaper than the
                        # streaming object for a small message (no 128 KB work buffers).
                        digest.update(chunks[0])
                        size = len(chunks[0])
                        _write_all(fd, cctx.compress(chunks[0]))
                    else:
                        z = cctx.compressobj()
                        for c in chunks:
                            digest.update(c)
                            size += len(c)
                            _write_all(fd, z.compress(c))
                        _write_all(fd, z.flush())
                else:
                    for c in chunks:
                        digest.update(c)
                        size += len(c)
                        _write_all(fd, c)
                if self.fsync:
                    os.fsync(fd)
                if tmp is None:  # unnamed: given its name, complete and flushed
                    try:
                        self._link(fd, final)
                    except FileNotFoundError:
                        day = rel.rsplit("/", 1)[0]
                        self._dirs.discard(day)
                        self._make_dir(day)
                        self._link(fd, final)
            finally:
                os.close(fd)
            if tmp is None:
                return Copy(rel, size, digest.hexdigest())
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                if not os.path.exists(tmp):
                    raise
                # The cached day directory is gone (prune removes a past day's directory
                # it emptied; near midnight that may be the one this writer still uses):
                # forget it, create it again, and try once more.
                day = rel.rsplit("/", 1)[0]
                self._dirs.discard(day)
                self._make_dir(day)
                os.rename(tmp, final)
        except BaseException:
            if tmp is not None:  # (an unnamed file vanishes with its descriptor)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        return Copy(rel, size, digest.hexdigest())

    def store(self, record: Record, copies: dict[str, Iterable[bytes]]) -> Record:
        if not copies:
            raise StoreError("nothing to store")
        day = self._day_dir(record.received)
        ext = ".eml.zst" if self.compress else ".eml"
        written: list[str] = []
        try:
            for kind, chunks in copies.items():
                if kind not in KINDS:
                    raise StoreError(f"unknown copy kind {kind!r}")
                rel = f"{day}/{record.id}{'' if kind == 'delivered' else '.received'}{ext}"
                record.copies[kind] = self._write(chunks, rel)
                written.append(f"{self._root}/{rel}")
            primary = record.copies.get("delivered") or record.copies["received"]
            record.size, record.sha256 = primary.size, primary.sha256
            with self._lock:
                if self._committer is None:
                    self._committer = _GroupCommit(self)
                committer = self._committer
            committer.submit(self._row(record), day)  # fsyncs the directory, commits
        except BaseException:
            for p in written:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            raise
        return record

    @staticmethod
    def _row(r: Record) -> tuple[Any, ...]:
        d = r.copies.get("delivered")
        rc = r.copies.get("received")
        row = (
            r.id,
            r.received,
            _text(r.sender),
            _json_list([_text(a) for a in r.recipients]),
            # casefold, as the sender is searched (rows before 2026-12-03: lower())
            _text("\n" + "\n".join(a.casefold() for a in r.recipients) + "\n"),
            _text(r.client_address),
            _text(r.client_name),
            _text(r.helo),
            _text(r.auth_user),
            _text(r.queue_id),
            _text(r.message_id),
            _text(r.subject),
            _text(r.date),
            r.verdict,
            r.score,
            _json_list([_text(x) for x in r.results]),
            r.direction,
            r.size,
            r.sha256,
            d.path if d else None,
            d.size if d else None,
            d.sha256 if d else None,
            rc.path if rc else None,
            rc.size if rc else None,
            rc.sha256 if rc else None,
        )
        return row

    def _insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows in one transaction (one commit)."""
        with self._lock:
            if len(rows) == 1:  # autocommit: one implicit transaction
                self.db.execute(_INSERT, rows[0])
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(_INSERT, rows)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def set_verdict(self, id: str, verdict: str) -> None:
        with self._lock:
            self.db.execute("UPDATE messages SET verdict = ? WHERE id = ?", (verdict, id))

    # --- reading --------------------------------------------------------------------------

    @staticmethod
    def _record(row: tuple[Any, ...]) -> Record:
        (
            id_, received, sender, recipients, client_address, client_name, helo, auth_user,
            queue_id, message_id, subject, date, verdict, score, results, direction, size,
            sha256, dpath, dsize, dsha, rpath, rsize, rsha,
        ) = row  # fmt: skip
        copies = {}
        if dpath:
            copies["delivered"] = Copy(dpath, dsize, dsha)
        if rpath:
            copies["received"] = Copy(rpath, rsize, rsha)
        return Record(
            id=id_,
            received=received,
            sender=sender,
            recipients=_json_items(recipients),
            client_address=client_address or "",
            client_name=client_name or "",
            helo=helo or "",
            auth_user=auth_user or "",
            queue_id=queue_id or "",
            message_id=message_id or "",
            subject=subject or "",
            date=date or "",
            verdict=verdict,
            score=score or 0.0,
            results=_json_items(results or "[]"),
            direction=direction or "",
            size=size or 0,
            sha256=sha256 or "",
            copies=copies,
        )

    def get(self, id: str) -> Record | None:
        if not _encodable(id):  # a name that was not UTF-8 (a stray file, an argument)
            return None
        with self._lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (id,)).fetchone()
        return self._record(row) if row else None

    def _open_bytes(self, rel: str) -> bytes:
        """The uncompressed bytes of the file ``rel``. Raises OSError, or CopyError
        (``unreadable``) for a zstd file that is not exactly one complete, intact frame:
        a truncated frame decompresses to fewer bytes (or none) without any error, so the
        decompressor must be seen to reach the frame's end."""
        data = (self.root / rel).read_bytes()
        if not rel.endswith(".zst"):
            return data
        import zstandard

        d = zstandard.ZstdDecompressor().decompressobj()
        try:
            out = bytes(d.decompress(data))
        except zstandard.ZstdError as e:  # a frame checksum that does not match, ...
            raise CopyError("unreadable", rel, f"corrupt zstd frame: {e}") from None
        if not d.eof:
            raise CopyError("unreadable", rel, "truncated zstd frame")
        if d.unused_data:
            raise CopyError("unreadable", rel, "data after the zstd frame")
        return out

    def _load(self, c: Copy) -> bytes:
        """The bytes of one copy, checked against the index. Raises CopyError."""
        try:
            data = self._open_bytes(c.path)
        except FileNotFoundError:
            raise CopyError("missing", c.path, "file missing") from None
        except OSError as e:  # permissions, I/O error
            raise CopyError("unreadable", c.path, str(e)) from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != c.size or (c.sha256 and digest != c.sha256):
            raise CopyError(
                "mismatch",
                c.path,
                f"sha256 {digest} size {len(data)}, index says {c.sha256} size {c.size}",
            )
        return data

    def read(self, record: Record, kind: str | None = None) -> bytes:
        """The bytes of one copy (default: delivered if stored, else received), checked
        against the size and SHA-256 in the index. Raises CopyError (missing,
        unreadable, mismatch) instead of returning bytes that are not the archived
        ones, StoreError when no such copy is stored."""
        if kind is None:
            kind = "delivered" if "delivered" in record.copies else "received"
        c = record.copies.get(kind)
        if c is None:
            raise StoreError(f"{record.id}: no {kind} copy stored")
        try:
            return self._load(c)
        except CopyError as e:
            raise CopyError(e.kind, e.path, f"{record.id} {kind} copy: {e.detail}") from None

    def search(self, query: Query) -> list[Record]:
        """Matching records, oldest first; with ``limit`` the newest ``limit`` of them.
        Raises ValueError for a limit below 1."""
        if query.limit is not None and query.limit < 1:
            raise ValueError(f"limit must be at least 1, not {query.limit}")
        where: list[str] = []
        args: list[Any] = []
        if query.sender is not None and query.sender.strip() == "<>":  # bounces: null sender
            where.append("sender = ''")
        elif query.sender:
            s = query.sender.casefold()
            if "@" in s and not s.startswith("@"):
                where.append("casefold(sender) = ?")
                args.append(s)
            else:
                where.append("casefold(sender) LIKE ? ESCAPE '\\'")
                args.append("%@" + _like(s.lstrip("@")))
        if query.recipient:
            # Rows store casefolded recipients (older ones lower-cased): either form.
            forms = [query.recipient.casefold(), query.recipient.lower()]
            pats = [
                "%\n" + _like(f) + "\n%"
                if "@" in f and not f.startswith("@")
                else "%@" + _like(f.lstrip("@")) + "\n%"
                for f in forms
            ]
            where.append("(rcpt_search LIKE ? ESCAPE '\\' OR rcpt_search LIKE ? ESCAPE '\\')")
            args += pats
        if query.subject:
            where.append("casefold(subject) LIKE ? ESCAPE '\\'")
            args.append("%" + _like(query.subject.casefold()) + "%")
        if query.message_id:
            where.append("lower(message_id) = ?")
            args.append(message_id_key(query.message_id))
        if query.since is not None:
            where.append("received >= ?")
            args.append(query.since)
        if query.until is not None:
            where.append("received < ?")
            args.append(query.until)
        if query.verdict:
            where.append("verdict = ?")
            args.append(query.verdict.lower())
        if query.queue_id:
            where.append("queue_id = ?")
            args.append(query.queue_id)
        args = [_text(a) for a in args]  # a query that was not UTF-8 (as stored: U+FFFD)
        sql = f"SELECT {_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if query.limit is None:
            sql += " ORDER BY received, id"
        else:  # the newest N, read newest first, then put back in time order
            sql += f" ORDER BY received DESC, id DESC LIMIT {min(int(query.limit), 2**63 - 1)}"
        with self._lock:
            rows = self.db.execute(sql, args).fetchall()
        if query.limit is not None:
            rows.reverse()
        return [self._record(r) for r in rows]

    # --- maintenance ----------------------------------------------------------------------

    def delete(self, id: str) -> bool:
        """Remove one message: the index row first, then its files; then the directories
        of a past day (``YYYY/MM/DD``, and its month and year) that this left empty.
        Today's (UTC) are kept: writers are using them. A writer that still has a removed
        directory cached creates it again (see _write)."""
        rec = self.get(id)
        if rec is None:
            return False
        # The row goes first (a crash in between leaves an orphan file, which verify
        # reports, never a row without its file); so check first that the files can go
        # too, or a permission problem would leave files no tool deletes any more.
        for c in rec.copies.values():
            d = (self.root / c.path).parent
            if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
                raise StoreError(f"{id}: cannot remove {c.path}: {d} is not writable")
        with self._lock:
            self.db.execute("DELETE FROM messages WHERE id = ?", (id,))
        for c in rec.copies.values():
            try:
                os.unlink(self.root / c.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreError(
                    f"{id}: index row removed, but not {c.path} ({e.strerror}): "
                    "verify reports it as an orphan; remove it by hand"
                ) from e
        today = time.strftime("%Y/%m/%d", time.gmtime())
        for day in {c.path.rsplit("/", 1)[0] for c in rec.copies.values()}:
            parts = day.split("/")
            if len(parts) != 3 or day == today:
                continue
            for n in (3, 2, 1):  # day, month, year: each only if now empty and not today's
                rel = "/".join(parts[:n])
                if today.startswith(rel + "/"):
                    break
                try:
                    os.rmdir(self.root / rel)
                except OSError:  # not empty (the usual case), or already gone
                    break
                self._dirs.discard(day)
        return True

    def damage(self, id: str) -> str:
        """What is wrong with the index row ``id`` (see :func:`_row_damage`), or ''."""
        with self._lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (id,)).fetchone()
        return _row_damage(row) if row is not None else ""

    def older_than(self, cutoff: float) -> list[str]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id FROM messages WHERE received < ? ORDER BY received", (cutoff,)
            ).fetchall()
        return [r[0] for r in rows]

    def files(self, onerror: Callable[[OSError], object] | None = None) -> Iterator[str]:
        """Every copy file under the date layout, relative to the root. ``onerror`` is
        given each directory that cannot be listed (else it is skipped silently)."""
        for year in sorted(self.root.iterdir()):
            if not (year.is_dir() and year.name.isdigit()):
                continue
            for dirpath, _dirs, names in os.walk(year, onerror=onerror):
                for n in names:
                    yield str((Path(dirpath) / n).relative_to(self.root))

    def _indexed(self, id: str, rel: str | None = None) -> bool:
        """Whether the index has the row ``id`` now (and, given ``rel``, that row names
        the file ``rel``)."""
        rec = self.get(id)
        return rec is not None and (rel is None or rel in {c.path for c in rec.copies.values()})

    def verify(self) -> list[Problem]:
        """Every indexed copy present with a matching SHA-256; every file indexed; no
        temporary files left by dead writers.

        Safe on a live archive: a problem is reported only if it still holds when seen
        (a copy found missing whose row is gone meanwhile was pruned; a file without a
        row when the rows were read is looked up again, and one modified less than
        ORPHAN_SLACK seconds before the run started, or since, is a message being stored
        now, not an orphan)."""
        start = time.time()
        problems: list[Problem] = []
        known: set[str] = set()
        with self._lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM messages ORDER BY received").fetchall()
        for row in rows:
            rec = self._record(row)
            damage = _row_damage(row)
            if damage:
                problems.append(Problem("bad-row", rec.id, "", damage))
            for kind, c in rec.copies.items():
                known.add(c.path)
                try:
                    self._load(c)
                except CopyError as e:
                    if e.kind == "missing" and not self._indexed(rec.id):
                        continue  # pruned since the rows were read
                    problems.append(Problem(e.kind, rec.id, c.path, f"{kind} copy: {e.detail}"))
                except Exception as e:  # anything else that stops the copy being read
                    problems.append(Problem("unreadable", rec.id, c.path, f"{kind} copy: {e}"))
        # A copy is in place before its row is committed, and a writer may wait for that
        # commit up to COMMIT_TIMEOUT and the index's busy timeout (then it removes it).
        in_flight = start - ORPHAN_SLACK - COMMIT_TIMEOUT - self.busy_timeout
        unlistable: list[OSError] = []
        for rel in self.files(unlistable.append):
            if rel in known:
                continue
            try:
                # Written during this run, or just before it (file times come from a
                # coarse clock), by a writer that may still commit its row.
                if os.stat(self.root / rel).st_mtime >= in_flight:
                    continue
            except FileNotFoundError:
                continue  # pruned meanwhile
            if self._indexed(rel.rsplit("/", 1)[-1].split(".", 1)[0], rel):
                continue  # its row was committed after the rows were read
            problems.append(Problem("orphan", "", rel, "file not in the index"))
        for err in unlistable:  # files in it could not be checked: not a clean bill
            rel = str(Path(err.filename or "?")).removeprefix(f"{self._root}/")
            problems.append(Problem("unreadable", "", rel, f"directory not listed: {err.strerror}"))
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                pid = entry.name.split(".", 1)[0]
                if not (pid.isdigit() and _alive(int(pid))):
                    problems.append(
                        Problem("stale-temp", "", f"tmp/{entry.name}", "left by a dead writer")
                    )
        return problems

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.db.close()
        if self._proc_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._proc_fd)
            self._proc_fd = -1


def _text(s: Any) -> Any:
    """``s`` as SQLite can store it (UTF-8). Header values and envelope strings reach the
    store decoded with surrogate escapes for bytes that are not UTF-8 (a raw Latin-1
    subject, say); SQLite refuses those, and the message would be tempfailed. The index
    keeps them as U+FFFD; the stored copy keeps the bytes. Anything but a string is
    passed on as it is (SQLite's constraints judge it)."""
    if not isinstance(s, str) or s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # a surrogate that is not an escaped byte
            return s.encode("utf-8", "replace").decode("utf-8")


def _string_list(text: Any) -> list[str] | None:
    """A JSON list column as written by :func:`_json_list`, or None if it is not one."""
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def _json_items(text: Any) -> list[str]:
    """A JSON list column; a damaged value (edited by hand, another program's) is kept
    whole as the only item, so that search, show and prune go on (``verify`` reports the
    row as ``bad-row``)."""
    v = _string_list(text)
    return v if v is not None else [str(text)]


def _row_damage(row: tuple[Any, ...]) -> str:
    """What is wrong with an index row's JSON columns (recipients, results), or ''."""
    return "; ".join(
        f"{name} is not a JSON list of strings: {str(text)[:60]!r}"
        for name, text in (("recipients", row[3]), ("results", row[14] or "[]"))
        if _string_list(text) is None
    )


def _json_list(items: list[str]) -> str:
    """``json.dumps(items)`` for a list of strings, byte for byte, without the encoder's
    per-call set-up (two of these per archived message)."""
    return "[" + ", ".join(map(_encode_str, items)) + "]"


def _write_all(fd: int, data: bytes) -> None:
    """write(2) until every byte is written (a regular file may take fewer at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _casefold(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def _like(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _encodable(text: str) -> bool:
    """Whether SQLite can take ``text`` (no surrogate escapes of bytes that were not
    UTF-8; no id has them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not a live writer.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True
