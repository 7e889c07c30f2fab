"""Greylisting: a first-seen (sender, recipient, client network) triplet is refused with a
temporary failure until ``delay`` seconds have passed; a retry after that passes, and the
triplet then passes at once until ``expire`` seconds without mail."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import time
from typing import Any, Protocol

from ..sqlpool import SQLitePool

__all__ = ["GreyStore", "RedisGrey", "SQLiteGrey", "network_of", "triplet_key"]


def network_of(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None, v4: int, v6: int) -> str:
    if addr is None:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = v4 if addr.version == 4 else v6
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def triplet_key(sender: str, recipient: str, network: str) -> str:
    raw = f"{sender.lower()}\0{recipient.lower()}\0{network}"
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class GreyStore(Protocol):
    def check(self, key: str, now: float) -> bool: ...
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
    def __init__(self, path: str, delay: float, expire: float, pending_expire: float) -> None:
        super().__init__(delay, expire, pending_expire)
        self.path = os.path.expanduser(path)
        self.pool = SQLitePool(self.path, 5.0, autocommit=True)
        with self.pool.conn() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS triplets (key TEXT PRIMARY KEY, first REAL NOT NULL,"
                " passed INTEGER NOT NULL, expires REAL NOT NULL) WITHOUT ROWID"
            )

    def check(self, key: str, now: float) -> bool:
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
        self.pool.close()


class RedisGrey(_Policy):
    def __init__(self, url: str, prefix: str, delay: float, expire: float,
                 pending_expire: float, timeout: float = 1.0) -> None:  # fmt: skip
        super().__init__(delay, expire, pending_expire)
        import redis

        self.prefix = prefix
        self.r: Any = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)  # fmt: skip

    def check(self, key: str, now: float) -> bool:
        k = f"{self.prefix}:{key}"
        raw = self.r.get(k)
        row = None
        if raw:
            first, passed, expires = json.loads(raw)
            row = (float(first), int(passed), float(expires))
        ok, new = self.decide(row, now)
        if new != row:
            ttl = max(1, int(new[2] - now) + 1)
            self.r.set(k, json.dumps(list(new)), ex=ttl)
        return ok

    def close(self) -> None:
        self.r.close()


def open_grey(cfg: Any) -> SQLiteGrey | RedisGrey:
    if cfg.backend == "redis":
        return RedisGrey(cfg.redis_url, cfg.redis_prefix, cfg.delay, cfg.expire,
                         cfg.pending_expire)  # fmt: skip
    return SQLiteGrey(cfg.path, cfg.delay, cfg.expire, cfg.pending_expire)


def now() -> float:
    return time.time()
