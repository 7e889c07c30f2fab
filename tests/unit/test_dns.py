"""The shared resolver's health warning: a dead resolver shows up in the log at WARNING,
one broken domain does not."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from milterd.config import DnsSettings
from milterd.dns import HEALTH_WINDOW, DNSTempError, NXDomain, StubResolver


def test_most_lookups_failing_is_warned_once_a_window(caplog: pytest.LogCaptureFixture) -> None:
    # A loopback port nothing listens on: the lookup fails at once (or after 0.2 s).
    r = StubResolver(DnsSettings(nameservers=["127.0.0.1:9"], timeout=0.2, cache_size=0))
    for _ in range(5):
        with pytest.raises(DNSTempError):
            r.lookup("example.org", "TXT")
    assert "lookups failed" not in caplog.text  # the window is not over yet
    r._count(None, now=time.monotonic() + HEALTH_WINDOW)  # the first lookup after it
    warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert re.search(r"5 of 6 lookups failed in the last 6\d s \(resolver 127.0.0.1:9; ", text)
    assert "last: example.org/TXT" in text


def test_a_few_failures_among_many_answers_are_not_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = StubResolver(DnsSettings(nameservers=["127.0.0.1:9"], timeout=0.2))
    start = time.monotonic()
    for i in range(20):
        r._count("broken.example/TXT: SERVFAIL" if i % 3 == 0 else None, now=start + i)
    r._count(None, now=start + HEALTH_WINDOW + 1)
    assert "lookups failed" not in caplog.text


def test_names_that_are_not_valid_dns_do_not_count_against_the_resolver(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sender's 64-octet label, an empty label or a name over 255 octets: no server is
    # asked, and such a name has no records for certain (NXDOMAIN, as RFC 7208 4.3 treats
    # a malformed domain; it was a temperror, which let DMARC p=reject mail through from
    # a long subdomain); nor does it make the warning blame the resolver.
    r = StubResolver(DnsSettings(nameservers=["127.0.0.1:9"], timeout=0.2))
    start = time.monotonic()
    for name in ["x" * 64 + ".example", "a..example", ".".join(["x" * 60] * 5)] * 4:
        with pytest.raises(NXDomain):
            r.lookup(name, "TXT")
    r._count(None, now=start + 3 * HEALTH_WINDOW)
    assert "lookups failed" not in caplog.text


def test_one_address_on_two_ports_is_two_nameservers() -> None:
    """Found by a review: nameserver_ports is a dict by address, so 127.0.0.1:P1 and
    127.0.0.1:P2 were both asked on P2."""
    r = StubResolver(DnsSettings(nameservers=["127.0.0.1:5301", "127.0.0.1:5302"], timeout=1))
    servers = r._resolver().nameservers
    got = [(str(n.address), n.port) for n in servers]  # type: ignore[union-attr]
    assert got == [("127.0.0.1", 5301), ("127.0.0.1", 5302)]


def _silent_udp() -> Any:
    """A UDP socket on loopback that never answers (a dead nameserver)."""
    import socket as socket_

    s = socket_.socket(socket_.AF_INET, socket_.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_a_dead_first_nameserver_leaves_time_for_the_next() -> None:
    """Found by a review: each server's timeout was the whole lookup's lifetime, so a dead
    first server took all of it and the healthy second was never asked."""
    from tests.support.dnsserver import ZoneServer

    dead = _silent_udp()
    try:
        with ZoneServer({"example.org": {"TXT": ["v=spf1 -all"]}}) as good:
            servers = [f"127.0.0.1:{dead.getsockname()[1]}", f"127.0.0.1:{good.port}"]
            r = StubResolver(DnsSettings(nameservers=servers, timeout=3, cache_size=0))
            t0 = time.monotonic()
            assert r.lookup("example.org", "TXT", timeout=1.0) == ["v=spf1 -all"]
            assert time.monotonic() - t0 < 1.0
    finally:
        dead.close()


def test_a_lookup_never_outlives_the_time_it_was_given() -> None:
    """Found by a review: dnspython returned ~0.1 s after the lifetime, so an inline
    plugin giving a lookup all its time left overran its own deadline (a plugin failure)."""
    dead = _silent_udp()
    try:
        r = StubResolver(DnsSettings(nameservers=[f"127.0.0.1:{dead.getsockname()[1]}"],
                                     timeout=10, cache_size=0))  # fmt: skip
        for t in (0.3, 0.8):
            t0 = time.monotonic()
            with pytest.raises(DNSTempError):
                r.lookup("x.example", "TXT", timeout=t)
            assert time.monotonic() - t0 <= t
    finally:
        dead.close()


def test_no_resolver_configuration_is_a_temporary_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a review: with no nameserver in resolv.conf (and none in [dns]) dnspython's
    NoResolverConfiguration escaped lookup(); SPF recorded permerror (and could reject)."""
    import dns.resolver

    def unconfigured(*args: Any, **kwargs: Any) -> Any:
        raise dns.resolver.NoResolverConfiguration("no nameservers")  # type: ignore[no-untyped-call]

    monkeypatch.setattr(dns.resolver, "Resolver", unconfigured)
    r = StubResolver(DnsSettings(timeout=1))
    with pytest.raises(DNSTempError, match="resolver"):
        r.lookup("example.org", "TXT")


@pytest.mark.parametrize("name", ["a\\", "a\\256b.example", "a\u2028b.example"])
def test_names_that_cannot_exist_are_nxdomain(name: str) -> None:
    """A bad escape or a code point IDNA refuses names nothing: NXDOMAIN, as a 64-octet
    label is (an SPF include of one is a permerror, not a temperror)."""
    r = StubResolver(DnsSettings(nameservers=["127.0.0.1:9"], timeout=0.5, cache_size=0))
    with pytest.raises(NXDomain):
        r.lookup(name, "TXT")


def test_a_cached_answer_is_returned_even_with_almost_no_time_left() -> None:
    """A review of the margin above: with 0.12 s or less left every lookup failed ("no
    time left"), a cache hit too (DKIM key fetches late in end of message pass 0.05)."""
    from tests.support.dnsserver import ZoneServer

    with ZoneServer({"s._domainkey.example.org": {"TXT": ["v=DKIM1; p=abc"]}}) as z:
        r = StubResolver(DnsSettings(nameservers=[f"127.0.0.1:{z.port}"], timeout=2))
        assert r.lookup("s._domainkey.example.org", "TXT") == ["v=DKIM1; p=abc"]
        for t in (0.05, 0.1, 0.12):
            assert r.lookup("s._domainkey.example.org", "TXT", timeout=t) == ["v=DKIM1; p=abc"]
        with pytest.raises(DNSTempError, match="no time left"):
            r.lookup("other.example.org", "TXT", timeout=0.05)


def test_a_dns_timeout_too_short_to_ask_anything_is_refused() -> None:
    from milterd.config import ConfigError, loads

    with pytest.raises(ConfigError, match=r"greater than or equal to 0\.2"):
        loads("[dns]\ntimeout = 0.1\n")
