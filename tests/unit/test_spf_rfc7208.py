"""The RFC 7208 test suite (openspf.org, shipped with pyspf) through the ``spf`` plugin.

Each scenario's zone data is served by the real test DNS server on loopback; the plugin
resolves through milterd's StubResolver pointed at it, exactly as in the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import QTYPE, RCODE, DNSLabel
from milterd_plugins.spf import SPFPlugin

from milterd.config import DnsSettings
from milterd.dns import StubResolver
from milterd.testing import Harness
from tests.support.dnsserver import ZoneServer

SUITE = Path(__file__).resolve().parents[1] / "data" / "spf" / "rfc7208-tests.yml"
SCENARIOS: list[dict[str, Any]] = list(yaml.safe_load_all(SUITE.read_text()))
DEFAULT_EXP = "SPF fail - not authorized"  # pyspf's default explanation ("DEFAULT" in the suite)

#: Where a real DNS path gives another (defensible) answer than the suite's emulated
#: resolver: test id -> (our result, why). These are asserted too, never skipped.
KNOWN: dict[str, tuple[str, str]] = {
    "ptr-cname-loop": (
        "temperror",
        "the suite's driver lets pyspf see the CNAME loop itself; through a real resolver"
        " a CNAME loop is a resolution failure (dnspython: CNAME chain too long; a"
        " recursive resolver answers SERVFAIL), which is a DNS error, i.e. temperror",
    ),
}


class SuiteServer(ZoneServer):
    """ZoneServer + the suite's ``TIMEOUT`` entries: a name marked TIMEOUT answers
    SERVFAIL (a resolver's timeout) for every type it has no records of."""

    timeouts: set[str]

    def _answer(self, request: Any, protocol: str = "udp") -> Any:
        name = str(request.q.qname).lower().rstrip(".")
        zone = self.zone()
        qtype = QTYPE.get(request.q.qtype)
        if name in self.timeouts and qtype not in zone.get(name, {}):
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
            self._log(name, qtype, protocol, "SERVFAIL")
            return reply
        return super()._answer(request, protocol)


def zone_of(data: dict[str, Any]) -> tuple[dict[str, dict[str, list[Any]]], set[str]]:
    """The suite's zonedata as ZoneServer zone data (SPF records also published as TXT
    when the name has no TXT of its own, as the suite's drivers do)."""
    zone: dict[str, dict[str, list[Any]]] = {}
    timeouts: set[str] = set()
    for name, records in (data.get("zonedata") or {}).items():
        key = str(DNSLabel(name)).lower().rstrip(".")  # as the server prints query names
        entry = zone.setdefault(key, {})
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records or [])
        for rec in records or []:
            if rec == "TIMEOUT":
                timeouts.add(key)
                continue
            for rtype, value in rec.items():
                if value == "NONE":
                    continue
                if rtype in ("TXT", "SPF"):
                    # An empty TXT (no strings) cannot be put on the wire; the closest
                    # legal record is one empty string (null-text).
                    v: Any = value if isinstance(value, str) else (list(value) or [""])
                    entry.setdefault(rtype, []).append(v)
                    if rtype == "SPF" and not has_txt:
                        entry.setdefault("TXT", []).append(v)
                elif rtype == "MX":
                    entry.setdefault("MX", []).append((value[0], value[1]))
                else:
                    entry.setdefault(rtype, []).append(value)
    return zone, timeouts


CASES = [
    pytest.param(scenario, test_id, spec, id=test_id)
    for scenario in SCENARIOS
    for test_id, spec in scenario["tests"].items()
]


@pytest.fixture(scope="module")
def server() -> Any:
    with SuiteServer({}) as srv:
        yield srv


@pytest.mark.parametrize(("scenario", "test_id", "spec"), CASES)
def test_rfc7208(server: SuiteServer, scenario: dict[str, Any], test_id: str, spec: Any) -> None:
    zone, timeouts = zone_of(scenario)
    server.set_zone(zone)
    server.timeouts = timeouts
    resolver = StubResolver(
        DnsSettings(nameservers=[f"127.0.0.1:{server.port}"], timeout=2, cache_size=0)
    )
    expected = spec["result"] if isinstance(spec["result"], list) else [spec["result"]]
    if test_id in KNOWN:
        expected = [KNOWN[test_id][0]]
    config = {
        "spf": {
            "HELO_reject": "No_Check",
            "Mail_From_reject": "Fail",
            "skip_addresses": [],
            "Reason_Message": "{spf}",
        }
    }
    with Harness(config, plugins={"spf": SPFPlugin}, resolver=resolver) as h:
        out = h.send(
            b"Subject: t\r\n\r\nx\r\n",
            sender=spec.get("mailfrom", ""),
            helo=spec.get("helo", ""),
            client_ip=spec["host"],
        )
    assert not out.errors, out.errors
    results = [r for r in out.results if r.prop("smtp.mailfrom") is not None]
    assert len(results) == 1, out.results
    assert results[0].result in expected, (test_id, results[0], expected)
    if "explanation" in spec and results[0].result == "fail":
        exp = spec["explanation"]
        assert out.early is not None
        assert out.early.text == (DEFAULT_EXP if exp == "DEFAULT" else exp)  # type: ignore[attr-defined]
