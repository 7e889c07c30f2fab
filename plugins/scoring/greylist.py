"""Greylisting: a first-seen (sender, recipient, client network) triplet is refused with a
temporary failure until ``delay`` seconds have passed; a retry after that passes, and the
triplet then passes at once until ``expire`` seconds without mail."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import time
from typing import Any, Protocol

from ..sqlpool import SQLitePool
from .rosqlite import connect_readonly

__all__ = [
    "GreyStore",
    "RedisGrey",
    "SQLiteGrey",
    "network_of",
    "normalize_sender",
    "triplet_key",
]


def network_of(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None, v4: int, v6: int) -> str:
    if addr is None:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = v4 if addr.version == 4 else v6
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


_BATV = re.compile(r"^(?:prvs|msprvs\d*|btv1)=[^=@]*=", re.I)  # prvs=TAG=user
_SRS = re.compile(r"^srs([01])[=+-]", re.I)
# A number standing alone between non-word characters, as postgrey's s/\b\d+\b/#/g: the
# digits inside a word (user123, order12345) stay, so two such senders are two triplets.
_NUMBER = re.compile(r"\b\d+\b")


def _unsrs(address: str) -> str:
    """The original address of an SRS one: ``SRS0=HASH=TT=domain=local@forwarder`` and
    ``SRS1=HASH=forwarder1==HASH=TT=domain=local@forwarder2`` give ``local@domain``."""
    m = _SRS.match(address)
    local = address.rpartition("@")[0]
    if not m or not local:
        return address
    rest = local[m.end() :]
    if m.group(1) == "1":
        rest = rest.partition("==")[2]
    parts = rest.split("=", 3)  # hash, timestamp, domain, local (which may hold "=")
    if len(parts) != 4 or not parts[2] or not parts[3]:
        return address
    return f"{parts[3]}@{parts[2]}"


def normalize_sender(sender: str) -> str:
    """The sender as greylisting keys it, so that a retry from a list or forwarder that
    changes the address per message (VERP, BATV, SRS) is the same triplet: lower case;
    SRS0/SRS1 turned back into the original address; a BATV ``prvs=TAG=`` prefix and a
    ``+tag`` dropped; and every number standing alone in the local part (between
    non-letters: ``bounce-123-x``) replaced by ``#``, as postgrey does."""
    s = sender.strip().strip("<>").lower()
    s = _unsrs(s)
    s = _BATV.sub("", s)
    local, at, domain = s.rpartition("@")
    if not at:
        return s
    local = local.split("+", 1)[0] or local
    return f"{_NUMBER.sub('#', local)}@{domain}"


def triplet_key(sender: str, recipient: str, network: str) -> str:
    """The store key of (sender, recipient, client network); the sender normalized by
    :func:`normalize_sender`."""
    raw = f"{normalize_sender(sender)}\0{recipient.lower()}\0{network}"
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class GreyStore(Protocol):
    def check(self, key: str, now: float) -> bool: ...
    def peek(self, key: str, now: float) -> tuple[bool, bool]: ...
    def close(self) -> None: ...


class _Policy:
    def __init__(self, delay: float, expire: float, pending_expire: float) -> None:
        self.delay = delay
        self.expire = expire
        self.pending_expire = pending_expire

    def decide(
        self, row: tuple[float, int, float] | None, now: float
    ) -> tuple[bool, tuple[float, int, float]]:
        """(passes, new row); a row is (first_seen, passed, expires)."""
        if row is not None:
            first, passed, expires = row
            if now < expires:
                if passed:
                    return True, (first, 1, now + self.expire)
                if now - first >= self.delay:
                    return True, (first, 1, now + self.expire)
                return False, row
        if self.delay <= 0:
            return True, (now, 1, now + self.expire)
        return False, (now, 0, now + self.pending_expire)


class SQLiteGrey(_Policy):
    def __init__(
        self,
        path: str,
        delay: float,
        expire: float,
        pending_expire: float,
        readonly: bool = False,
    ) -> None:
        """``readonly`` (a dry run): only :meth:`peek`; no file is created or changed."""
        super().__init__(delay, expire, pending_expire)
        self.path = os.path.expanduser(path)
        self.readonly = readonly
        if readonly:
            return
        self.pool = SQLitePool(self.path, 5.0, autocommit=True)
        with self.pool.conn() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS triplets (key TEXT PRIMARY KEY, first REAL NOT NULL,"
                " passed INTEGER NOT NULL, expires REAL NOT NULL) WITHOUT ROWID"
            )

    def peek(self, key: str, now: float) -> tuple[bool, bool]:
        """(passes, known): what :meth:`check` would answer now, recording nothing; a
        missing database is an empty one."""
        db = connect_readonly(self.path, "triplets")
        if db is None:
            return self.decide(None, now)[0], False
        try:
            r = db.execute(
                "SELECT first, passed, expires FROM triplets WHERE key = ?", (key,)
            ).fetchone()
        finally:
            db.close()
        row = (float(r[0]), int(r[1]), float(r[2])) if r else None
        return self.decide(row, now)[0], row is not None

    def check(self, key: str, now: float) -> bool:
        if self.readonly:
            raise RuntimeError("greylist store opened read-only (dry run)")
        with self.pool.conn() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                r = db.execute(
                    "SELECT first, passed, expires FROM triplets WHERE key = ?", (key,)
                ).fetchone()
                row = (float(r[0]), int(r[1]), float(r[2])) if r else None
                ok, new = self.decide(row, now)
                if new != row:
                    db.execute("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?)", (key, *new))
                if int(now) % 97 == 0:  # now and then, forget what expired
                    db.execute("DELETE FROM triplets WHERE expires < ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return ok

    def close(self) -> None:
        if not self.readonly:
            self.pool.close()


class RedisGrey(_Policy):
    def __init__(self, url: str, prefix: str, delay: float, expire: float,
                 pending_expire: float, timeout: float = 1.0) -> None:  # fmt: skip
        super().__init__(delay, expire, pending_expire)
        import redis

        self.prefix = prefix
        self.r: Any = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)  # fmt: skip

    def _row(self, k: str) -> tuple[float, int, float] | None:
        return self._parse(self.r.get(k))

    def peek(self, key: str, now: float) -> tuple[bool, bool]:
        """(passes, known): what :meth:`check` would answer now, recording nothing."""
        row = self._row(f"{self.prefix}:{key}")
        return self.decide(row, now)[0], row is not None

    def check(self, key: str, now: float) -> bool:
        """Read, decide and write as one optimistic transaction (WATCH): a row another
        connection wrote meanwhile (a retry that just passed) is read again, not
        overwritten with a decision made on the old one."""
        import redis

        k = f"{self.prefix}:{key}"
        with self.r.pipeline() as pipe:
            for _ in range(5):
                try:
                    pipe.watch(k)
                    raw = pipe.get(k)
                    row = self._parse(raw)
                    ok, new = self.decide(row, now)
                    if new == row:
                        pipe.unwatch()
                        return ok
                    ttl = max(1, int(new[2] - now) + 1)
                    pipe.multi()
                    pipe.set(k, json.dumps(list(new)), ex=ttl)
                    pipe.execute()
                    return ok
                except redis.WatchError:
                    continue
        return ok  # still contended after 5 tries: the last decision, not written

    @staticmethod
    def _parse(raw: Any) -> tuple[float, int, float] | None:
        if not raw:
            return None
        first, passed, expires = json.loads(raw)
        return float(first), int(passed), float(expires)

    def close(self) -> None:
        self.r.close()


def open_grey(cfg: Any, readonly: bool = False) -> SQLiteGrey | RedisGrey:
    """The configured store. ``readonly`` (a dry run): use :meth:`~SQLiteGrey.peek` only;
    the SQLite file is not created (Redis is only read by ``peek``)."""
    if cfg.backend == "redis":
        return RedisGrey(cfg.redis_url, cfg.redis_prefix, cfg.delay, cfg.expire,
                         cfg.pending_expire)  # fmt: skip
    return SQLiteGrey(cfg.path, cfg.delay, cfg.expire, cfg.pending_expire, readonly)


def now() -> float:
    return time.time()
