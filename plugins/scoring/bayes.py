"""A Bayesian classifier: tokens from headers and text, Robinson-Fisher combining.

Token probabilities follow Gary Robinson's f(w) with the chi-square (Fisher) combination
used by SpamBayes; the result is a spam probability in [0, 1]. Counts live in SQLite (WAL,
one connection per thread) or in Redis when several milterd hosts share one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..sqlpool import SQLitePool
from .content import Content
from .rosqlite import ReadOnlyPool, connect_readonly

__all__ = [
    "Classifier",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "chi2q",
    "open_store",
    "open_store_readonly",
    "tokenize",
]

_WORD = re.compile(r"[^\W\d_][\w'$!@.-]{2,24}", re.UNICODE)
_HEADERS = ("subject", "from", "to", "reply-to", "x-mailer", "user-agent", "content-type")
# The lookbehind lets a match start only where a run of address characters starts: without
# it a long run with no "@" (``Subject: aaaa...``) was rescanned from every position,
# quadratic (18 s for 80 KB) before the scan budget applies.
_ADDR = re.compile(r"(?<![\w.+-])[\w.+-]+@([\w-]+(?:\.[\w-]+)+)")


def tokenize(headers: Iterable[tuple[str, str]], content: Content, limit: int) -> list[str]:
    """Unique tokens, first seen first, at most ``limit``: header words carry a prefix."""
    seen: dict[str, None] = {}

    def add(tok: str) -> bool:
        if len(tok) > 64:
            tok = tok[:64]
        seen.setdefault(tok, None)
        return len(seen) >= limit

    for name, value in headers:
        lname = name.lower()
        if lname not in _HEADERS:
            continue
        prefix = lname[:2] + ":"
        for m in _ADDR.finditer(value):
            if add(prefix + "@" + m.group(1).lower()):
                return list(seen)
        for w in _WORD.findall(value):
            if add(prefix + w.lower().strip(".-")):
                return list(seen)
    for h in content.hosts:
        if add("url:" + h):
            return list(seen)
    for a in content.attachments:
        if add("att:" + (a.filename.rsplit(".", 1)[-1].lower() or a.content_type)):
            return list(seen)
    for word in dict.fromkeys(_WORD.findall(content.text.lower())):
        w = word.strip(".-")
        if len(w) >= 3 and w not in seen and add(w):
            break
    return list(seen)


def chi2q(x2: float, v: int) -> float:
    """P(chi-square with ``v`` (even) degrees of freedom >= ``x2``)."""
    m = x2 / 2.0
    term = math.exp(-m)
    total = term
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def _pack(tokens: Sequence[str]) -> bytes:
    """The tokens a message was learned with, as stored next to its digest (zlib: about a
    third of the plain size)."""
    return zlib.compress("\n".join(tokens).encode("utf-8", "surrogateescape"))


def _unpack(blob: Any) -> list[str] | None:
    if not blob:
        return None
    try:
        text = zlib.decompress(bytes(blob)).decode("utf-8", "surrogateescape")
    except zlib.error:
        return None
    return text.split("\n") if text else []


class Store(Protocol):
    """Token counts (never below 0) and the messages learned: label and tokens by digest."""

    def counts(self, tokens: Sequence[str]) -> dict[str, tuple[int, int]]: ...
    def totals(self) -> tuple[int, int]: ...
    def learn(self, tokens: Sequence[str], spam: bool, delta: int) -> None: ...
    def seen(self, digest: str) -> str | None: ...
    def learned_tokens(self, digest: str) -> list[str] | None: ...
    def set_seen(
        self, digest: str, label: str | None, tokens: Sequence[str] | None = None
    ) -> None: ...
    def learn_message(self, digest: str, label: str, tokens: Sequence[str]) -> bool: ...
    def close(self) -> None: ...


class SQLiteStore:
    """Token counts in one SQLite file (WAL), through a small connection pool."""

    pool: SQLitePool | ReadOnlyPool

    @classmethod
    def readonly(cls, path: str, timeout: float = 5.0) -> SQLiteStore | None:
        """The store at ``path`` opened read-only (a dry run: classify, never learn), or
        None when it does not exist; creates no file. Learning raises."""
        db = connect_readonly(path, "tokens", timeout)
        if db is None:
            return None
        db.close()
        store = cls.__new__(cls)
        store.path = path
        store.pool = ReadOnlyPool(path, "tokens", timeout)
        return store

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.pool = SQLitePool(path, timeout)
        with self.pool.conn() as db:
            db.executescript(
                "CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, spam INTEGER NOT"
                " NULL DEFAULT 0, ham INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;"
                "CREATE TABLE IF NOT EXISTS totals (label TEXT PRIMARY KEY, n INTEGER NOT NULL);"
                "CREATE TABLE IF NOT EXISTS seen (digest TEXT PRIMARY KEY, label TEXT NOT NULL,"
                " tokens BLOB);"
            )
            cols = {row[1] for row in db.execute("PRAGMA table_info(seen)")}
            if "tokens" not in cols:  # a store from before the learned tokens were kept
                db.execute("ALTER TABLE seen ADD COLUMN tokens BLOB")
            db.commit()

    def counts(self, tokens: Sequence[str]) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        toks = list(tokens)
        with self.pool.conn() as db:
            for i in range(0, len(toks), 500):
                chunk = toks[i : i + 500]
                marks = ",".join("?" * len(chunk))
                q = f"SELECT token, spam, ham FROM tokens WHERE token IN ({marks})"
                for tok, s, h in db.execute(q, chunk):
                    out[tok] = (int(s), int(h))
        return out

    def totals(self) -> tuple[int, int]:
        with self.pool.conn() as db:
            rows = dict(db.execute("SELECT label, n FROM totals").fetchall())
        return int(rows.get("spam", 0)), int(rows.get("ham", 0))

    def learn(self, tokens: Sequence[str], spam: bool, delta: int) -> None:
        with self.pool.conn() as db, db:
            self._add(db, tokens, spam, delta)

    @staticmethod
    def _add(db: Any, tokens: Sequence[str], spam: bool, delta: int) -> None:
        """Add ``delta`` to the tokens' and the total's count (never below 0), in the
        caller's transaction."""
        col = "spam" if spam else "ham"
        db.executemany(
            f"INSERT INTO tokens (token, {col}) VALUES (?, MAX(?, 0)) "
            f"ON CONFLICT(token) DO UPDATE SET {col} = MAX({col} + ?, 0)",
            [(t, delta, delta) for t in tokens],
        )
        db.execute(
            "INSERT INTO totals (label, n) VALUES (?, MAX(?, 0)) "
            "ON CONFLICT(label) DO UPDATE SET n = MAX(n + ?, 0)",
            (col, delta, delta),
        )

    def seen(self, digest: str) -> str | None:
        with self.pool.conn() as db:
            row = db.execute("SELECT label FROM seen WHERE digest = ?", (digest,)).fetchone()
        return str(row[0]) if row else None

    def learned_tokens(self, digest: str) -> list[str] | None:
        with self.pool.conn() as db:
            row = db.execute("SELECT tokens FROM seen WHERE digest = ?", (digest,)).fetchone()
        return _unpack(row[0]) if row else None

    def learn_message(self, digest: str, label: str, tokens: Sequence[str]) -> bool:
        """Learn one message as ``label`` unless it already is (see Classifier.learn),
        all in one IMMEDIATE transaction: across threads and processes only one of
        several concurrent learns of it counts, and a failure changes nothing."""
        with self.pool.conn() as db:
            if db.in_transaction:  # (a pooled connection is never left in one)
                db.rollback()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT label, tokens FROM seen WHERE digest = ?", (digest,)
                ).fetchone()
                if row is not None and row[0] == label:
                    db.rollback()
                    return False
                if row is not None:
                    old = _unpack(row[1])
                    self._add(db, tokens if old is None else old, row[0] == "spam", -1)
                self._add(db, tokens, label == "spam", 1)
                db.execute(
                    "INSERT OR REPLACE INTO seen (digest, label, tokens) VALUES (?, ?, ?)",
                    (digest, label, _pack(tokens)),
                )
                db.commit()
            except BaseException:
                db.rollback()
                raise
        return True

    def set_seen(self, digest: str, label: str | None, tokens: Sequence[str] | None = None) -> None:
        with self.pool.conn() as db, db:
            if label is None:
                db.execute("DELETE FROM seen WHERE digest = ?", (digest,))
            else:
                blob = _pack(tokens) if tokens is not None else None
                db.execute(
                    "INSERT OR REPLACE INTO seen (digest, label, tokens) VALUES (?, ?, ?)",
                    (digest, label, blob),
                )

    def close(self) -> None:
        self.pool.close()


# KEYS: token hash, totals hash; ARGV: label, delta, tokens... Counts never go below 0.
_REDIS_LEARN = """
local delta = tonumber(ARGV[2])
for i = 3, #ARGV do
  if redis.call('HINCRBY', KEYS[1], ARGV[i], delta) <= 0 then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
if redis.call('HINCRBY', KEYS[2], ARGV[1], delta) < 0 then
  redis.call('HSET', KEYS[2], ARGV[1], 0)
end
return 0
"""


# KEYS: seen hash, seen-tokens hash; ARGV: digest, label, packed tokens. Returns the old
# label and tokens (nil when none), and sets the new ones unless the label is the same.
_REDIS_CLAIM = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local oldtok = redis.call('HGET', KEYS[2], ARGV[1])
if old ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return {old, oldtok}
"""


class RedisStore:
    """Token counts in Redis hashes ``PREFIX:spam``/``PREFIX:ham``; totals in ``PREFIX:n``."""

    def __init__(self, url: str, prefix: str, timeout: float = 1.0) -> None:
        import redis

        self.prefix = prefix
        self.r: Any = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._learn: Any = self.r.register_script(_REDIS_LEARN)
        self._claim: Any = self.r.register_script(_REDIS_CLAIM)

    def counts(self, tokens: Sequence[str]) -> dict[str, tuple[int, int]]:
        toks = list(tokens)
        if not toks:
            return {}
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.prefix + ":spam", toks)
        pipe.hmget(self.prefix + ":ham", toks)
        spam, ham = pipe.execute()
        out = {}
        for t, s, h in zip(toks, spam, ham, strict=True):
            if s is not None or h is not None:
                out[t] = (int(s or 0), int(h or 0))
        return out

    def totals(self) -> tuple[int, int]:
        s, h = self.r.hmget(self.prefix + ":n", ["spam", "ham"])
        return int(s or 0), int(h or 0)

    def learn(self, tokens: Sequence[str], spam: bool, delta: int) -> None:
        """Add ``delta`` to each token's count and the total, atomically (one script); a
        count that would drop below 0 is removed instead (HINCRBY alone goes negative)."""
        label = "spam" if spam else "ham"
        self._learn(
            keys=[f"{self.prefix}:{label}", self.prefix + ":n"], args=[label, delta, *tokens]
        )

    def seen(self, digest: str) -> str | None:
        v = self.r.hget(self.prefix + ":seen", digest)
        return v.decode() if isinstance(v, bytes) else None

    def learned_tokens(self, digest: str) -> list[str] | None:
        return _unpack(self.r.hget(self.prefix + ":seentok", digest))

    def learn_message(self, digest: str, label: str, tokens: Sequence[str]) -> bool:
        """As SQLiteStore.learn_message. The message is claimed first in one script
        (atomic in Redis: of concurrent learns only one goes on), then learned; a failure
        after the claim gives it back as far as Redis still answers."""
        old, old_blob = self._claim(
            keys=[self.prefix + ":seen", self.prefix + ":seentok"],
            args=[digest, label, _pack(tokens)],
        )
        before = old.decode() if isinstance(old, bytes) else None
        if before == label:
            return False
        old_tokens = _unpack(old_blob)
        try:
            if before is not None:
                self.learn(tokens if old_tokens is None else old_tokens, before == "spam", -1)
            self.learn(tokens, label == "spam", 1)
        except BaseException:
            with contextlib.suppress(Exception):
                self.set_seen(digest, before, old_tokens)
            raise
        return True

    def set_seen(self, digest: str, label: str | None, tokens: Sequence[str] | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        if label is None:
            pipe.hdel(self.prefix + ":seen", digest)
            pipe.hdel(self.prefix + ":seentok", digest)
        else:
            pipe.hset(self.prefix + ":seen", digest, label)
            if tokens is not None:
                pipe.hset(self.prefix + ":seentok", digest, _pack(tokens))
            else:
                pipe.hdel(self.prefix + ":seentok", digest)
        pipe.execute()

    def close(self) -> None:
        self.r.close()


def open_store(backend: str, path: str, redis_url: str, prefix: str, timeout: float) -> Store:
    if backend == "redis":
        return RedisStore(redis_url, prefix, timeout)
    return SQLiteStore(os.path.expanduser(path), timeout=max(timeout, 1.0))


def open_store_readonly(
    backend: str, path: str, redis_url: str, prefix: str, timeout: float
) -> Store | None:
    """For a dry run: the store to classify with, never to learn in, or None when the
    SQLite file does not exist (nothing is created). Redis is only read from (the
    classifier writes only when it learns)."""
    if backend == "redis":
        return RedisStore(redis_url, prefix, timeout)
    return SQLiteStore.readonly(os.path.expanduser(path), timeout=max(timeout, 1.0))


def digest_of(message_id: str | None, tokens: Sequence[str]) -> str:
    """What identifies a learned message: its Message-ID, else its tokens."""
    basis = message_id.strip() if message_id else "\n".join(sorted(tokens))
    return hashlib.sha256(basis.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class Classifier:
    """Probability that a token list is spam, from a :class:`Store`."""

    def __init__(
        self,
        store: Store,
        min_spam: int = 20,
        min_ham: int = 20,
        strength: float = 0.45,
        prior: float = 0.5,
        max_discriminators: int = 150,
        min_distance: float = 0.1,
    ) -> None:
        self.store = store
        self.min_spam = min_spam
        self.min_ham = min_ham
        self.s = strength
        self.x = prior
        self.max_disc = max_discriminators
        self.min_dist = min_distance

    def probability(self, tokens: Sequence[str]) -> float | None:
        """Spam probability, or None while too few messages are learned."""
        nspam, nham = self.store.totals()
        if nspam < self.min_spam or nham < self.min_ham:
            return None
        counts = self.store.counts(tokens)
        probs: list[float] = []
        for s_count, h_count in counts.values():
            s_ratio = min(1.0, s_count / nspam)
            h_ratio = min(1.0, h_count / nham)
            if s_ratio + h_ratio == 0:
                continue
            p = s_ratio / (s_ratio + h_ratio)
            n = s_count + h_count
            f = (self.s * self.x + n * p) / (self.s + n)
            if abs(f - 0.5) >= self.min_dist:
                probs.append(min(max(f, 1e-6), 1 - 1e-6))
        if not probs:
            return 0.5
        probs.sort(key=lambda f: -abs(f - 0.5))
        probs = probs[: self.max_disc]
        n = len(probs)
        ln_p = sum(math.log(f) for f in probs)
        ln_q = sum(math.log(1.0 - f) for f in probs)
        spamminess = 1.0 - chi2q(-2.0 * ln_q, 2 * n)
        hamminess = 1.0 - chi2q(-2.0 * ln_p, 2 * n)
        return (spamminess - hamminess + 1.0) / 2.0

    def learn(self, tokens: Sequence[str], spam: bool, digest: str) -> bool:
        """Learn one message once; relearning as the other class moves it. True if learned.

        Moving takes back exactly the tokens the message was learned with (kept with its
        digest), not its current ones: the same Message-ID may come with other tokens (a
        resent or edited message, another ``max_tokens``), and subtracting those corrupted
        the counts. For a message learned before tokens were kept, the current tokens are
        taken back; the stores never let a count drop below 0.
        """
        # Atomic in the store: of two deliveries of one message learned at once (on two
        # connections, in two workers) only one learns it (both did: counts inflated).
        return self.store.learn_message(digest, "spam" if spam else "ham", tokens)


_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def sources(path: str) -> list[str]:
    """What ``bayes train`` reads from ``path``, each on its own: a plain directory's files
    (sorted; each an mbox or a message, so that one bad file is said and the others still
    learn), else ``path`` itself (a file, a Maildir)."""
    p = Path(path)
    if p.is_dir() and not ((p / "cur").is_dir() or (p / "new").is_dir()):
        return [str(f) for f in sorted(p.iterdir()) if f.is_file()]
    return [path]


def iter_messages(path: str) -> Iterator[bytes]:
    """Messages of an mbox file, a Maildir (cur/ and new/), a directory of files (each an
    mbox file or one message), or a file holding one message (its first line a header field). An
    empty file is an empty mbox. Leading blank lines and a UTF-8 byte-order mark are
    skipped when telling these apart. Raises ValueError for a file that is none of these
    (it would teach nothing, or garbage)."""
    import mailbox

    p = Path(path)
    if p.is_file():
        with p.open("rb") as fh:
            start = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n\t ")
        if start and not start.startswith(b"From "):
            if not _FIELD_LINE.match(start):
                raise ValueError("not an mbox file, a Maildir or a message")
            data = p.read_bytes().removeprefix(b"\xef\xbb\xbf")
            yield data.lstrip(b"\r\n")
            return
    if p.is_dir():
        if (p / "cur").is_dir() or (p / "new").is_dir():
            md = mailbox.Maildir(str(p), factory=None, create=False)
            for key in md.iterkeys():
                yield md.get_bytes(key)
            return
        for f in sorted(p.iterdir()):
            if f.is_file():  # an mbox, or one message; anything else is an error
                yield from iter_messages(str(f))
        return
    box = mailbox.mbox(str(p), create=False)
    try:
        for key in box.iterkeys():
            yield box.get_bytes(key)
    finally:
        box.close()
