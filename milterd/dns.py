"""The one DNS resolver every plugin shares: configured servers (with ports), a timeout
that never outlives the caller's deadline, and a TTL-honouring LRU cache.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from milterd.config import Config, DnsSettings, split_hostport

__all__ = ["DNSTempError", "NXDomain", "Resolver", "StubResolver", "make_resolver", "text_of"]

log = logging.getLogger("milterd.dns")
HEALTH_WINDOW = 60.0  # seconds: at most one "lookups failing" warning per window
HEALTH_MIN_FAILED = 5  # ... and only when at least this many, and half or more, failed
LIFETIME_MARGIN = 0.12  # seconds: dnspython overruns a lifetime by up to ~0.1 s


class NXDomain(LookupError):
    """The name does not exist (RCODE 3). A permanent answer."""


class DNSTempError(OSError):
    """No usable answer in time: timeout, SERVFAIL, refused. Retrying later may help."""


class _ServerFailure(DNSTempError):
    """The servers did not answer usefully (timeout, SERVFAIL, refused): what the health
    warning counts. Raised to callers as a plain DNSTempError."""


class Resolver(Protocol):
    """What plugins call. ``lookup`` returns record texts; NODATA is an empty list."""

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        """Records of ``rdtype`` at ``name`` as text.

        TXT records come back with their character-strings joined (as DKIM and SPF want);
        MX as ``"PREF HOST."``. Raises NXDomain or DNSTempError.
        ``timeout`` caps this lookup (pass ``ctx.time_left()``).
        """
        ...


def text_of(rdata: object) -> str:
    """One record as text; TXT strings joined without separators (RFC 7208 3.3, RFC 6376)."""
    strings = getattr(rdata, "strings", None)
    if strings is not None:
        return b"".join(strings).decode("utf-8", "replace")
    return str(rdata)


class StubResolver:
    """dnspython underneath, configured from ``[dns]``."""

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self._local = threading.local()  # dnspython resolvers are not shared across threads
        self.cache = dns.resolver.LRUCache(settings.cache_size) if settings.cache_size else None
        # Health over a window: one domain's broken DNS is ordinary, most lookups failing
        # (the resolver is down or unreachable) deserves a warning an admin sees.
        self._health = threading.Lock()
        self._window = time.monotonic()
        self._ok = self._failed = 0
        self._last_error = ""

    def _resolver(self) -> dns.resolver.Resolver:
        r: dns.resolver.Resolver | None = getattr(self._local, "r", None)
        if r is None:
            if self.settings.nameservers:
                r = dns.resolver.Resolver(configure=False)
                # Nameserver objects, not nameserver_ports (a dict by address: one
                # address on two ports was asked on the last port only).
                r.nameservers = [
                    dns.nameserver.Do53Nameserver(h, p)
                    for h, p in (split_hostport(s) for s in self.settings.nameservers)
                ]
            else:
                r = dns.resolver.Resolver()
            r.cache = self.cache
            r.lifetime = r.timeout = self.settings.timeout  # per lookup: see _lookup
            self._local.r = r
        return r

    def _count(self, error: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._health:
            if error is None:
                self._ok += 1
            else:
                self._failed += 1
                self._last_error = error
            if now - self._window < HEALTH_WINDOW:
                return
            ok, failed, last = self._ok, self._failed, self._last_error
            span = now - self._window  # the window closes at the first lookup after it
            self._window, self._ok, self._failed = now, 0, 0
        if failed >= HEALTH_MIN_FAILED and failed >= ok:
            servers = ", ".join(self.settings.nameservers) or "resolv.conf"
            log.warning(
                "DNS: %d of %d lookups failed in the last %.0f s (resolver %s; last: %s)",
                failed, ok + failed, span, servers, last,
            )  # fmt: skip

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        try:
            answer = self._lookup(name, rdtype, timeout)
        except _ServerFailure as e:
            # Only the servers' failures count (a name that is not valid DNS is NXDOMAIN
            # without asking them, above).
            self._count(str(e)[:200])
            raise DNSTempError(str(e)) from None
        self._count(None)
        return answer

    def _cached(self, name: str, rdtype: str) -> list[str] | None:
        """The cached answer for ``name``/``rdtype`` (its records; [] for a cached empty
        answer), or None when the cache has none."""
        if self.cache is None:
            return None
        try:
            key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
        except dns.exception.DNSException:
            return None
        answer = self.cache.get(key)
        if answer is None:
            return None
        return [] if answer.rrset is None else [text_of(rd) for rd in answer.rrset]

    def _lookup(self, name: str, rdtype: str, timeout: float | None) -> list[str]:
        try:
            r = self._resolver()
        except dns.exception.DNSException as e:  # no nameservers in resolv.conf...
            raise _ServerFailure(f"{name}/{rdtype}: resolver: {e}") from None
        lifetime = self.settings.timeout if timeout is None else min(timeout, self.settings.timeout)
        # dnspython returns up to ~0.1 s after the lifetime it is given: keep that margin,
        # so that a lookup never runs past the time its caller has left.
        lifetime -= LIFETIME_MARGIN
        if lifetime <= 0:  # no time to ask a server; an answer in the cache takes none
            cached = self._cached(name, rdtype)
            if cached is not None:
                return cached
            raise DNSTempError(f"{name}/{rdtype}: no time left")
        # Per server: a share of this lookup's time, so that a dead first server leaves
        # time to ask the next (with the whole lifetime each, the first took all of it).
        r.timeout = lifetime / max(1, min(len(r.nameservers), 3))
        try:
            answer = r.resolve(
                name, rdtype, lifetime=lifetime, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.name.NameTooLong, dns.name.LabelTooLong,
                dns.name.EmptyLabel, dns.name.BadEscape, dns.name.IDNAException):  # fmt: skip
            # A name that cannot exist in DNS (over 255 octets with _dmarc. in front, a
            # 64-octet label, an empty label) has no records, for certain: NXDOMAIN, as
            # RFC 7208 4.3 has SPF treat a malformed domain, so that DMARC goes on to the
            # organizational domain instead of a temperror that lets p=reject mail through.
            raise NXDomain(name) from None
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout,
        ) as e:
            raise _ServerFailure(f"{name}/{rdtype}: {e}") from None
        except dns.exception.DNSException as e:
            raise DNSTempError(f"{name}/{rdtype}: {e}") from None
        if answer.rrset is None:
            return []
        return [text_of(rd) for rd in answer.rrset]


def make_resolver(config: Config, timeout: float | None = None) -> Resolver:
    """The resolver the daemon uses, from a loaded config's ``[dns]``: for plugins'
    command-line tools (``commands``), which have no ``Services``. ``timeout`` replaces
    ``[dns] timeout`` (a command may wait longer than a message can)."""
    settings = config.dns
    if timeout is not None:
        settings = settings.model_copy(update={"timeout": timeout})
    return StubResolver(settings)
