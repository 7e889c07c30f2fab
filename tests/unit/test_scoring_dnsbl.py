"""DNS blocklists in the scoring plugin (RFC 5782), with a fake resolver."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

import pytest
from milterd_plugins.scoring import DECISION_SYMBOL, ScoringPlugin
from milterd_plugins.scoring.dnsbl import reverse_ip

from milterd.testing import FakeResolver, Harness, Outcome

PLAIN = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello there.\r\n"
TEST_POINT = {"2.0.0.127.bl.test": {"A": ["127.0.0.2"]}}
IP_LIST = {
    "zone": "bl.test",
    "symbol": "RBL_TEST",
    "score": 3.0,
    "returncodes": {
        "127.0.0.4": {"symbol": "RBL_TEST_PBL", "score": 1.0},
        "127.0.1.0/24": {"symbol": "RBL_TEST_DBL", "score": 2.0},
    },
}


def syms(out: Outcome) -> dict[str, float]:
    return {s.name: s.score for s in out.symbols if s.name != DECISION_SYMBOL}


def send(section: dict[str, Any], zones: dict[str, Any], msg: bytes = PLAIN, **kw: Any) -> Outcome:
    with Harness({"scoring": section}, plugins={"scoring": ScoringPlugin}, zones=zones) as h:
        return h.send(msg, **kw)


def test_reverse_ip() -> None:
    assert reverse_ip(ipaddress.ip_address("192.0.2.99")) == "99.2.0.192"
    v6 = reverse_ip(ipaddress.ip_address("2001:db8::1"))
    assert v6 == "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert reverse_ip(ipaddress.ip_address("::ffff:192.0.2.1")) == "1.2.0.192"


def test_listed_client_gets_symbols_per_return_code() -> None:
    zones = {
        **TEST_POINT,
        "9.2.0.192.bl.test": {"A": ["127.0.0.2", "127.0.0.4"]},
        "8.2.0.192.bl.test": {"A": ["127.0.1.7"]},
    }
    section = {"dnsbl": [IP_LIST]}
    s = syms(send(section, zones, client_ip="192.0.2.9"))
    assert s == {"RBL_TEST": 3.0, "RBL_TEST_PBL": 1.0}
    assert syms(send(section, zones, client_ip="192.0.2.8")) == {"RBL_TEST_DBL": 2.0}
    assert syms(send(section, zones, client_ip="192.0.2.7")) == {}  # not listed


def test_ipv6_client_is_queried_by_nibbles() -> None:
    name = reverse_ip(ipaddress.ip_address("2001:db8::1")) + ".bl.test"
    zones = {**TEST_POINT, name: {"A": ["127.0.0.2"]}}
    assert syms(send({"dnsbl": [IP_LIST]}, zones, client_ip="2001:db8::1")) == {"RBL_TEST": 3.0}
    no6 = {**IP_LIST, "ipv6": False}
    assert syms(send({"dnsbl": [no6]}, zones, client_ip="2001:db8::1")) == {}


def test_error_codes_are_never_a_listing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    zones = {
        **TEST_POINT,
        "9.2.0.192.bl.test": {"A": ["127.255.255.254"]},
        "8.2.0.192.bl.test": {"A": ["127.255.255.252", "10.1.2.3"]},
    }
    for ip in ("192.0.2.9", "192.0.2.8"):
        out = send({"dnsbl": [IP_LIST]}, zones, client_ip=ip)
        assert syms(out) == {} and out.verdict == "continue"
    assert "error code 127.255.255.254" in caplog.text


@pytest.mark.parametrize(
    ("zones", "warning"),
    [
        ({"2.0.0.127.bl.test": {"A": ["127.0.0.2"]}, "1.0.0.127.bl.test": {"A": ["127.0.0.2"]}},
         "lists the RFC 5782 test point 127.0.0.1"),
        ({}, "does not list the RFC 5782 test point 127.0.0.2"),
    ],
)  # fmt: skip
def test_broken_list_is_disabled_with_a_warning(
    zones: dict[str, Any], warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    zones = {**zones, "9.2.0.192.bl.test": {"A": ["127.0.0.2"]}}
    resolver = FakeResolver(zones)
    with Harness({"scoring": {"dnsbl": [IP_LIST]}}, plugins={"scoring": ScoringPlugin},
                 resolver=resolver) as h:  # fmt: skip
        out = h.send(PLAIN, client_ip="192.0.2.9")
    assert warning in caplog.text and "list disabled" in caplog.text
    assert syms(out) == {}
    assert ("9.2.0.192.bl.test", "A") not in resolver.queries


def test_test_points_can_be_skipped() -> None:
    zones = {"9.2.0.192.bl.test": {"A": ["127.0.0.2"]}}
    section = {"dnsbl": [{**IP_LIST, "check_test_points": False}]}
    assert syms(send(section, zones, client_ip="192.0.2.9")) == {"RBL_TEST": 3.0}


def test_uri_list_queries_registered_domains() -> None:
    zones = {
        "test.dbl.test": {"A": ["127.0.1.2"]},
        "bad-domain.example.dbl.test": {"A": ["127.0.1.2"]},
    }
    lst = {"zone": "dbl.test", "type": "uri", "symbol": "URIBL_TEST", "score": 4.0}
    msg = (
        b"Subject: x\r\nContent-Type: text/html\r\n\r\n"
        b'<a href="http://www.Bad-Domain.example/login">x</a> http://good.example/\r\n'
    )
    resolver = FakeResolver(zones)
    with Harness({"scoring": {"dnsbl": [lst]}}, plugins={"scoring": ScoringPlugin},
                 resolver=resolver) as h:  # fmt: skip
        out = h.send(msg)
        clean = h.send(b"Subject: x\r\n\r\nsee http://good.example/\r\n")
    assert syms(out) == {"URIBL_TEST": 4.0}
    (sym,) = [s for s in out.symbols if s.name == "URIBL_TEST"]
    assert sym.options == ("bad-domain.example:127.0.1.2",)
    assert syms(clean) == {}
    assert ("good.example.dbl.test", "A") in resolver.queries


def test_uri_list_test_points() -> None:
    lst = {"zone": "dbl.test", "type": "uri", "symbol": "URIBL_TEST", "score": 4.0}
    zones = {"test.dbl.test": {"A": ["127.0.1.2"]}, "invalid.dbl.test": {"A": ["127.0.1.2"]},
             "bad.example.dbl.test": {"A": ["127.0.1.2"]}}  # fmt: skip
    out = send({"dnsbl": [lst]}, zones, b"Subject: x\r\n\r\nhttp://bad.example/\r\n")
    assert syms(out) == {}


class SlowResolver:
    """Answers every name as listed after ``delay`` seconds; counts concurrent lookups."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.startup = True

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        if name.startswith("1.0.0.127."):
            from milterd import NXDomain

            raise NXDomain(name)
        if name.startswith("2.0.0.127."):
            return ["127.0.0.2"]
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.delay)
        finally:
            with self.lock:
                self.active -= 1
        return ["127.0.0.2"]


def lists(n: int) -> list[dict[str, Any]]:
    return [{"zone": f"bl{i}.test", "symbol": f"RBL_{i}", "score": 1.0} for i in range(n)]


def test_lookups_run_concurrently() -> None:
    r = SlowResolver(0.3)
    with Harness({"scoring": {"dnsbl": lists(4)}}, plugins={"scoring": ScoringPlugin},
                 resolver=r) as h:  # fmt: skip
        t0 = time.monotonic()
        out = h.send(PLAIN, client_ip="192.0.2.9")
        elapsed = time.monotonic() - t0
    assert set(syms(out)) == {"RBL_0", "RBL_1", "RBL_2", "RBL_3"}
    assert r.peak == 4 and elapsed < 0.9


def test_lookups_have_a_deadline() -> None:
    r = SlowResolver(3.0)
    section = {"dnsbl": lists(2), "dnsbl_timeout": 0.4}
    with Harness({"scoring": section}, plugins={"scoring": ScoringPlugin}, resolver=r) as h:
        t0 = time.monotonic()
        out = h.send(PLAIN, client_ip="192.0.2.9")
        elapsed = time.monotonic() - t0
    assert out.verdict == "continue" and syms(out) == {} and not out.errors
    assert elapsed < 1.5


def test_dns_timeouts_are_not_listings() -> None:
    zones = {**TEST_POINT, "9.2.0.192.bl.test": {"A": "TIMEOUT"}}
    out = send({"dnsbl": [IP_LIST]}, zones, client_ip="192.0.2.9")
    assert out.verdict == "continue" and syms(out) == {} and not out.errors
