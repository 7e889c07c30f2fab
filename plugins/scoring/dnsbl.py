"""DNS blocklists (RFC 5782): client addresses and URL domains, looked up concurrently.

* IPv4 ``192.0.2.99`` is queried as ``99.2.0.192.ZONE``; IPv6 as 32 reversed nibbles.
* An answer in 127.255.255.0/24 is an error code from the list operator (quota, blocked
  resolver), and any answer outside 127.0.0.0/8 is nonsense: neither is ever a listing.
  Nor is 127.0.0.1 (RFC 5782 section 5: never a listing; URIBL and SURBL answer it to
  refused or blocked queries) or 127.0.1.255 (Spamhaus DBL: query not allowed).
* With ``bitmask = true`` the last octet of 127.0.0.N is a bit field (SURBL/URIBL multi):
  each return code 127.0.0.B whose bits are all set in N adds its symbol.
* At start-up each list is checked at its RFC 5782 section 5 test points: an IP list must
  list 127.0.0.2 and must not list 127.0.0.1; a URI list must list ``test`` and must not
  list ``invalid``. A list failing either is disabled with a warning.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from milterd import DNSTempError, NXDomain, Resolver

from .config import DnsblConfig, ReturnCode

__all__ = [
    "ERROR_ADDRS",
    "ERROR_NET",
    "Hit",
    "List",
    "check_test_points",
    "is_error",
    "query_name",
    "reverse_ip",
]

ERROR_NET = ipaddress.ip_network("127.255.255.0/24")
LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
#: Answers that are errors, never listings, besides ERROR_NET.
ERROR_ADDRS = frozenset(ipaddress.ip_address(a) for a in ("127.0.0.1", "127.0.1.255"))
BIT_NET = ipaddress.ip_network("127.0.0.0/24")


def is_error(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An answer that is an operator's error code (or nonsense), not a listing."""
    return addr.version != 4 or addr not in LOOPBACK_NET or addr in ERROR_NET or addr in ERROR_ADDRS


IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def reverse_ip(addr: IPAddr) -> str:
    """The RFC 5782 query label sequence for an address (without the zone)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def query_name(item: str | IPAddr, zone: str) -> str:
    if isinstance(item, str):
        return f"{item}.{zone}"
    return f"{reverse_ip(item)}.{zone}"


@dataclass(frozen=True, slots=True)
class Hit:
    symbol: str
    score: float
    description: str
    option: str  # what was listed, and the answer


class List:
    """One configured list, with its return-code table resolved."""

    def __init__(self, cfg: DnsblConfig) -> None:
        self.cfg = cfg
        self.zone = cfg.zone
        self.enabled = True
        self.codes = [
            (ipaddress.ip_network(k, strict=False), rc) for k, rc in cfg.returncodes.items()
        ]
        self.warned: set[str] = set()  # error codes logged already: once each, not per query

    def _error(self, log: Any, answer: str, item: str) -> None:
        if log is None:
            return
        if answer in self.warned:
            log.debug("dnsbl %s: error code %s for %s: not a listing", self.zone, answer, item)
            return
        self.warned.add(answer)
        log.warning("dnsbl %s: error code %s for %s: not a listing (blocked or refused "
                    "query?); further ones are logged at debug level", self.zone, answer,
                    item)  # fmt: skip

    def _codes_for(self, addr: ipaddress.IPv4Address) -> list[ReturnCode]:
        if not self.cfg.bitmask:
            return [rc for net, rc in self.codes if addr in net]
        if addr not in BIT_NET:
            return []
        bits = int(addr) & 0xFF
        out = []
        for net, rc in self.codes:
            mask = int(net.network_address) & 0xFF
            if bits & mask == mask:
                out.append(rc)
        return out

    def interpret(self, item: str, answers: list[str], log: Any) -> list[Hit]:
        """Symbols for the A records a query returned; error codes are never a listing."""
        hits: dict[str, Hit] = {}
        for a in answers:
            try:
                addr = ipaddress.ip_address(a)
            except ValueError:
                continue
            if is_error(addr):
                self._error(log, a, item)
                continue
            assert isinstance(addr, ipaddress.IPv4Address)
            codes = self._codes_for(addr)
            for rc in codes:
                hits.setdefault(rc.symbol, Hit(rc.symbol, rc.score, rc.description,
                                               f"{item}:{a}"))  # fmt: skip
            if not codes:
                hits.setdefault(self.cfg.symbol, Hit(self.cfg.symbol, self.cfg.score,
                                                     self.cfg.description or
                                                     f"listed in {self.zone}",
                                                     f"{item}:{a}"))  # fmt: skip
        return list(hits.values())


def check_test_points(
    lists: list[List], resolver: Resolver, log: logging.Logger, timeout: float = 3.0
) -> None:
    """Disable lists that fail their RFC 5782 test points (run at start-up)."""
    todo = [lst for lst in lists if lst.cfg.check_test_points]
    if not todo:
        return

    def probe(name: str) -> str:
        try:
            answers = resolver.lookup(name, "A", timeout=timeout)
        except NXDomain:
            return "nx"
        except DNSTempError:
            return "error"
        listed = []
        for a in answers:
            try:
                addr = ipaddress.ip_address(a)
            except ValueError:
                continue
            if not is_error(addr):
                listed.append(a)
        return "listed" if listed else "nx"

    with cf.ThreadPoolExecutor(max_workers=min(8, 2 * len(todo))) as pool:
        futures = {}
        for lst in todo:
            if lst.cfg.type == "ip":
                good, bad = "2.0.0.127", "1.0.0.127"
            else:
                good, bad = "test", "invalid"
            futures[lst] = (
                pool.submit(probe, f"{good}.{lst.zone}"),
                pool.submit(probe, f"{bad}.{lst.zone}"),
            )
        for lst, (fg, fb) in futures.items():
            g, b = fg.result(), fb.result()
            good_name = "127.0.0.2" if lst.cfg.type == "ip" else "test"
            bad_name = "127.0.0.1" if lst.cfg.type == "ip" else "invalid"
            if b == "listed":
                lst.enabled = False
                log.warning("dnsbl %s lists the RFC 5782 test point %s: list disabled",
                            lst.zone, bad_name)  # fmt: skip
            elif g == "nx":
                lst.enabled = False
                log.warning("dnsbl %s does not list the RFC 5782 test point %s: list disabled",
                            lst.zone, good_name)  # fmt: skip
            elif g == "error" or b == "error":
                log.warning("dnsbl %s: test points could not be checked (DNS error): "
                            "list kept", lst.zone)  # fmt: skip


class Lookups:
    """The lookups of one message, running on the plugin's shared thread pool."""

    def __init__(self, pool: cf.ThreadPoolExecutor, resolver: Resolver, timeout: float) -> None:
        self.pool = pool
        self.resolver = resolver
        self.timeout = timeout
        self.jobs: list[tuple[List, str, cf.Future[list[str]]]] = []
        self.errors: list[str] = []

    def _lookup(self, name: str) -> list[str]:
        try:
            return self.resolver.lookup(name, "A", timeout=self.timeout)
        except NXDomain:
            return []

    def submit(self, lst: List, item: str | IPAddr) -> None:
        label = item if isinstance(item, str) else str(item)
        self.jobs.append((lst, label, self.pool.submit(self._lookup, query_name(item, lst.zone))))

    def collect(self, deadline: float, log: Any) -> list[Hit]:
        """Wait until ``deadline`` (monotonic) at most; unfinished lookups are errors."""
        hits: list[Hit] = []
        for lst, label, fut in self.jobs:
            left = deadline - time.monotonic()
            try:
                answers = fut.result(timeout=max(0.0, left))
            except cf.TimeoutError:
                fut.cancel()
                self.errors.append(f"{lst.zone}:{label}:timeout")
                continue
            except DNSTempError as e:
                self.errors.append(f"{lst.zone}:{label}:{e}")
                continue
            except Exception as e:  # a broken resolver must not break scoring
                self.errors.append(f"{lst.zone}:{label}:{type(e).__name__}")
                continue
            hits.extend(lst.interpret(label, answers, log))
        return hits
